"""The structural checker of docker-compose.yml (scripts/check_compose.py): it passes the real
file and catches each kind of mistake in a broken one. No database, no Docker engine."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"


def _load_checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "switchyard_check_compose", ROOT / "scripts" / "check_compose.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


checker = _load_checker()

BROKEN = textwrap.dedent(
    """
    x-env: &env
      OUTBOUND_ALLOWED_NETWORKS: 10.0.0.0/8
    services:
      postgres:
        image: postgres:latest
        healthcheck:
          test: ["CMD-SHELL", "pg_isready"]
      redis:
        image: redis
      cache:
        image: bitnami/redis:7
        healthcheck:
          test: ["NONE"]
      migrate:
        build: .
        image: switchyard:local
        restart: always
        command: ["python", "manage_typo.py", "migrate"]
      web:
        build: ./elsewhere
        environment: *env
        command: uvicorn missing.asgi:application --host 0.0.0.0 --port 8000
        depends_on:
          redis:
            condition: service_healthy
          migrate:
            condition: service_completed_successfully
          ghost:
            condition: service_started
        healthcheck:
          test: ["CMD", "python", "-c", "print(1)"]
      worker:
        build: .
        image: switchyard
        command: ["celery", "-A", "nowhere", "worker"]
        healthcheck:
          test: ["CMD-SHELL", "celery -A marketplace inspect ping"]
      vendor:
        build: .
        command: ["python", "-m", "vendors.reference.nope", "--port", "8101"]
        healthcheck:
          test: ["CMD", "true"]
      package-runner:
        build: .
        command: ["python", "-m", "vendors.reference"]
        healthcheck:
          test: ["CMD", "true"]
    networks:
      default:
        ipam:
          config:
            - subnet: 172.28.0.0/16
    """
)


@pytest.fixture
def broken_file(tmp_path: Path) -> Path:
    path = tmp_path / "docker-compose.yml"
    path.write_text(BROKEN)
    return path


def test_it_passes_the_real_compose_file() -> None:
    report = checker.run_checks(COMPOSE_FILE, ROOT, env={})

    assert report.errors == []
    checked = "\n".join(report.checked)
    for service in (
        "postgres",
        "redis",
        "lb",
        "web",
        "worker-ingest",
        "worker-probes",
        "worker-payments",
        "beat",
        "vendor-smollm2",
        "vendor-gemma",
        "vendor-embeddings",
    ):
        assert f"{service}: has a healthcheck" in checked
    assert "migrate: one-shot (restart: no), no healthcheck needed" in checked
    assert "web command: module marketplace.asgi exists" in checked
    assert "worker-ingest command: module marketplace exists" in checked
    assert "vendor-gemma command: main module vendors.reference.llm exists" in checked
    assert "vendor-embeddings command: main module vendors.reference.embeddings exists" in checked
    assert "migrate command: file manage.py exists" in checked
    assert "Dockerfile CMD: module marketplace.asgi exists" in checked
    assert "web: may call into network default (172.28.0.0/16)" in checked
    # The load balancer is the way in: it routes to the web replicas, WebSockets included.
    assert "lb: the load balancer publishes the only port(s)" in checked
    assert "lb: nginx.conf routes to web:8000" in checked
    assert "lb: passes WebSocket upgrades through" in checked


def test_only_the_load_balancer_publishes_a_port() -> None:
    compose = checker.load_compose(COMPOSE_FILE, {})

    published = [name for name, service in compose["services"].items() if service.get("ports")]

    assert published == ["lb"]
    assert compose["services"]["web"]["deploy"]["replicas"] >= 2
    volumes = compose["services"]["lb"]["volumes"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in volumes
    # The replicas believe X-Forwarded-For from the balancer's fixed address only.
    address = compose["services"]["lb"]["networks"]["default"]["ipv4_address"]
    assert compose["services"]["web"]["environment"]["TRUSTED_PROXIES"] == address


LB_COMPOSE = textwrap.dedent(
    """
    services:
      lb:
        image: nginx:1.28
        volumes:
          - ./nginx.conf:/etc/nginx/nginx.conf:ro
        ports: ["8000:8080"]
        healthcheck:
          test: ["CMD", "true"]
      web:
        build: .
        image: switchyard:local
        command: ["uvicorn", "marketplace.asgi:application", "--port", "8000"]
        ports: ["8001:8000"]
        healthcheck:
          test: ["CMD", "true"]
    networks:
      default:
        ipam:
          config:
            - subnet: 172.28.0.0/16
    """
)


def test_it_reports_ports_past_the_balancer_and_a_config_that_misses_the_web_service(
    tmp_path: Path,
) -> None:
    (tmp_path / "docker-compose.yml").write_text(LB_COMPOSE)
    (tmp_path / "nginx.conf").write_text(
        "http { upstream app { server webb:8000 resolve; } "
        "server { location / { proxy_pass http://app; } } }"
    )

    report = checker.check_load_balancer(
        checker.load_compose(tmp_path / "docker-compose.yml", {}), tmp_path
    )
    errors = "\n".join(report.errors)

    assert "web: publishes a port; only the load balancer may" in errors
    assert "lb: nginx.conf proxies to webb:8000, which is not a service" in errors
    assert "lb: nginx.conf does not pass WebSocket upgrades through" in errors
    assert "lb: the load balancer publishes the only port(s)" in report.checked


def test_it_reports_a_balancer_proxying_to_the_wrong_port(tmp_path: Path) -> None:
    (tmp_path / "docker-compose.yml").write_text(LB_COMPOSE)
    (tmp_path / "nginx.conf").write_text(
        "http { upstream app { server web:9000; } server { location / { "
        "proxy_pass http://app; proxy_http_version 1.1; "
        "proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection upgrade; } } }"
    )

    report = checker.check_load_balancer(
        checker.load_compose(tmp_path / "docker-compose.yml", {}), tmp_path
    )

    assert "lb: nginx.conf proxies to web:9000, but web does not serve uvicorn on port 9000" in (
        report.errors
    )
    assert "lb: passes WebSocket upgrades through" in report.checked


def test_it_reports_a_file_without_a_balancer() -> None:
    report = checker.check_load_balancer({"services": {"web": {"image": "x:1"}}}, ROOT)

    assert report.errors == ["no load balancer service (an nginx or haproxy image)"]


def test_it_passes_the_real_compose_file_with_overridden_settings() -> None:
    env = {"SECRET_KEY": "s3cret", "POSTGRES_PASSWORD": "pw", "WEB_PORT": "8080"}

    assert checker.run_checks(COMPOSE_FILE, ROOT, env=env).errors == []


def test_it_reports_every_broken_rule(broken_file: Path) -> None:
    # build contexts resolve against the repository, as with --project-directory
    report = checker.run_checks(broken_file, ROOT, env={}, project_dir=ROOT)
    errors = "\n".join(report.errors)

    expected = [
        # healthchecks
        "redis: no healthcheck",
        "cache: no healthcheck",
        'migrate: the one-shot service must have restart: "no"',
        # depends_on
        "web: waits for redis to be healthy, but it has no healthcheck",
        "web: waits for migrate to complete, but migrate is not a one-shot service",
        "web: depends on 'ghost', which is not a service",
        # images
        "postgres: image 'postgres:latest' uses the latest tag",
        "redis: image 'redis' has no tag",
        "cache: image 'bitnami/redis:7' is neither built from the Dockerfile nor an official",
        f"web: builds from {ROOT / 'elsewhere'}, not from the repository root",
        "worker: tags the build as 'switchyard'",
        # commands
        "migrate command: file 'manage_typo.py' does not exist",
        "web command: module 'missing.asgi' does not exist",
        "worker command: module 'nowhere' does not exist",
        "vendor command: main module 'vendors.reference.nope' does not exist",
        "package-runner command: main module 'vendors.reference' does not exist",
        # outbound networks
        "web: OUTBOUND_ALLOWED_NETWORKS (10.0.0.0/8) does not cover network default",
    ]
    missing = [item for item in expected if item not in errors]
    assert not missing, f"not reported: {missing}\nreported:\n{errors}"
    # and the parts that are right are not reported
    assert "worker healthcheck" not in errors
    assert "postgres: no healthcheck" not in errors
    assert "migrate: builds from" not in errors


def test_it_exits_1_with_clear_messages_on_a_broken_file(broken_file: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    status = checker.main(["--file", str(broken_file), "--root", str(ROOT)])

    captured = capsys.readouterr()
    assert status == 1
    assert "FAIL  redis: no healthcheck" in captured.err
    assert "problem(s) in" in captured.err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("services: [unclosed", "not valid YAML"),
        ("just a string", "the top level must be a mapping"),
        ("volumes: {}", "no 'services' mapping"),
        ("services:\n  web: nonsense", "service 'web' must be a mapping"),
        ("services:\n  web:\n    image: x:${TAG:?set TAG}", "required variable TAG is missing"),
    ],
)
def test_it_rejects_files_it_cannot_read(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "compose.yml"
    path.write_text(text)

    report = checker.run_checks(path, ROOT, env={})

    assert not report.ok
    assert message in report.errors[0]


def test_it_interpolates_like_compose() -> None:
    env = {"SET": "value", "EMPTY": ""}

    assert checker.interpolate("${UNSET:-d}|${EMPTY:-d}|${EMPTY-d}|${SET:-d}", env) == "d|d||value"
    assert checker.interpolate("$SET ${SET} $$HOSTNAME ${UNSET}", env) == "value value $HOSTNAME "
    assert checker.interpolate({"k": ["${SET:?no}", 3]}, env) == {"k": ["value", 3]}
    with pytest.raises(checker.ComposeError, match="EMPTY"):
        checker.interpolate("${EMPTY:?must be set}", env)


def test_it_finds_what_commands_run() -> None:
    targets = checker.command_targets

    assert targets(["python", "-m", "vendors.reference.llm", "--port", "1"]) == [
        ("main module", "vendors.reference.llm")
    ]
    assert targets(["/app/.venv/bin/python3.11", "manage.py", "migrate"]) == [("file", "manage.py")]
    assert targets(["uvicorn", "--host", "0.0.0.0", "marketplace.asgi:application"]) == [
        ("module", "marketplace.asgi")
    ]
    assert targets(["celery", "--app=marketplace.celery:app", "worker"]) == [
        ("module", "marketplace.celery")
    ]
    assert targets(["celery", "-Amarketplace", "beat"]) == [("module", "marketplace")]
    assert targets(["celery", "worker"]) == [("module", "")]
    assert targets(["python", "-c", "print(1)"]) == []


def test_it_runs_as_a_script_on_the_real_file() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_compose.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "ok    web: has a healthcheck" in result.stdout
    assert "passed" in result.stdout
