"""Vector stores: one module per store behind the protocol in :mod:`pipeline.sinks.protocol`.

:func:`open_sink` gives a client for the configured store, :func:`store_limits` what that store
accepts (each store declares its own). Store client libraries are imported only when a store is
opened, so the package costs nothing to import.
"""

from __future__ import annotations

from importlib import import_module

from pipeline.config import SinkConfig
from pipeline.errors import PipelineError
from pipeline.redaction import scrub
from pipeline.sinks.protocol import Sink, SinkError, SinkSettingError, StoreLimits

STORES = {
    "qdrant": "pipeline.sinks.qdrant:QdrantSink",
    "pgvector": "pipeline.sinks.pgvector:PgvectorSink",
    "milvus": "pipeline.sinks.milvus:MilvusSink",
    "pinecone": "pipeline.sinks.pinecone:PineconeSink",
}


def store_class(cfg: SinkConfig) -> type[Sink]:
    if cfg.type not in STORES:
        raise SinkSettingError(f"sink.type: {cfg.type!r} is not a known store; choose one of: {', '.join(STORES)}")
    module, _, name = STORES[cfg.type].partition(":")
    return getattr(import_module(module), name)


def store_limits(cfg: SinkConfig) -> StoreLimits:
    """What the configured store accepts (per-vector cap, request sizes, embedded or server)."""
    return store_class(cfg).limits(cfg)


def open_sink(cfg: SinkConfig, dimension: int) -> Sink:
    """A client for the configured store; ``dimension`` is the vocabulary size of the vectors.
    A store that cannot be opened (unreachable, locked by another process, refused) is a
    :class:`SinkError` naming it."""
    kind = store_class(cfg)
    try:
        return kind(cfg, dimension)
    except PipelineError:
        raise
    except Exception as err:  # noqa: BLE001 - the store's client raises its own kinds
        where = cfg.url or cfg.dsn or cfg.store_path
        raise SinkError(scrub(f"{cfg.type} ({where}): cannot open the store: {type(err).__name__}: {err}")) from err


__all__ = ["STORES", "Sink", "SinkError", "SinkSettingError", "StoreLimits", "open_sink", "store_class", "store_limits"]
