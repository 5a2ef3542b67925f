"""Querying the store the job loaded: encode the queries (:meth:`SpladeEncoder.encode_queries`), ask the store."""

from __future__ import annotations

import logging
from typing import Any

from pipeline.config import JobConfig
from pipeline.encode.sparse import sparse_rows
from pipeline.errors import SettingError
from pipeline.output.layout import WINDOW_MARK
from pipeline.sinks import open_sink, store_limits
from pipeline.sinks.protocol import Sink

log = logging.getLogger(__name__)


def search(
    config: JobConfig, queries: list[str], k: int, *, group_by_parent: bool = False
) -> list[list[tuple[str, float]]]:
    """Top ``k`` ``(doc_id, score)`` per query, by the store's dot product (zero-score hits dropped).

    ``group_by_parent`` (a store loaded from a long_documents split output, whose vectors are windows
    ``<id>#<k>``): the top ``k`` documents, each scored by its best window. The store is asked for
    more windows (twice as many each time, up to the most one search returns) until they name ``k``
    documents or the store has no more: the best ``n`` windows hold the best window of each of the
    best documents they name, so that ranking is exact."""
    from pipeline.encode.encoder import SpladeEncoder

    encoder = SpladeEncoder.from_config(config.encoder)
    store = open_sink(config.sink, encoder.vocab_size)
    cap = store_limits(config.sink).max_search_k
    try:
        vectors = sparse_rows(encoder.encode_queries(queries))
        return [ranked(store, i, v, k, group_by_parent=group_by_parent, cap=cap) for i, v in vectors]
    finally:
        store.close()


def ranked(
    store: Sink, indices: Any, values: Any, k: int, *, group_by_parent: bool = False, cap: int = 10_000
) -> list[tuple[str, float]]:
    """One query's top ``k`` hits from ``store`` (documents by their best window: see :func:`search`;
    ``cap``: the most hits one search of the store returns)."""
    if k > cap:
        raise SettingError(f"{store.name} returns at most {cap} hits per search; {k} were asked for")
    if not group_by_parent:
        return store.search(indices, values, k)
    asked = min(k * 4, cap)
    while True:
        hits = store.search(indices, values, asked)
        best: dict[str, float] = {}
        for window, score in hits:  # best first: a document's first hit is its best window
            best.setdefault(window.rsplit(WINDOW_MARK, 1)[0], score)
        if len(best) >= k or len(hits) < asked:
            return list(best.items())[:k]
        if asked >= cap:
            log.warning(
                "%s: its best %d windows (the most one search returns) name only %d documents; the ranking ends there",
                store.name,
                asked,
                len(best),
            )
            return list(best.items())
        asked = min(asked * 2, cap)
