"""The embedded services of make run / make test."""

from marketplace.devenv import EmbeddedRedis


def test_a_second_process_shares_the_running_redis_instead_of_opening_its_files(tmp_path):
    first = EmbeddedRedis(tmp_path / "redis", persistent=True).start()
    try:
        second = EmbeddedRedis(tmp_path / "redis", persistent=True).start()
        assert second.url == first.url and not second.owned
        second.stop()  # does not stop the server it does not own
        third = EmbeddedRedis(tmp_path / "redis", persistent=True).start()
        assert third.url == first.url
    finally:
        first.stop()
    fresh = EmbeddedRedis(tmp_path / "redis", persistent=True).start()
    try:
        assert fresh.owned  # the first one is gone: a new server takes over
    finally:
        fresh.stop()
