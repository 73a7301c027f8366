"""`make run`: migrate, start the reference vendors, seed the demo, start every process.

Runs inside ``marketplace.devenv`` (which provides PostgreSQL and Redis) and supervises
its children: the ASGI server (Django + gateway), a Celery worker, Celery beat and three
reference vendors serving real local models. Ctrl-C (or SIGTERM) stops them all; if one
dies, the others are stopped too and the exit code says so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from marketplace.devenv import ROOT, free_port, wait_for_port


def _port(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value:
        return int(value)
    try:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", default))
        return default
    except OSError:
        return free_port()


def _manage(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "manage.py", *args], env=env, cwd=ROOT, check=True)  # noqa: S603


def _banner(web: int, creds_path: Path, vendors: dict[str, str]) -> str:
    try:
        creds = json.loads(creds_path.read_text())
    except (OSError, ValueError):
        creds = {}
    key = creds.get("customer API key", "<your API key>")
    base = f"http://127.0.0.1:{web}"
    lines = [
        "",
        "Switchyard is running.",
        f"  Catalog and console   {base}/",
        f"  Admin                 {base}/admin/",
        f"  Gateway (OpenAI API)  {base}/v1",
        "  Reference vendors     " + ", ".join(f"{k} {v}" for k, v in vendors.items()),
        "",
        "Demo logins (passwords were printed when the demo was first seeded; they are kept in",
        f"  {creds_path}):",
    ]
    lines += [f"  {label:<30} {value}" for label, value in creds.items() if "password" in label]
    lines += [
        "",
        "Try it:",
        f"  curl {base}/v1/chat/completions \\",
        f"    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\",
        '    -d \'{"model": "tag:sql", "max_tokens": 32, '
        '"messages": [{"role": "user", "content": "Write a SQL query counting users."}]}\'',
        "",
        "  python -c \"from openai import OpenAI; c = OpenAI(base_url='" + base + "/v1', "
        f"api_key='{key}'); print(c.chat.completions.create(model='smol-labs/smollm2-135m', "
        "max_tokens=32, messages=[{'role': 'user', 'content': 'Hello!'}])"
        '.choices[0].message.content)"',
        "",
        "Press Ctrl-C to stop everything.",
        "",
    ]
    return "\n".join(lines)


def run_all(env: dict[str, str], extra_args: list[str]) -> int:
    from vendors.reference.launch import start_reference_vendor

    env = dict(env)
    env.setdefault("DEBUG", "1")
    env.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
    # The reference vendors listen on loopback; a production deployment allows nothing.
    env.setdefault("OUTBOUND_ALLOWED_NETWORKS", "127.0.0.0/8,::1/128")
    env.setdefault("ACCOUNT_EMAIL_VERIFICATION", "optional")
    os.environ.update({k: env[k] for k in ("DATABASE_URL", "REDIS_URL")})
    var_dir = Path(env.get("SWITCHYARD_VAR_DIR", ROOT / "var"))
    log_dir = var_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    print("Migrating the database...", flush=True)
    _manage(env, "migrate", "--noinput", "-v", "0")

    print("Starting the reference vendors (real local models)...", flush=True)
    vendors = []
    try:
        smol = start_reference_vendor(
            "smollm2",
            port=_port("SMOLLM2_PORT", 8101),
            parallel=4,
            ctx=8192,
            log_path=log_dir / "vendor-smollm2.log",
        )
        vendors.append(smol)
        gemma = start_reference_vendor(
            "gemma",
            port=_port("GEMMA_PORT", 8102),
            parallel=2,
            ctx=4096,
            log_path=log_dir / "vendor-gemma.log",
        )
        vendors.append(gemma)
        minilm = start_reference_vendor(
            "minilm", port=_port("MINILM_PORT", 8103), log_path=log_dir / "vendor-minilm.log"
        )
        vendors.append(minilm)
    except Exception:
        for vendor in vendors:
            vendor.stop()
        raise

    # Example prompts per capability tag: what `model: "auto"` classifies against.
    _manage(env, "load_tag_examples", "-v", "0")
    creds_path = var_dir / "demo-credentials.json"
    _manage(
        env,
        "seed_demo",
        "--chat-url",
        smol.base_url,
        "--chat-model",
        smol.model,
        "--weak-url",
        gemma.base_url,
        "--weak-model",
        gemma.model,
        "--credentials-file",
        str(creds_path),
    )

    web_port = _port("PORT", 8000)
    commands = {
        "web": [
            sys.executable,
            "-m",
            "uvicorn",
            "marketplace.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(web_port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            # The client IP is found by marketplace.client_ip (TRUSTED_PROXIES), not uvicorn.
            "--no-proxy-headers",
            "--timeout-graceful-shutdown",
            "30",
            *extra_args,
        ],
        "worker": [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "marketplace",
            "worker",
            "--loglevel",
            "INFO",
            "-Q",
            "ingest,probes,payments,default",
            "--concurrency",
            "2",
        ],
        "beat": [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "marketplace",
            "beat",
            "--loglevel",
            "INFO",
            "--schedule",
            str(var_dir / "celerybeat-schedule"),
        ],
    }
    children: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    exit_code = 0
    try:
        for name, cmd in commands.items():
            log = (log_dir / f"{name}.log").open("ab")
            children[name] = subprocess.Popen(  # noqa: S603 - our own fixed commands
                cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        wait_for_port("127.0.0.1", web_port, timeout=60)
        print(
            _banner(
                web_port,
                creds_path,
                {"smollm2": smol.base_url, "gemma": gemma.base_url, "minilm": minilm.base_url},
            ),
            flush=True,
        )
        print(f"Logs are in {log_dir}/", flush=True)
        while not stopping:
            for name, child in children.items():
                if child.poll() is not None:
                    print(
                        f"{name} exited with {child.returncode}; stopping everything "
                        f"(see {log_dir / (name + '.log')})",
                        flush=True,
                    )
                    exit_code = child.returncode or 1
                    stopping = True
            time.sleep(0.2)
    finally:
        print("Stopping...", flush=True)
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in children.values():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
        for vendor in vendors:
            vendor.stop()
        print("Stopped.", flush=True)
    return exit_code
