"""Front-end assets: fetched from the npm registry by a Python script (no Node needed),
verified against the lock, extracted file by file; the pages load nothing from elsewhere."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import re
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "fetch_assets", ROOT / "scripts" / "fetch_assets.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["fetch_assets"] = module
    spec.loader.exec_module(module)
    return module


fetch_assets = load_script()


def tarball(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def sri(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


@pytest.fixture
def project(tmp_path: Path):  # type: ignore[no-untyped-def]
    script = b"console.log('hi');"
    package = tarball(
        {"dist/lib.min.js": script, "src/secret.js": b"not wanted", "LICENSE": b"MIT"}
    )
    (tmp_path / "lib-1.0.0.tgz").write_bytes(package)
    lock = {
        "destination": "static/vendor",
        "packages": {
            "lib": {
                "version": "1.0.0",
                "resolved": (tmp_path / "lib-1.0.0.tgz").as_uri(),
                "integrity": sri(package),
                "files": [
                    {"path": "dist/lib.min.js", "sha256": hashlib.sha256(script).hexdigest()},
                    {"path": "LICENSE", "sha256": hashlib.sha256(b"MIT").hexdigest()},
                ],
            }
        },
    }
    (tmp_path / "assets.lock.json").write_text(json.dumps(lock))
    return tmp_path


def test_it_extracts_only_the_listed_files_after_checking_integrity(project):
    assert fetch_assets.main(["--lock", str(project / "assets.lock.json")]) == 0

    vendor = project / "static" / "vendor" / "lib"
    assert (vendor / "dist" / "lib.min.js").read_bytes() == b"console.log('hi');"
    assert (vendor / "LICENSE").read_bytes() == b"MIT"
    assert not (vendor / "src").exists()


def test_it_is_a_no_op_when_the_files_are_present(project, monkeypatch):
    lock = str(project / "assets.lock.json")
    assert fetch_assets.main(["--lock", lock]) == 0

    def no_network(url: str) -> bytes:
        raise AssertionError(f"downloaded {url} again")

    monkeypatch.setattr(fetch_assets, "download", no_network)
    assert fetch_assets.main(["--lock", lock]) == 0
    assert fetch_assets.main(["--lock", lock, "--check"]) == 0


def test_it_replaces_a_changed_file(project):
    lock = str(project / "assets.lock.json")
    fetch_assets.main(["--lock", lock])
    target = project / "static" / "vendor" / "lib" / "dist" / "lib.min.js"
    target.write_text("tampered")
    assert fetch_assets.main(["--lock", lock, "--check"]) == 1
    assert fetch_assets.main(["--lock", lock]) == 0
    assert target.read_bytes() == b"console.log('hi');"


def test_it_refuses_a_tarball_that_does_not_match_the_lock(project, capsys):
    data = json.loads((project / "assets.lock.json").read_text())
    data["packages"]["lib"]["integrity"] = sri(b"something else")
    (project / "assets.lock.json").write_text(json.dumps(data))

    assert fetch_assets.main(["--lock", str(project / "assets.lock.json")]) == 1

    assert "integrity mismatch" in capsys.readouterr().err
    assert not (project / "static" / "vendor" / "lib").exists()


def test_it_refuses_paths_outside_the_destination(project):
    data = json.loads((project / "assets.lock.json").read_text())
    data["packages"]["lib"]["files"][0]["path"] = "../../evil.js"
    (project / "assets.lock.json").write_text(json.dumps(data))
    assert fetch_assets.main(["--lock", str(project / "assets.lock.json")]) == 1


def test_the_lock_pins_registry_tarballs_with_integrity():
    lock = json.loads((ROOT / "assets.lock.json").read_text())
    names = set(lock["packages"])
    assert {"htmx.org", "chart.js"} <= names
    for name, spec in lock["packages"].items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", spec["version"]), name
        assert spec["resolved"] == (
            f"https://registry.npmjs.org/{name}/-/{name}-{spec['version']}.tgz"
        )
        assert spec["integrity"].startswith("sha512-")
        assert all(re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) for f in spec["files"])
    assert lock["packages"]["htmx.org"]["version"].startswith("2.")
    assert lock["packages"]["chart.js"]["version"].startswith("4.")


def test_the_pages_load_nothing_from_other_sites():
    remote = re.compile(r"""<(script|link|img|iframe)[^>]+(src|href)=["'](https?:)?//""", re.I)
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "templates").rglob("*.html")
        if remote.search(path.read_text())
    ]
    assert offenders == []
    for path in (ROOT / "static").glob("*.js"):
        assert "http://" not in path.read_text() and "https://" not in path.read_text()
