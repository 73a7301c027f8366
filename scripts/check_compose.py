"""Structural checks of docker-compose.yml that need no Docker engine (only PyYAML).

    .venv/bin/python scripts/check_compose.py [--file docker-compose.yml] [--root .]

Checks, after Compose-style ``${VAR:-default}`` interpolation:

* every service has a healthcheck, except the one-shot ``migrate`` service (which must not
  restart);
* every ``depends_on`` names a service, and ``service_healthy`` / ``service_completed_successfully``
  point at a service with a healthcheck / a one-shot service;
* every image is built from the repository's Dockerfile (``build: .``) or is an official image
  (no ``/`` in its name), always with an explicit tag that is not ``latest``;
* every ``python -m X``, ``python FILE``, ``uvicorn X:Y`` and ``celery -A X`` in a command,
  entrypoint or healthcheck (and the Dockerfile's CMD) names a module or file of the repository;
* the gateway's OUTBOUND_ALLOWED_NETWORKS covers every subnet the file declares, so that it may
  call the reference vendors on the private network;
* only the load balancer (an nginx or haproxy image) publishes a port, and its nginx
  configuration (mounted from the repository) proxies to an upstream whose servers are services
  of the file on the port their uvicorn listens on, passing WebSocket upgrades through.

Prints what it checked; exits 1 with one line per problem. The functions are importable (the
tests load this file with importlib).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shlex
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
ONE_SHOT_SERVICES = frozenset({"migrate"})
_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)
_APP_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class ComposeError(Exception):
    """The file cannot be read or interpolated at all."""


@dataclass
class Report:
    checked: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def extend(self, other: Report) -> None:
        self.checked.extend(other.checked)
        self.errors.extend(other.errors)


# --- loading ---------------------------------------------------------------------------


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Resolve ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?err}``
    and ``$$`` in every string of ``value``, the way Compose does."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("named")
        op, arg = match.group("op"), match.group("arg") or ""
        current = env.get(name)
        unset_or_empty = current is None or (current == "" and op is not None and op[0] == ":")
        if op in (":-", "-"):
            return arg if unset_or_empty else str(current)
        if op in (":?", "?"):
            if unset_or_empty:
                raise ComposeError(f"required variable {name} is missing: {arg or 'no message'}")
            return str(current)
        return "" if current is None else current

    return _INTERPOLATION.sub(replace, value)


def load_compose(path: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read a compose file, resolve its variables and check its outline."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ComposeError(f"{path}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ComposeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ComposeError(f"{path}: the top level must be a mapping")
    data = interpolate(raw, os.environ if env is None else env)
    services = data.get("services")
    if not isinstance(services, dict) or not services:
        raise ComposeError(f"{path}: no 'services' mapping")
    for name, service in services.items():
        if not isinstance(service, dict):
            raise ComposeError(f"{path}: service {name!r} must be a mapping")
    return data


def _services(compose: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield from compose["services"].items()


def _has_healthcheck(service: Mapping[str, Any]) -> bool:
    check = service.get("healthcheck")
    if not isinstance(check, dict) or check.get("disable"):
        return False
    test = check.get("test")
    if isinstance(test, list):
        return bool(test) and test[0] != "NONE"
    return isinstance(test, str) and bool(test.strip())


def _is_one_shot(name: str, service: Mapping[str, Any]) -> bool:
    return name in ONE_SHOT_SERVICES and str(service.get("restart", "no")) in ("no", "False")


# --- checks ----------------------------------------------------------------------------


def check_healthchecks(compose: Mapping[str, Any]) -> Report:
    """Every long-running service has a healthcheck; only the one-shot migrate has none."""
    report = Report()
    for name, service in _services(compose):
        if _has_healthcheck(service):
            report.checked.append(f"{name}: has a healthcheck")
        elif name in ONE_SHOT_SERVICES:
            if _is_one_shot(name, service):
                report.checked.append(f"{name}: one-shot (restart: no), no healthcheck needed")
            else:
                report.errors.append(
                    f'{name}: the one-shot service must have restart: "no" '
                    f"(it has {service.get('restart')!r}) or a healthcheck"
                )
        else:
            report.errors.append(f"{name}: no healthcheck (only the one-shot migrate may lack one)")
    return report


def check_depends_on(compose: Mapping[str, Any]) -> Report:
    """Dependencies exist and their conditions can be met."""
    report = Report()
    services = compose["services"]
    for name, service in _services(compose):
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {dep: {"condition": "service_started"} for dep in depends}
        for dep, spec in depends.items():
            condition = (spec or {}).get("condition", "service_started")
            target = services.get(dep)
            if target is None:
                report.errors.append(f"{name}: depends on {dep!r}, which is not a service")
            elif condition == "service_healthy" and not _has_healthcheck(target):
                report.errors.append(
                    f"{name}: waits for {dep} to be healthy, but it has no healthcheck"
                )
            elif condition == "service_completed_successfully" and not _is_one_shot(dep, target):
                report.errors.append(
                    f"{name}: waits for {dep} to complete, but {dep} is not a one-shot service"
                )
            elif condition not in (
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            ):
                report.errors.append(
                    f"{name}: unknown depends_on condition {condition!r} for {dep}"
                )
            else:
                report.checked.append(f"{name}: depends on {dep} ({condition})")
    return report


def _split_image(image: str) -> tuple[str, str | None]:
    """Return (name, tag) of an image reference; the tag is None when absent."""
    reference = image.split("@", 1)[0]
    last = reference.rsplit("/", 1)[-1]
    if ":" in last:
        return reference.rsplit(":", 1)[0], reference.rsplit(":", 1)[1]
    return reference, None


def check_images(compose: Mapping[str, Any], compose_dir: Path, root: Path) -> Report:
    """Built from the repo's Dockerfile, or an official image; explicit tags, never latest."""
    report = Report()
    root = root.resolve()
    for name, service in _services(compose):
        build = service.get("build")
        image = service.get("image")
        if build is not None:
            spec = {"context": build} if isinstance(build, str) else dict(build)
            context = (compose_dir / str(spec.get("context", "."))).resolve()
            dockerfile = str(spec.get("dockerfile", "Dockerfile"))
            if context != root:
                report.errors.append(
                    f"{name}: builds from {context}, not from the repository root {root}"
                )
            elif dockerfile != "Dockerfile" or not (root / "Dockerfile").is_file():
                report.errors.append(
                    f"{name}: must build the repository's Dockerfile ({dockerfile})"
                )
            else:
                report.checked.append(f"{name}: built from the repository's Dockerfile")
            if image is not None:
                _, tag = _split_image(str(image))
                if tag is None or tag == "latest":
                    report.errors.append(
                        f"{name}: tags the build as {image!r}: give it an explicit tag, not latest"
                    )
            continue
        if not image:
            report.errors.append(f"{name}: neither build nor image")
            continue
        image_name, tag = _split_image(str(image))
        if "/" in image_name:
            report.errors.append(
                f"{name}: image {image!r} is neither built from the Dockerfile nor an official "
                "image (official images have no '/' in their name)"
            )
        elif tag is None:
            report.errors.append(f"{name}: image {image!r} has no tag (that means latest): pin one")
        elif tag == "latest":
            report.errors.append(f"{name}: image {image!r} uses the latest tag: pin a version")
        else:
            report.checked.append(f"{name}: official image {image}")
    return report


