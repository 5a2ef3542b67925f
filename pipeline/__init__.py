"""splade-pipeline: SPLADE sparse vectors for large corpora.

Public API: :class:`SpladeEncoder` (texts -> Arrow sparse vectors), the job
(:func:`run_job`, :func:`encoded_dataset`) and the typed config (:func:`load_config`).
Names are imported on first use, so that Ray reader and writer workers, which import
``pipeline.sources`` or ``pipeline.output``, do not pay for torch and transformers.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("splade-pipeline")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "SPARSE_TYPE": "pipeline.schema",
    "SPLADE_TINY": "pipeline.bundled",
    "EncodedBatch": "pipeline.encoder",
    "EncoderConfig": "pipeline.config",
    "JobConfig": "pipeline.config",
    "SpladeEncoder": "pipeline.encoder",
    "committed_files": "pipeline.manifest",
    "encoded_dataset": "pipeline.run",
    "fetch_splade_tiny": "pipeline.bundled",
    "load_config": "pipeline.config",
    "run_job": "pipeline.run",
    "run_reindex": "pipeline.reindex",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
