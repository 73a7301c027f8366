"""Fetch the front-end assets pinned in ``assets.lock.json`` into ``static/vendor/``.

    .venv/bin/python scripts/fetch_assets.py            # download what is missing or wrong
    .venv/bin/python scripts/fetch_assets.py --check    # exit 1 if anything is missing or wrong
    .venv/bin/python scripts/fetch_assets.py --relock   # re-read versions from npm (needs npm)

Only Python is needed to install: each package's tarball is downloaded from the npm
registry with urllib, checked against the lock's ``integrity`` (the registry's
``dist.integrity``, a sha512 Subresource-Integrity string), and only the listed files are
written, each checked against its own sha256 from the lock. When every listed file is
present with the right hash nothing is downloaded, so a second run is a no-op and works
offline. The pages never fetch anything from the internet at run time.

``--relock`` is for developers bumping a version (edit ``version`` in the lock, then run
it): it asks ``npm view`` for the tarball URL and integrity, downloads and verifies the
tarball and records the sha256 of each listed file.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LOCK = ROOT / "assets.lock.json"
MAX_TARBALL_BYTES = 50 * 1024 * 1024
TIMEOUT_SECONDS = 60
REGISTRY = "https://registry.npmjs.org/"


class AssetError(Exception):
    """The lock is invalid, a download failed or a hash does not match."""


@dataclass(frozen=True)
class AssetFile:
    path: str  # inside the package, e.g. "dist/htmx.min.js"
    sha256: str  # hex

    def target(self, destination: Path, package: str) -> Path:
        return destination / package / self.path


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    resolved: str
    integrity: str
    files: tuple[AssetFile, ...]


@dataclass(frozen=True)
class Lock:
    destination: Path
    packages: tuple[Package, ...]


def _safe_relative(path: str) -> str:
    parts = Path(path).parts
    if not parts or Path(path).is_absolute() or ".." in parts:
        raise AssetError(f"{path!r} is not a safe relative path")
    return path


def load_lock(path: Path = DEFAULT_LOCK, root: Path = ROOT) -> Lock:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AssetError(f"cannot read {path}: {exc}") from None
    packages = []
    for name, spec in data.get("packages", {}).items():
        try:
            files = tuple(
                AssetFile(path=_safe_relative(f["path"]), sha256=f.get("sha256", ""))
                for f in spec["files"]
            )
            packages.append(
                Package(
                    name=_safe_relative(name),
                    version=spec["version"],
                    resolved=spec["resolved"],
                    integrity=spec["integrity"],
                    files=files,
                )
            )
        except (KeyError, TypeError) as exc:
            raise AssetError(f"{path}: package {name!r} lacks {exc}") from None
    destination = root / _safe_relative(data.get("destination", "static/vendor"))
    return Lock(destination=destination, packages=tuple(packages))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_integrity(data: bytes, integrity: str) -> None:
    """Check ``data`` against a Subresource-Integrity string (``sha512-<base64>``)."""
    candidates = [token for token in integrity.split() if token.startswith("sha512-")]
    if not candidates:
        raise AssetError(f"the lock's integrity {integrity!r} has no sha512 value")
    actual = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if not any(token.removeprefix("sha512-") == actual for token in candidates):
        raise AssetError(f"integrity mismatch: expected {candidates[0]}, got sha512-{actual}")


def package_is_current(package: Package, destination: Path) -> bool:
    for asset in package.files:
        target = asset.target(destination, package.name)
        if not asset.sha256 or not target.is_file():
            return False
        if sha256_hex(target.read_bytes()) != asset.sha256:
            return False
    return True


def download(url: str) -> bytes:
    if not url.startswith(("https://", "file://")):
        raise AssetError(f"refusing to download {url!r}: only https (or file://) URLs")
    request = urllib.request.Request(url, headers={"User-Agent": "switchyard-fetch-assets"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:  # noqa: S310
            data = response.read(MAX_TARBALL_BYTES + 1)
    except OSError as exc:
        raise AssetError(f"cannot download {url}: {exc}") from None
    if len(data) > MAX_TARBALL_BYTES:
        raise AssetError(f"{url} is larger than {MAX_TARBALL_BYTES} bytes")
    return data


def read_members(tarball: bytes, wanted: list[str]) -> dict[str, bytes]:
    """The contents of the ``wanted`` files of an npm tarball (paths without ``package/``)."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
            for member in archive:
                # npm tarballs put everything under one top folder, usually "package/".
                _, _, inner = member.name.partition("/")
                if inner in wanted and inner not in found:
                    if not member.isfile():
                        raise AssetError(f"{member.name} is not a regular file")
                    handle = archive.extractfile(member)
                    if handle is None:
                        raise AssetError(f"cannot read {member.name}")
                    found[inner] = handle.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise AssetError(f"the tarball cannot be read: {exc}") from None
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise AssetError(f"the tarball lacks {', '.join(missing)}")
    return found


def _write_atomically(target: Path, content: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(content)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; static files are read by others
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def install_package(package: Package, destination: Path) -> None:
    """Download, verify and extract the listed files of one package."""
    tarball = download(package.resolved)
    verify_integrity(tarball, package.integrity)
    contents = read_members(tarball, [f.path for f in package.files])
    for asset in package.files:
        content = contents[asset.path]
        if sha256_hex(content) != asset.sha256:
            raise AssetError(
                f"{package.name}/{asset.path}: sha256 {sha256_hex(content)} differs from the lock"
            )
    for asset in package.files:
        _write_atomically(asset.target(destination, package.name), contents[asset.path])


def ensure(lock: Lock, *, log: Any = print) -> int:
    """Make ``lock.destination`` hold every listed file; returns how many packages changed."""
    changed = 0
    for package in lock.packages:
        if package_is_current(package, lock.destination):
            continue
        log(f"fetch_assets: {package.name}@{package.version} from {package.resolved}")
        install_package(package, lock.destination)
        changed += 1
    return changed


def relock(path: Path) -> None:
    """Refresh tarball URLs, integrity and file hashes from the registry (needs npm)."""
    data = json.loads(path.read_text())
    npm = shutil.which("npm")
    if npm is None:
        raise AssetError("--relock needs npm on the PATH")
    for name, spec in data["packages"].items():
        spec_version = f"{name}@{spec['version']}"
        out = subprocess.run(  # noqa: S603
            [npm, "view", spec_version, "dist.integrity", "dist.tarball", "--json"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        dist = json.loads(out)
        spec["resolved"] = dist["dist.tarball"]
        spec["integrity"] = dist["dist.integrity"]
        tarball = download(spec["resolved"])
        verify_integrity(tarball, spec["integrity"])
        contents = read_members(tarball, [f["path"] for f in spec["files"]])
        for entry in spec["files"]:
            entry["sha256"] = sha256_hex(contents[entry["path"]])
        print(f"fetch_assets: locked {spec_version}")
    path.write_text(json.dumps(data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", type=Path, default=DEFAULT_LOCK)
    parser.add_argument("--check", action="store_true", help="verify only, download nothing")
    parser.add_argument("--relock", action="store_true", help="refresh the lock with npm view")
    args = parser.parse_args(argv)
    try:
        if args.relock:
            relock(args.lock)
        lock = load_lock(args.lock, root=args.lock.resolve().parent)
        if args.check:
            stale = [p.name for p in lock.packages if not package_is_current(p, lock.destination)]
            if stale:
                print(f"fetch_assets: missing or changed: {', '.join(stale)}", file=sys.stderr)
                return 1
            return 0
        ensure(lock)
    except AssetError as exc:
        print(f"fetch_assets: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
