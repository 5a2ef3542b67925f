"""Qdrant: embedded local mode (``path``, the built-in default) or a server (``url``), same code.

Points carry the sparse vector under ``vector_name`` and the document id in the payload
(``doc_id``); the point id is a UUIDv5 of the document id, since Qdrant takes only unsigned
integers or UUIDs.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.config import SinkConfig
from pipeline.sinks.protocol import SinkError, StoreLimits, with_retries

PAGE = 1000  # ids per listing request
NAMESPACE = uuid.UUID("6f1c3b52-5a1d-4a52-9a55-2b9c1e6d0a71")  # fixed: ids must not change between runs


def point_id(doc_id: str) -> str:
    return str(uuid.uuid5(NAMESPACE, doc_id))


class QdrantSink:
    def __init__(self, cfg: SinkConfig, dimension: int) -> None:
        from qdrant_client import QdrantClient

        self.cfg = cfg
        if cfg.url:
            self.name = f"qdrant {cfg.url} collection {cfg.collection!r}"
            self.client = QdrantClient(url=cfg.url, api_key=os.environ.get(cfg.api_key_variable) or None, timeout=60)
        else:
            self.name = f"qdrant (local {cfg.store_path}) collection {cfg.collection!r}"
            os.makedirs(cfg.store_path, exist_ok=True)
            self.client = QdrantClient(path=cfg.store_path)

    @classmethod
    def limits(cls, cfg: SinkConfig) -> StoreLimits:
        # Local mode is one process's files. A server's request size limit is its own setting
        # (service.max_request_size_mb, 32 by default): sink.max_request_bytes follows it.
        return StoreLimits(embedded=not cfg.url, accepts_empty_vectors=True)

    def _call(self, what: str, action: Any) -> Any:
        return with_retries(action, what, self.cfg.retry_deadline_s, self.name)

    def ensure(self) -> None:
        from qdrant_client import models

        cfg = self.cfg
        if not self._call("checking the collection", lambda: self.client.collection_exists(cfg.collection)):
            if not cfg.create_if_missing:
                raise SinkError(f"{self.name}: collection does not exist and sink.create_if_missing is false")
            modifier = models.Modifier.IDF if cfg.idf_modifier else None
            sparse = {cfg.vector_name: models.SparseVectorParams(modifier=modifier)}
            self._call(
                "creating the collection",
                lambda: self.client.create_collection(cfg.collection, vectors_config={}, sparse_vectors_config=sparse),
            )
            return
        info = self._call("reading the collection", lambda: self.client.get_collection(cfg.collection))
        existing = info.config.params.sparse_vectors or {}
        if cfg.vector_name not in existing:
            raise SinkError(
                f"{self.name}: exists without a sparse vector named {cfg.vector_name!r} (it has {sorted(existing)}); "
                "set sink.vector_name or use another collection"
            )
        has_idf = existing[cfg.vector_name].modifier == models.Modifier.IDF
        if has_idf != cfg.idf_modifier:
            raise SinkError(f"{self.name}: exists with idf_modifier={has_idf}, the config says {cfg.idf_modifier}")

    def upsert(self, ids: list[str], indices: list[np.ndarray], values: list[np.ndarray]) -> None:
        from qdrant_client import models

        points = [
            models.PointStruct(
                id=point_id(doc_id),
                vector={self.cfg.vector_name: models.SparseVector(indices=idx.tolist(), values=val.tolist())},
                payload={"doc_id": doc_id},
            )
            for doc_id, idx, val in zip(ids, indices, values)
        ]
        self._call(
            f"upserting {len(points)} vectors (first id {ids[0]!r})",
            lambda: self.client.upsert(self.cfg.collection, points=points, wait=True),
        )

    def delete(self, ids: list[str]) -> None:
        from qdrant_client import models

        selector = models.PointIdsList(points=[point_id(i) for i in ids])
        self._call(
            f"deleting {len(ids)} ids",
            lambda: self.client.delete(self.cfg.collection, points_selector=selector, wait=True),
        )

    def search(self, indices: np.ndarray, values: np.ndarray, k: int) -> list[tuple[str, float]]:
        from qdrant_client import models

        query = models.SparseVector(indices=indices.tolist(), values=values.tolist())
        hits = self._call(
            "searching",
            lambda: self.client.query_points(
                self.cfg.collection, query=query, using=self.cfg.vector_name, limit=k, with_payload=True
            ),
        )
        return [(p.payload["doc_id"], float(p.score)) for p in hits.points if p.score > 0]

    def ids(self) -> Iterator[list[str]]:
        offset: Any = None
        while True:
            page, offset = self._call(
                "listing the ids",
                lambda offset=offset: self.client.scroll(
                    self.cfg.collection, limit=PAGE, offset=offset, with_payload=["doc_id"], with_vectors=False
                ),
            )
            yield [(p.payload or {}).get("doc_id") for p in page]  # None: a point splade-pipeline did not write
            if offset is None:
                return

    def fetch(self, ids: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        name = self.cfg.vector_name
        points = self._call(
            f"fetching {len(ids)} vectors",
            lambda: self.client.retrieve(
                self.cfg.collection, ids=[point_id(i) for i in ids], with_payload=["doc_id"], with_vectors=[name]
            ),
        )
        out = {}
        for p in points:
            if not (p.payload or {}).get("doc_id"):
                continue
            vector = (p.vector or {}).get(name)  # an empty vector comes back as no vector
            indices, values = (vector.indices, vector.values) if vector is not None else ([], [])
            out[p.payload["doc_id"]] = (np.asarray(indices, np.int64), np.asarray(values, np.float32))
        return out

    def finish(self) -> None:
        """Qdrant makes upserts searchable as they land (wait=True): nothing to do."""

    def count(self) -> int:
        return int(self._call("counting", lambda: self.client.count(self.cfg.collection, exact=True)).count)

    def close(self) -> None:
        self.client.close()
