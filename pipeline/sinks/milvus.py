"""Milvus: Milvus Lite in a local file (``path``) or a Milvus server (``url``), same code.

A collection with a VARCHAR primary key ``id`` (the document id itself) and a
``SPARSE_FLOAT_VECTOR`` field searched by inner product through a ``SPARSE_INVERTED_INDEX``.
Milvus refuses empty vectors (they become counted rejects) and needs a flush before new rows
are searchable at full speed.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pipeline.config import SinkConfig
from pipeline.sinks.protocol import SinkError, StoreLimits, with_retries

MAX_ID_LENGTH = 65_535  # VARCHAR's limit in Milvus


class MilvusSink:
    def __init__(self, cfg: SinkConfig, dimension: int) -> None:
        from pymilvus import MilvusClient

        self.cfg, self.field = cfg, cfg.vector_name
        if cfg.url:
            self.name = f"milvus {cfg.url} collection {cfg.collection!r}"
            self.client = MilvusClient(uri=cfg.url, token=os.environ.get(cfg.api_key_variable, ""))
        else:
            self.name = f"milvus (lite {cfg.store_path}) collection {cfg.collection!r}"
            os.makedirs(os.path.dirname(os.path.abspath(cfg.store_path)), exist_ok=True)
            self.client = MilvusClient(cfg.store_path)

    @classmethod
    def limits(cls, cfg: SinkConfig) -> StoreLimits:
        # Milvus Lite is one process's file; Milvus refuses empty sparse vectors.
        return StoreLimits(embedded=not cfg.url, accepts_empty_vectors=False)

    def _call(self, what: str, action: Any) -> Any:
        return with_retries(action, what, self.cfg.retry_deadline_s, self.name)

    def ensure(self) -> None:
        from pymilvus import DataType

        name = self.cfg.collection
        if self._call("checking the collection", lambda: self.client.has_collection(name)):
            fields = {
                f["name"]: f
                for f in self._call("reading the collection", lambda: self.client.describe_collection(name))["fields"]
            }
            vector = fields.get(self.field)
            key = fields.get("id")
            if (
                vector is None
                or vector["type"] != DataType.SPARSE_FLOAT_VECTOR
                or key is None
                or not key.get("is_primary")
            ):
                found = {n: str(f["type"]) for n, f in fields.items()}
                raise SinkError(
                    f"{self.name}: exists with fields {found}; needs primary key 'id' and a SPARSE_FLOAT_VECTOR "
                    f"{self.field!r}"
                )
            return
        if not self.cfg.create_if_missing:
            raise SinkError(f"{self.name}: collection does not exist and sink.create_if_missing is false")
        schema = self.client.create_schema(auto_id=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
        schema.add_field(self.field, DataType.SPARSE_FLOAT_VECTOR)
        index = self.client.prepare_index_params()
        index.add_index(field_name=self.field, index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
        self._call(
            "creating the collection", lambda: self.client.create_collection(name, schema=schema, index_params=index)
        )

    def upsert(self, ids: list[str], indices: list[np.ndarray], values: list[np.ndarray]) -> None:
        rows = [
            {"id": i, self.field: dict(zip(idx.tolist(), val.tolist()))} for i, idx, val in zip(ids, indices, values)
        ]
        self._call(
            f"upserting {len(rows)} vectors (first id {ids[0]!r})",
            lambda: self.client.upsert(self.cfg.collection, rows),
        )

    def delete(self, ids: list[str]) -> None:
        self._call(f"deleting {len(ids)} ids", lambda: self.client.delete(self.cfg.collection, ids=ids))
        self.finish()

    def finish(self) -> None:
        self._call("flushing", lambda: self.client.flush(self.cfg.collection))

    def search(self, indices: np.ndarray, values: np.ndarray, k: int) -> list[tuple[str, float]]:
        query = [dict(zip(indices.tolist(), values.tolist()))]
        hits = self._call(
            "searching",
            lambda: self.client.search(
                self.cfg.collection,
                data=query,
                anns_field=self.field,
                limit=k,
                search_params={"metric_type": "IP"},
                output_fields=["id"],
            ),
        )
        return [(h["id"], float(h["distance"])) for h in hits[0] if h["distance"] > 0]

    def count(self) -> int:
        rows = self._call(
            "counting", lambda: self.client.query(self.cfg.collection, filter="", output_fields=["count(*)"])
        )
        return int(rows[0]["count(*)"])

    def close(self) -> None:
        self.client.close()
