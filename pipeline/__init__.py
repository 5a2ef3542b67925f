"""splade-pipeline: SPLADE sparse vectors for large corpora.

Public API: :class:`SpladeEncoder` (texts -> Arrow sparse vectors), the job
(:func:`run_job`, :func:`encoded_dataset`) and the typed config (:func:`load_config`).
"""

from importlib.metadata import PackageNotFoundError, version

from pipeline.bundled import SPLADE_TINY, fetch_splade_tiny
from pipeline.config import EncoderConfig, JobConfig, load_config
from pipeline.encoder import EncodedBatch, SpladeEncoder
from pipeline.run import encoded_dataset, run_job
from pipeline.schema import SPARSE_TYPE

try:
    __version__ = version("splade-pipeline")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "SPARSE_TYPE",
    "SPLADE_TINY",
    "EncodedBatch",
    "EncoderConfig",
    "JobConfig",
    "SpladeEncoder",
    "__version__",
    "encoded_dataset",
    "fetch_splade_tiny",
    "load_config",
    "run_job",
]