def _argv(command: Any) -> list[str]:
    """A command as an argument list; shell strings are split like a shell would."""
    if command is None:
        return []
    if isinstance(command, list):
        if command and command[0] in ("CMD", "CMD-SHELL"):
            return _argv(command[1] if command[0] == "CMD-SHELL" else command[1:])
        return [str(part) for part in command]
    try:
        return shlex.split(str(command))
    except ValueError:
        return str(command).split()


def _module_exists(module: str, root: Path, *, runnable: bool = False) -> bool:
    """Whether ``module`` is a file of the repository; ``python -m`` needs a package's __main__."""
    path = root.joinpath(*module.split("."))
    package_file = path / ("__main__.py" if runnable else "__init__.py")
    return path.with_suffix(".py").is_file() or package_file.is_file()


def command_targets(argv: list[str]) -> list[tuple[str, str]]:
    """Return what a command runs from the repository: ("module" or "main module", dotted name)
    or ("file", path)."""
    targets: list[tuple[str, str]] = []
    for index, word in enumerate(argv):
        program = Path(word).name
        rest = argv[index + 1 :]
        if re.fullmatch(r"python(3(\.\d+)?)?", program) and rest:
            if rest[0] == "-m" and len(rest) > 1:
                targets.append(("main module", rest[1]))
            elif rest[0].endswith(".py"):
                targets.append(("file", rest[0]))
        elif program == "uvicorn":
            app = next((arg for arg in rest if _APP_REF.match(arg)), None)
            targets.append(("module", app.split(":", 1)[0] if app else ""))
        elif program == "celery":
            app = None
            for position, arg in enumerate(rest):
                if arg in ("-A", "--app") and position + 1 < len(rest):
                    app = rest[position + 1]
                elif arg.startswith("--app="):
                    app = arg.split("=", 1)[1]
                elif arg.startswith("-A") and len(arg) > 2:
                    app = arg[2:]
                if app:
                    break
            targets.append(("module", app.split(":", 1)[0] if app else ""))
    return targets


