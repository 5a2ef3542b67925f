"""splade-pipeline: SPLADE sparse vectors for large corpora.

Public API: :class:`SpladeEncoder` (texts -> Arrow sparse vectors) and its typed settings.
"""

from importlib.metadata import PackageNotFoundError, version

from pipeline.bundled import SPLADE_TINY, fetch_splade_tiny
from pipeline.config import EncoderConfig
from pipeline.encoder import EncodedBatch, SpladeEncoder
from pipeline.schema import SPARSE_TYPE

try:
    __version__ = version("splade-pipeline")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["SPARSE_TYPE", "SPLADE_TINY", "EncodedBatch", "EncoderConfig", "SpladeEncoder", "fetch_splade_tiny", "__version__"]
