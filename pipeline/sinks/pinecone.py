"""Pinecone: the official SDK against an index host (a sparse index, or sparse-dense).

Pinecone's limits are the store's caps: at most 2048 non-zeros per sparse vector (checked
against encoder.top_k before any work), 1000 vectors and 2 MB per upsert request (requests
are cut to fit), ids of at most 512 ASCII characters. The vector id is the document id where
Pinecone takes it as it is; a longer or non-ASCII id, or one that itself starts with the reserved
``sha256-``, maps to ``sha256-<hex of the id>``, so two document ids never share a vector id (the
document id always travels in the metadata as ``doc_id``). Empty vectors are refused by Pinecone
and become counted rejects.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import numpy as np

from pipeline.config import SinkConfig
from pipeline.sinks.protocol import SinkError, StoreLimits, with_retries

MAX_NONZEROS = 2048
MAX_VECTORS_PER_REQUEST = 1000
MAX_REQUEST_BYTES = 2 * 1024 * 1024
MAX_ID_LENGTH = 512


HASHED_PREFIX = "sha256-"
LIST_PAGE = 100  # the most ids a list request returns
MAX_SEARCH_K = 1000  # a query's top_k with include_metadata (10,000 without; we need the doc_id metadata)
FETCH_URL_CHARS = 6000  # ids travel in a fetch request's URL: kept well under common URL limits (8 KB)


def point_id(doc_id: str) -> str:
    """The vector id of a document id, one-to-one: ids that pass as they are never start with the
    prefix every hashed id carries."""
    if doc_id.isascii() and len(doc_id) <= MAX_ID_LENGTH and not doc_id.startswith(HASHED_PREFIX):
        return doc_id
    return HASHED_PREFIX + hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).hexdigest()


def _url_sized(point_ids: list[str]) -> Iterator[list[str]]:
    """``point_ids`` in chunks whose URL-encoded ``ids=`` parameters stay under FETCH_URL_CHARS."""
    chunk: list[str] = []
    size = 0
    for pid in point_ids:
        cost = len(quote(pid, safe="")) + 5  # "&ids="
        if chunk and size + cost > FETCH_URL_CHARS:
            yield chunk
            chunk, size = [], 0
        chunk.append(pid)
        size += cost
    if chunk:
        yield chunk


class PineconeSink:
    def __init__(self, cfg: SinkConfig, dimension: int) -> None:
        from pinecone import Pinecone

        key = os.environ.get(cfg.api_key_variable)
        if not key:
            raise SinkError(f"pinecone {cfg.url}: no API key; set the {cfg.api_key_variable} environment variable")
        self.cfg, self.namespace = cfg, cfg.namespace
        self.name = f"pinecone {cfg.url} namespace {cfg.namespace!r}"
        self.index = Pinecone(api_key=key).Index(host=cfg.url)

    @classmethod
    def limits(cls, cfg: SinkConfig) -> StoreLimits:
        return StoreLimits(
            embedded=False,
            accepts_empty_vectors=False,
            count_settle_s=120.0,  # describe_index_stats and list are eventually consistent
            max_nonzeros=MAX_NONZEROS,
            nonzeros_reason="Pinecone",
            max_vectors_per_request=MAX_VECTORS_PER_REQUEST,
            max_request_bytes=MAX_REQUEST_BYTES,
            max_search_k=MAX_SEARCH_K,
        )

    def _call(self, what: str, action: Any) -> Any:
        return with_retries(action, what, self.cfg.retry_deadline_s, self.name)

    def ensure(self) -> None:
        # Indexes are created in Pinecone's control plane (console, terraform); here we only
        # check that the host answers with this key.
        self._call("reaching the index", self.index.describe_index_stats)

    def upsert(self, ids: list[str], indices: list[np.ndarray], values: list[np.ndarray]) -> None:
        vectors = [
            {
                "id": point_id(doc_id),
                "sparse_values": {"indices": idx.tolist(), "values": val.tolist()},
                "metadata": {"doc_id": doc_id},
            }
            for doc_id, idx, val in zip(ids, indices, values)
        ]
        self._call(
            f"upserting {len(vectors)} vectors (first id {ids[0]!r})",
            lambda: self.index.upsert(vectors=vectors, namespace=self.namespace, show_progress=False),
        )

    def delete(self, ids: list[str]) -> None:
        mapped = [point_id(i) for i in ids]
        self._call(f"deleting {len(ids)} ids", lambda: self.index.delete(ids=mapped, namespace=self.namespace))

    def finish(self) -> None:
        """Pinecone indexes upserts on its own (eventually consistent): nothing to do."""

    def search(self, indices: np.ndarray, values: np.ndarray, k: int) -> list[tuple[str, float]]:
        result = self._call(
            "searching",
            lambda: self.index.query(
                sparse_vector={"indices": indices.tolist(), "values": values.tolist()},
                top_k=k,
                namespace=self.namespace,
                include_metadata=True,
            ),
        )
        return [(m.metadata["doc_id"], float(m.score)) for m in result.matches if m.score > 0]

    def ids(self) -> Iterator[list[str | None]]:
        token = None
        while True:
            page = self._call(
                "listing the ids",
                lambda token=token: self.index.list_paginated(
                    namespace=self.namespace, limit=LIST_PAGE, pagination_token=token
                ),
            )
            found = [v.id for v in page.vectors]
            hashed = [i for i in found if i.startswith(HASHED_PREFIX)]  # the document id is in the metadata
            names = self._doc_ids(hashed) if hashed else {}
            # None: a hashed vector without a document id (not written by splade-pipeline)
            yield [names.get(i) if i.startswith(HASHED_PREFIX) else i for i in found]
            token = page.pagination.next if page.pagination else None
            if not token:
                return

    def _doc_ids(self, point_ids: list[str]) -> dict[str, str]:
        """point id -> document id (from the metadata) of the ``point_ids`` the namespace holds."""
        out = {}
        for chunk in _url_sized(point_ids):
            got = self._call(
                f"fetching {len(chunk)} vectors",
                lambda chunk=chunk: self.index.fetch(ids=chunk, namespace=self.namespace),
            )
            out |= {pid: (v.metadata or {}).get("doc_id") for pid, v in got.vectors.items()}
        return {pid: doc for pid, doc in out.items() if doc}

    def fetch(self, ids: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for chunk in _url_sized([point_id(i) for i in ids]):
            got = self._call(
                f"fetching {len(chunk)} vectors",
                lambda chunk=chunk: self.index.fetch(ids=chunk, namespace=self.namespace),
            )
            for v in got.vectors.values():
                doc_id = (v.metadata or {}).get("doc_id")
                if not doc_id:
                    continue
                sparse = v.sparse_values
                indices, values = (sparse.indices, sparse.values) if sparse is not None else ([], [])
                out[doc_id] = (np.asarray(indices, np.int64), np.asarray(values, np.float32))
        return out

    def count(self) -> int:
        stats = self._call("counting", self.index.describe_index_stats)
        space = stats.namespaces.get(self.namespace)
        return int(space.vector_count) if space else 0

    def close(self) -> None:
        close = getattr(self.index, "close", None)
        if close:
            close()