def check_argv(argv: list[str], root: Path, where: str) -> Report:
    report = Report()
    for kind, target in command_targets(argv):
        if not target:
            report.errors.append(f"{where}: {' '.join(argv[:3])}... names no application module")
        elif kind in ("module", "main module") and not _module_exists(
            target, root, runnable=kind == "main module"
        ):
            path = target.replace(".", "/")
            package_file = "__main__.py" if kind == "main module" else "__init__.py"
            report.errors.append(
                f"{where}: {kind} {target!r} does not exist in the repository "
                f"(no {path}.py nor {path}/{package_file})"
            )
        elif kind == "file" and not (root / target).is_file():
            report.errors.append(f"{where}: file {target!r} does not exist in the repository")
        else:
            report.checked.append(f"{where}: {kind} {target} exists")
    return report


def check_commands(compose: Mapping[str, Any], root: Path) -> Report:
    """Commands, entrypoints and healthchecks only run modules/files that exist."""
    report = Report()
    for name, service in _services(compose):
        for key in ("entrypoint", "command"):
            report.extend(check_argv(_argv(service.get(key)), root, f"{name} {key}"))
        health = service.get("healthcheck")
        if isinstance(health, dict):
            report.extend(check_argv(_argv(health.get("test")), root, f"{name} healthcheck"))
    return report


