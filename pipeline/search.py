"""Querying the store the job loaded: encode the queries (:meth:`SpladeEncoder.encode_queries`), ask the store."""

from __future__ import annotations

from typing import Any

from pipeline.config import JobConfig
from pipeline.encode.sparse import sparse_rows
from pipeline.output.layout import WINDOW_MARK
from pipeline.sinks import open_sink
from pipeline.sinks.protocol import Sink


def search(
    config: JobConfig, queries: list[str], k: int, *, group_by_parent: bool = False
) -> list[list[tuple[str, float]]]:
    """Top ``k`` ``(doc_id, score)`` per query, by the store's dot product (zero-score hits dropped).

    ``group_by_parent`` (a store loaded from a long_documents split output, whose vectors are windows
    ``<id>#<k>``): the top ``k`` documents, each scored by its best window. The store is asked for
    more windows (twice as many each time, up to :data:`MAX_WINDOWS`) until they name ``k``
    documents or the store has no more: the best ``n`` windows hold the best window of each of the
    best documents they name, so that ranking is exact."""
    from pipeline.encode.encoder import SpladeEncoder

    encoder = SpladeEncoder.from_config(config.encoder)
    store = open_sink(config.sink, encoder.vocab_size)
    try:
        vectors = sparse_rows(encoder.encode_queries(queries))
        return [ranked(store, indices, values, k, group_by_parent=group_by_parent) for indices, values in vectors]
    finally:
        store.close()


MAX_WINDOWS = 10_000  # windows asked of a store at most (Pinecone's top_k limit)


def ranked(store: Sink, indices: Any, values: Any, k: int, *, group_by_parent: bool = False) -> list[tuple[str, float]]:
    """One query's top ``k`` hits from ``store`` (documents by their best window: see :func:`search`)."""
    if not group_by_parent:
        return store.search(indices, values, k)
    asked = min(k * 4, MAX_WINDOWS)
    while True:
        hits = store.search(indices, values, asked)
        best: dict[str, float] = {}
        for window, score in hits:  # best first: a document's first hit is its best window
            best.setdefault(window.rsplit(WINDOW_MARK, 1)[0], score)
        if len(best) >= k or len(hits) < asked or asked >= MAX_WINDOWS:
            return list(best.items())[:k]
        asked = min(asked * 2, MAX_WINDOWS)
