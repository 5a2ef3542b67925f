"""splade-pipeline: SPLADE sparse vectors for large corpora.

Public API: :class:`SpladeEncoder` (texts -> Arrow sparse vectors), the job
(:func:`run_job`, :func:`encoded_dataset`, :func:`run_reindex`; progress through ``on_progress``,
e.g. :func:`notebook_bar`; :func:`output_status`) and the typed config (:func:`load_config`).
Names are imported on first use, so that Ray reader and writer workers, which import
``pipeline.job.stages`` (sources, output), do not pay for torch and transformers.

The package, by responsibility:

- ``pipeline.encode``: texts to sparse vectors (the encoder and its math); no engine, no storage.
- ``pipeline.output``: the output location, its file layout, the commit protocol and run lock.
- ``pipeline.sinks``: vector stores behind one protocol, each declaring its limits.
- ``pipeline.job``: every Ray Data plan and the only ``ray.init``.
- ``config``, ``errors``, ``storage``, ``sources``: the shared base; ``cli``, ``demo``, ``search``: faces.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from pipeline.version import __version__

if TYPE_CHECKING:  # what editors and type checkers see; at run time the names load on first use
    from pipeline.config import EncoderConfig, JobConfig, load_config
    from pipeline.encode.bundled import SPLADE_TINY, fetch_splade_tiny
    from pipeline.encode.encoder import EncodedBatch, SpladeEncoder
    from pipeline.encode.sparse import SPARSE_TYPE
    from pipeline.errors import PipelineError
    from pipeline.job.encode import run_job
    from pipeline.job.plan import encoded_dataset
    from pipeline.job.progress import Progress, notebook_bar
    from pipeline.job.reindex import run_reindex
    from pipeline.status import output_status

_EXPORTS = {
    "SPARSE_TYPE": "pipeline.encode.sparse",
    "SPLADE_TINY": "pipeline.encode.bundled",
    "EncodedBatch": "pipeline.encode.encoder",
    "EncoderConfig": "pipeline.config",
    "JobConfig": "pipeline.config",
    "PipelineError": "pipeline.errors",
    "SpladeEncoder": "pipeline.encode.encoder",
    "encoded_dataset": "pipeline.job.plan",
    "fetch_splade_tiny": "pipeline.encode.bundled",
    "load_config": "pipeline.config",
    "notebook_bar": "pipeline.job.progress",
    "output_status": "pipeline.status",
    "Progress": "pipeline.job.progress",
    "run_job": "pipeline.job.encode",
    "run_reindex": "pipeline.job.reindex",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