def dockerfile_cmd(dockerfile: Path) -> list[str] | None:
    """The last CMD of a Dockerfile as an argument list (exec or shell form)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    commands = [
        line.strip()[3:].strip()
        for line in text.splitlines()
        if line.strip().upper().startswith("CMD ")
    ]
    if not commands:
        return None
    try:
        parsed = json.loads(commands[-1])
    except json.JSONDecodeError:
        return shlex.split(commands[-1])
    return [str(part) for part in parsed] if isinstance(parsed, list) else None


def check_dockerfile(root: Path) -> Report:
    report = Report()
    path = root / "Dockerfile"
    if not path.is_file():
        report.errors.append("Dockerfile: missing at the repository root")
        return report
    cmd = dockerfile_cmd(path)
    if cmd is None:
        report.errors.append("Dockerfile: no CMD")
        return report
    report.extend(check_argv(cmd, root, "Dockerfile CMD"))
    return report


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def check_outbound_networks(compose: Mapping[str, Any]) -> Report:
    """The gateway (every service running uvicorn) may call into every declared subnet."""
    report = Report()
    subnets = []
    for net_name, network in (compose.get("networks") or {}).items():
        for config in ((network or {}).get("ipam") or {}).get("config") or []:
            if isinstance(config, dict) and config.get("subnet"):
                try:
                    subnets.append((net_name, ipaddress.ip_network(config["subnet"], strict=False)))
                except ValueError:
                    report.errors.append(f"network {net_name}: bad subnet {config['subnet']!r}")
    if not subnets:
        report.errors.append(
            "networks: no explicit subnet, so OUTBOUND_ALLOWED_NETWORKS cannot name the network "
            "of the reference vendors"
        )
        return report
    for name, service in _services(compose):
        if not any(Path(word).name == "uvicorn" for word in _argv(service.get("command"))):
            continue
        raw = _environment(service).get("OUTBOUND_ALLOWED_NETWORKS", "")
        try:
            allowed = [
                ipaddress.ip_network(item.strip(), strict=False)
                for item in raw.split(",")
                if item.strip()
            ]
        except ValueError as exc:
            report.errors.append(f"{name}: OUTBOUND_ALLOWED_NETWORKS is invalid: {exc}")
            continue
        for net_name, subnet in subnets:
            if any(subnet.version == net.version and subnet.subnet_of(net) for net in allowed):
                report.checked.append(f"{name}: may call into network {net_name} ({subnet})")
            else:
                report.errors.append(
                    f"{name}: OUTBOUND_ALLOWED_NETWORKS ({raw or 'unset'}) does not cover "
                    f"network {net_name} ({subnet}): the gateway could not reach the vendors"
                )
    return report


LOAD_BALANCER_IMAGES = ("nginx", "haproxy")
_NGINX_UPSTREAM = re.compile(r"upstream\s+([\w.-]+)\s*\{([^}]*)\}")
_NGINX_SERVER = re.compile(r"^\s*server\s+([\w.-]+):(\d+)", re.MULTILINE)
_NGINX_PROXY_PASS = re.compile(r"proxy_pass\s+https?://([\w.-]+)\s*;")


def _uvicorn_port(service: Mapping[str, Any]) -> int | None:
    argv = _argv(service.get("command"))
    if not any(Path(word).name == "uvicorn" for word in argv):
        return None
    for index, word in enumerate(argv):
        if word == "--port" and index + 1 < len(argv) and argv[index + 1].isdigit():
            return int(argv[index + 1])
        if word.startswith("--port=") and word[7:].isdigit():
            return int(word[7:])
    return 8000  # uvicorn's default


def _nginx_config(service: Mapping[str, Any], project_dir: Path) -> Path | None:
    for volume in service.get("volumes") or []:
        source, target = None, None
        if isinstance(volume, str) and ":" in volume:
            source, target = volume.split(":")[:2]
        elif isinstance(volume, dict) and volume.get("type", "bind") == "bind":
            source, target = volume.get("source"), volume.get("target")
        if source and target and str(target).startswith("/etc/nginx/"):
            return (project_dir / str(source)).resolve()
    return None


def check_load_balancer(compose: Mapping[str, Any], project_dir: Path) -> Report:
    """Only the load balancer publishes a port; its nginx config routes to the web service."""
    report = Report()
    balancers = []
    for name, service in _services(compose):
        image, _ = _split_image(str(service.get("image") or ""))
        is_balancer = image in LOAD_BALANCER_IMAGES
        if is_balancer:
            balancers.append((name, service))
        if service.get("ports") and not is_balancer:
            report.errors.append(
                f"{name}: publishes a port; only the load balancer may (put it behind the lb)"
            )
        elif service.get("ports"):
            report.checked.append(f"{name}: the load balancer publishes the only port(s)")
    if not balancers:
        report.errors.append("no load balancer service (an nginx or haproxy image)")
    for name, service in balancers:
        image, _ = _split_image(str(service.get("image")))
        if image != "nginx":
            report.checked.append(f"{name}: {image} configuration not inspected")
            continue
        config = _nginx_config(service, project_dir)
        if config is None or not config.is_file():
            report.errors.append(f"{name}: mounts no nginx configuration from the repository")
            continue
        text = re.sub(r"#[^\n]*", "", config.read_text())
        upstreams = {m.group(1): m.group(2) for m in _NGINX_UPSTREAM.finditer(text)}
        targets = _NGINX_PROXY_PASS.findall(text)
        if not targets:
            report.errors.append(f"{name}: {config.name} has no proxy_pass")
        for target in targets:
            servers = _NGINX_SERVER.findall(upstreams.get(target, "")) or (
                [] if target in upstreams else [(target, "80")]
            )
            if not servers:
                report.errors.append(f"{name}: upstream {target} has no servers")
            for host, port in servers:
                backend = compose["services"].get(host)
                listens = _uvicorn_port(backend) if isinstance(backend, dict) else None
                if backend is None:
                    report.errors.append(
                        f"{name}: {config.name} proxies to {host}:{port}, which is not a service"
                    )
                elif listens != int(port):
                    report.errors.append(
                        f"{name}: {config.name} proxies to {host}:{port}, but {host} does not "
                        f"serve uvicorn on port {port}"
                    )
                else:
                    report.checked.append(f"{name}: {config.name} routes to {host}:{port}")
        upgrade = re.search(r"proxy_set_header\s+Upgrade\s+\$http_upgrade", text)
        connection = re.search(r"proxy_set_header\s+Connection\s+\S+", text)
        if upgrade and connection and "proxy_http_version 1.1" in text:
            report.checked.append(f"{name}: passes WebSocket upgrades through")
        else:
            report.errors.append(
                f"{name}: {config.name} does not pass WebSocket upgrades through (HTTP/1.1 and "
                "the Upgrade and Connection headers)"
            )
    return report


def run_checks(
    path: Path,
    root: Path | None = None,
    env: Mapping[str, str] | None = None,
    project_dir: Path | None = None,
) -> Report:
    """Run every check on one compose file; problems are in ``Report.errors``.

    ``root`` is the repository (modules, Dockerfile); ``project_dir`` is what relative build
    contexts are resolved against, the compose file's folder unless given (like Compose's
    ``--project-directory``); ``env`` defaults to the process environment.
    """
    path = Path(path)
    root = Path(root) if root is not None else REPO_ROOT
    project_dir = Path(project_dir) if project_dir is not None else path.resolve().parent
    report = Report()
    try:
        compose = load_compose(path, env)
    except ComposeError as exc:
        report.errors.append(str(exc))
        return report
    report.checked.append(f"{path}: {len(compose['services'])} services")
    report.extend(check_healthchecks(compose))
    report.extend(check_depends_on(compose))
    report.extend(check_images(compose, project_dir, root))
    report.extend(check_commands(compose, root))
    report.extend(check_dockerfile(root))
    report.extend(check_outbound_networks(compose))
    report.extend(check_load_balancer(compose, project_dir))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--file", type=Path, default=REPO_ROOT / "docker-compose.yml")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="the repository root")
    args = parser.parse_args(argv)
    report = run_checks(args.file, args.root)
    for line in report.checked:
        print(f"ok    {line}")
    for line in report.errors:
        print(f"FAIL  {line}", file=sys.stderr)
    if report.errors:
        print(f"check_compose: {len(report.errors)} problem(s) in {args.file}", file=sys.stderr)
        return 1
    print(f"check_compose: {args.file} passed {len(report.checked)} checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
