"""Serve a real local chat model over llama.cpp's OpenAI-compatible HTTP server.

    python -m vendors.reference.llm --model smollm2 --host 127.0.0.1 --port 8101
    python -m vendors.reference.llm --model gemma --port 0 --api-key "$SECRET"

``xllamacpp`` runs llama.cpp's own server (the one behind ``llama-server``) inside this
process: ``/v1/chat/completions`` (streaming, ``stream_options.include_usage``, logprobs),
``/v1/completions``, ``/v1/models`` and ``/health``, with continuous batching over
``--parallel`` slots. It has no command line of its own, hence this launcher.

Once ``GET /health`` answers, one line ``READY http://host:port`` goes to stdout (with the
real port when ``--port 0`` asked the OS for a free one). The process then serves until
SIGINT or SIGTERM and exits with status 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Final

import httpx

from vendors.reference.models import (
    GEMMA_MODEL_NAME,
    SMOLLM2_MODEL_NAME,
    gemma_path,
    smollm2_path,
)

if TYPE_CHECKING:
    import xllamacpp

#: Gemma 3's turn format, for the base model whose GGUF carries no chat template.
#: A bare template *name* ("gemma") made llama.cpp build a 3-token prompt, so this is a real
#: Jinja template. It is lenient on purpose: any non-assistant role (system, tool, developer)
#: becomes a user turn, a leading system message is folded into the first user turn as Gemma
#: does (or stands as the only turn), content may be a string or a list of OpenAI text parts,
#: and roles need not alternate.
GEMMA_CHAT_TEMPLATE: Final = """{{ bos_token }}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- if messages[0]['content'] is string -%}
{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
{%- elif messages[0]['content'] and messages[0]['content'][0]['type'] == 'text' -%}
{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
{%- else -%}
{%- set first_user_prefix = '' -%}
{%- endif -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set first_user_prefix = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- if not loop_messages and first_user_prefix -%}
{{ '<start_of_turn>user\\n' + (first_user_prefix | trim) + '<end_of_turn>\\n' }}
{%- endif -%}
{%- for message in loop_messages -%}
{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}
{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}
{%- if message['content'] is string -%}
{{ message['content'] | trim }}
{%- elif message['content'] is iterable -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<start_of_turn>model\\n' }}
{%- endif -%}
"""

#: llama.cpp log thresholds (``common_log_set_verbosity_thold``): 1 keeps errors only,
#: 3 adds per-request info lines (slot timings etc.), which flood logs under load.
QUIET_VERBOSITY: Final = 1
VERBOSE_VERBOSITY: Final = 3

#: llama.cpp keeps a host-memory prompt cache that defaults to 8 GiB; a reference vendor on
#: a shared 2-core dev box needs a small one, enough to reuse a few recent prompts.
PROMPT_CACHE_MIB: Final = 256


@dataclass(frozen=True)
class ChatModel:
    """A chat model this launcher can serve."""

    name: str
    """The default alias announced in ``/v1/models`` and echoed in responses."""
    locate: Callable[[], Path]
    """Returns the GGUF file (assembling it first, for Gemma)."""
    chat_template: str | None
    """A Jinja chat template, or None to use the one inside the GGUF."""


CHAT_MODELS: Final[dict[str, ChatModel]] = {
    "smollm2": ChatModel(name=SMOLLM2_MODEL_NAME, locate=smollm2_path, chat_template=None),
    "gemma": ChatModel(name=GEMMA_MODEL_NAME, locate=gemma_path, chat_template=GEMMA_CHAT_TEMPLATE),
}


def build_params(
    *,
    model: str,
    host: str = "127.0.0.1",
    port: int = 0,
    parallel: int = 2,
    ctx: int = 2048,
    alias: str | None = None,
    api_key: str | None = None,
    threads: int | None = None,
    verbose: bool = False,
) -> xllamacpp.CommonParams:
    """Build the ``xllamacpp.CommonParams`` for one reference chat server.

    ``ctx`` is the *total* context, shared by the ``parallel`` slots (llama.cpp's ``-c``):
    each slot gets ``ctx // parallel`` tokens.
    """
    import xllamacpp  # deferred: a 100 MB native module, only the server process needs it

    spec = CHAT_MODELS[model]
    params = xllamacpp.CommonParams()
    params.model.path = str(spec.locate())
    params.hostnames = [host]
    params.port = port
    params.n_parallel = parallel
    params.n_ctx = ctx
    params.model_alias = {alias or spec.name}
    params.use_jinja = True
    if spec.chat_template is not None:
        params.chat_template = spec.chat_template
    if api_key:
        # llama.cpp checks "Authorization: Bearer <key>" (or X-Api-Key) on every route but
        # /health and /v1/health, answering 401 with an OpenAI-shaped error otherwise.
        params.api_keys = [api_key]
    if threads is not None:
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
    params.verbosity = VERBOSE_VERBOSITY if verbose else QUIET_VERBOSITY
    params.cache_ram_mib = PROMPT_CACHE_MIB
    params.ui = False  # a vendor endpoint serves the API only, not llama.cpp's web UI
    params.offline = True  # never try to fetch anything from a model hub
    return params


def wait_until_healthy(base_url: str, timeout: float = 30.0) -> None:
    """Poll ``GET /health`` until it answers 200, or raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while True:
            try:
                if client.get(f"{base_url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base_url}/health did not answer 200 within {timeout}s")
            time.sleep(0.05)


def serve_until_stopped(params: xllamacpp.CommonParams, *, exit_with_parent: bool = False) -> None:
    """Start the server, print the READY line, and block until SIGINT/SIGTERM.

    With ``exit_with_parent`` the server also stops when the process that started it dies
    (re-parenting changes ``getppid``), so a crashed test run or dev runner leaves no
    orphan model servers holding memory and ports.
    """
    import xllamacpp

    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    parent = os.getppid()

    # Loads the model and starts listening before it returns; raises RuntimeError
    # ("Failed to init server") on a bad model file or a port in use, with the reason
    # logged by llama.cpp on stderr.
    server = xllamacpp.Server(params)
    base_url = str(server.listening_address).rstrip("/")
    wait_until_healthy(base_url)
    print(f"READY {base_url}", flush=True)

    while not stop.wait(0.5):
        if exit_with_parent and os.getppid() != parent:
            break
    # Dropping the last reference runs ~Server, which stops the HTTP loop and frees the model.
    del server


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the launcher's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m vendors.reference.llm",
        description="Serve a real local chat model (llama.cpp) over an OpenAI-compatible API.",
    )
    parser.add_argument("--model", choices=sorted(CHAT_MODELS), required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--parallel", type=int, default=4, help="slots (concurrent requests)")
    parser.add_argument(
        "--ctx", type=int, default=4096, help="total context in tokens, shared by the slots"
    )
    parser.add_argument("--alias", default=None, help="model name to announce")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("REFERENCE_VENDOR_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' (default: $REFERENCE_VENDOR_API_KEY)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for inference")
    parser.add_argument("--verbose", action="store_true", help="keep llama.cpp's info logging")
    parser.add_argument(
        "--exit-with-parent", action="store_true", help="stop when the parent process dies"
    )
    args = parser.parse_args(argv)
    if args.parallel < 1 or args.ctx < 256 or args.ctx < args.parallel * 128:
        parser.error("--parallel must be >= 1 and --ctx >= max(256, 128 * parallel)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the launcher; return the process exit status."""
    args = parse_args(argv)
    params = build_params(
        model=args.model,
        host=args.host,
        port=args.port,
        parallel=args.parallel,
        ctx=args.ctx,
        alias=args.alias,
        api_key=args.api_key,
        threads=args.threads,
        verbose=args.verbose,
    )
    try:
        serve_until_stopped(params, exit_with_parent=args.exit_with_parent)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
