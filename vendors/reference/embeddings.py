"""all-MiniLM-L6-v2 sentence embeddings: a reusable encoder and an OpenAI-compatible server.

    python -m vendors.reference.embeddings --host 127.0.0.1 --port 8103 [--api-key KEY]

The server answers ``POST /v1/embeddings`` (``input``: a string or a list of up to 256
strings; ``encoding_format`` ``float`` or ``base64``), ``GET /v1/models`` and
``GET /health``, and prints ``READY http://host:port`` once it listens. Bad input gets a
400 with an OpenAI-shaped ``{"error": {"message", "type", "param", "code"}}`` body.

:class:`MiniLMEncoder` is the model itself (int8 ONNX on onnxruntime, no torch), also used
in-process by auto-routing and classification.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hmac
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import orjson
from aiohttp import web
from tokenizers import Tokenizer

from vendors.reference.models import MINILM_MODEL_NAME, minilm_paths

#: Width of all-MiniLM-L6-v2's sentence vectors.
EMBEDDING_DIMENSIONS: Final = 384
#: Longest input in tokens (with [CLS]/[SEP]); longer texts are truncated, as
#: sentence-transformers does for this model.
MAX_TOKENS: Final = 256
#: Most strings one request may carry.
MAX_INPUTS: Final = 256
#: Largest request body accepted (256 long strings fit comfortably).
MAX_BODY_BYTES: Final = 8 * 1024 * 1024
PAD_ID: Final = 0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class MiniLMEncoder:
    """all-MiniLM-L6-v2 (int8 ONNX) sentence encoder: texts in, L2-normalised 384-d rows out.

    The pipeline matches sentence-transformers: WordPiece tokenisation truncated to 256
    tokens, the transformer, mean pooling over the attention mask, L2 normalisation; the
    int8 model's vectors have cosine >= 0.998 to the fp32 model's. Cosine similarity of two
    outputs is therefore their dot product. Thread-safe: ``InferenceSession.run`` may be
    called concurrently and the tokenizer is configured once here.
    """

    dimensions: int = EMBEDDING_DIMENSIONS

    def __init__(
        self,
        model_path: Path | None = None,
        tokenizer_path: Path | None = None,
        *,
        threads: int | None = None,
        batch_size: int = 32,
    ) -> None:
        """Load the model (about 0.4 s). Paths default to the installed packages' files.

        ``threads`` caps onnxruntime's intra-op threads (default: one per core).
        """
        if model_path is None or tokenizer_path is None:
            default_model, default_tokenizer = minilm_paths()
            model_path = model_path or default_model
            tokenizer_path = tokenizer_path or default_tokenizer
        self.batch_size = batch_size

        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # The shipped tokenizer.json pads and truncates to a fixed 128; we want the model's
        # real limit and padding only to the longest text of each batch (less wasted compute).
        self._tokenizer.enable_truncation(max_length=MAX_TOKENS)
        self._tokenizer.enable_padding(pad_id=PAD_ID, pad_token="[PAD]")  # noqa: S106

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT warns about unused initialisers
        if threads is not None:
            options.intra_op_num_threads = threads
        self._session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input_names = {i.name for i in self._session.get_inputs()}

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Return one unit-length 384-d float32 row per text, in order."""
        vectors, _ = self.encode_with_token_counts(texts)
        return vectors

    def encode_with_token_counts(
        self, texts: Sequence[str]
    ) -> tuple[npt.NDArray[np.float32], list[int]]:
        """Return the vectors and each text's token count (after truncation, with specials)."""
        vectors = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        counts = [0] * len(texts)
        # Batching texts of similar length keeps padding (wasted compute) small.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            batch_vectors, batch_counts = self._encode_batch([texts[i] for i in batch])
            vectors[batch] = batch_vectors
            for i, count in zip(batch, batch_counts, strict=True):
                counts[i] = count
        return vectors, counts

    def _encode_batch(self, texts: list[str]) -> tuple[npt.NDArray[np.float32], list[int]]:
        encodings = self._tokenizer.encode_batch(texts)
        input_ids = np.array([e.ids for e in encodings], dtype=np.int64)
        attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        (hidden,) = self._session.run(["last_hidden_state"], feeds)

        mask = attention_mask[:, :, None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        normalised = (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
        return normalised, [int(n) for n in attention_mask.sum(axis=1)]


# --- HTTP server -----------------------------------------------------------------------------


class RequestError(Exception):
    """A client error, answered as an OpenAI-shaped error object."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        code: str = "invalid_value",
        param: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param
        self.error_type = error_type


def error_response(error: RequestError) -> web.Response:
    """Render ``error`` as ``{"error": {"message", "type", "param", "code"}}``."""
    body = {
        "error": {
            "message": error.message,
            "type": error.error_type,
            "param": error.param,
            "code": error.code,
        }
    }
    return _json(body, status=error.status)


def _json(body: Any, status: int = 200) -> web.Response:
    # orjson serialises numpy rows directly and ~10x faster than json for 256 x 384 floats.
    return web.Response(
        body=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
        status=status,
        content_type="application/json",
    )


ENCODER_KEY: Final = web.AppKey("encoder", MiniLMEncoder)
EXECUTOR_KEY: Final = web.AppKey("executor", ThreadPoolExecutor)
MODEL_NAME_KEY: Final = web.AppKey("model_name", str)
API_KEY_KEY: Final = web.AppKey("api_key", str)
CREATED_KEY: Final = web.AppKey("created", int)

PUBLIC_PATHS: Final = frozenset({"/health", "/v1/health"})


@web.middleware
async def errors_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Check the bearer key (like llama.cpp: every route but /health) and shape errors."""
    api_key = request.app[API_KEY_KEY]
    try:
        if api_key and request.path not in PUBLIC_PATHS:
            header = request.headers.get("Authorization", "")
            given = header[7:] if header[:7].lower() == "bearer " else ""
            given = given or request.headers.get("X-Api-Key", "")
            if not _constant_time_equal(given, api_key):
                raise RequestError(
                    "Invalid API Key",
                    status=401,
                    code="invalid_api_key",
                    error_type="authentication_error",
                )
        return await handler(request)
    except RequestError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        # 404/405 from routing, 413 from an oversized body: keep the OpenAI error shape.
        if exc.status < 400:
            raise
        return error_response(
            RequestError(
                exc.reason,
                status=exc.status,
                code=exc.reason.lower().replace(" ", "_"),
                error_type="not_found_error" if exc.status == 404 else "invalid_request_error",
            )
        )


def _constant_time_equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def parse_embeddings_request(body: Any, model_name: str) -> tuple[list[str], str]:
    """Validate an embeddings request body; return ``(texts, encoding_format)``.

    Raises :class:`RequestError` for anything the OpenAI API would reject, and for token-id
    arrays, which this server does not accept.
    """
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if model is not None and model != model_name:
        raise RequestError(
            f"The model {model!r} does not exist; this server serves {model_name!r}.",
            status=404,
            code="model_not_found",
            param="model",
        )
    if "input" not in body or body["input"] is None:
        raise RequestError(
            "Missing required parameter: 'input'.", code="missing_required_parameter", param="input"
        )
    raw = body["input"]
    texts: list[str]
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list):
        if not raw:
            raise RequestError("'input' must not be an empty list.", param="input")
        if len(raw) > MAX_INPUTS:
            raise RequestError(
                f"'input' has {len(raw)} items; at most {MAX_INPUTS} are allowed per request.",
                param="input",
            )
        if not all(isinstance(item, str) for item in raw):
            raise RequestError(
                "'input' must be a string or a list of strings (token arrays are not "
                "supported by this server).",
                code="invalid_type",
                param="input",
            )
        texts = list(raw)
    else:
        raise RequestError(
            "'input' must be a string or a list of strings.", code="invalid_type", param="input"
        )
    if any(not text for text in texts):
        raise RequestError("'input' must not contain empty strings.", param="input")

    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise RequestError(
            "'encoding_format' must be 'float' or 'base64'.", param="encoding_format"
        )
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != EMBEDDING_DIMENSIONS:
        raise RequestError(
            f"This model only produces {EMBEDDING_DIMENSIONS}-dimensional embeddings.",
            param="dimensions",
        )
    return texts, encoding_format


async def handle_embeddings(request: web.Request) -> web.Response:
    """``POST /v1/embeddings``: OpenAI-compatible sentence embeddings."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise RequestError(
            f"The request body is not valid JSON: {exc}", code="invalid_json"
        ) from exc
    model_name = request.app[MODEL_NAME_KEY]
    texts, encoding_format = parse_embeddings_request(body, model_name)

    # onnxruntime releases the GIL: run it on a worker thread so /health and new
    # connections stay responsive while a large batch is being encoded.
    loop = asyncio.get_running_loop()
    encoder = request.app[ENCODER_KEY]
    vectors, counts = await loop.run_in_executor(
        request.app[EXECUTOR_KEY], encoder.encode_with_token_counts, texts
    )
    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": (
                base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
                if encoding_format == "base64"
                else vector
            ),
        }
        for index, vector in enumerate(vectors)
    ]
    tokens = sum(counts)
    return _json(
        {
            "object": "list",
            "data": data,
            "model": model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


async def handle_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the one model this server serves."""
    return _json(
        {
            "object": "list",
            "data": [
                {
                    "id": request.app[MODEL_NAME_KEY],
                    "object": "model",
                    "created": request.app[CREATED_KEY],
                    "owned_by": "switchyard-reference",
                }
            ],
        }
    )


async def handle_health(request: web.Request) -> web.Response:
    """``GET /health``: 200 once the model is loaded (it is loaded before listening)."""
    return _json({"status": "ok"})


def create_app(
    encoder: MiniLMEncoder, *, model_name: str = MINILM_MODEL_NAME, api_key: str | None = None
) -> web.Application:
    """Build the aiohttp application around a loaded encoder."""
    app = web.Application(middlewares=[errors_and_auth], client_max_size=MAX_BODY_BYTES)
    app[ENCODER_KEY] = encoder
    # One worker: requests queue for the model instead of oversubscribing two cores.
    app[EXECUTOR_KEY] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minilm")
    app[MODEL_NAME_KEY] = model_name
    app[API_KEY_KEY] = api_key or ""
    app[CREATED_KEY] = int(time.time())
    app.router.add_post("/v1/embeddings", handle_embeddings)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/v1/health", handle_health)

    async def shutdown_executor(app: web.Application) -> None:
        app[EXECUTOR_KEY].shutdown(wait=True)

    app.on_cleanup.append(shutdown_executor)
    return app


async def serve(
    *,
    host: str,
    port: int,
    model_name: str = MINILM_MODEL_NAME,
    api_key: str | None = None,
    threads: int | None = None,
    exit_with_parent: bool = False,
) -> None:
    """Load the model, listen, print the READY line, and serve until SIGINT/SIGTERM."""
    encoder = MiniLMEncoder(threads=threads)
    encoder.encode(["warm up"])  # the first run allocates ORT's buffers; keep it off a request
    runner = web.AppRunner(
        create_app(encoder, model_name=model_name, api_key=api_key), access_log=None
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()

    bound_host, bound_port = runner.addresses[0][:2]
    shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"READY http://{shown_host}:{bound_port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    parent = os.getppid()
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            # Re-parenting means whoever started us died: don't linger as an orphan.
            if stop.is_set() or (exit_with_parent and os.getppid() != parent):
                break
    finally:
        await runner.cleanup()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the server's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m vendors.reference.embeddings",
        description="Serve all-MiniLM-L6-v2 embeddings over an OpenAI-compatible API.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--alias", default=MINILM_MODEL_NAME, help="model name to announce")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("REFERENCE_VENDOR_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' (default: $REFERENCE_VENDOR_API_KEY)",
    )
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    parser.add_argument(
        "--exit-with-parent", action="store_true", help="stop when the parent process dies"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server; return the process exit status."""
    args = parse_args(argv)
    try:
        asyncio.run(
            serve(
                host=args.host,
                port=args.port,
                model_name=args.alias,
                api_key=args.api_key,
                threads=args.threads,
                exit_with_parent=args.exit_with_parent,
            )
        )
    except OSError as exc:  # e.g. the port is taken
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
