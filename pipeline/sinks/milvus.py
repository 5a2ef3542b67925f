"""Milvus: Milvus Lite in a local file (``path``) or a Milvus server (``url``), same code.

A collection with a VARCHAR primary key ``id`` (the document id itself) and a
``SPARSE_FLOAT_VECTOR`` field searched by inner product through a ``SPARSE_INVERTED_INDEX``.
Milvus refuses empty vectors (they become counted rejects) and needs a flush before new rows
are searchable at full speed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from pipeline.config import SinkConfig
from pipeline.sinks.protocol import SinkError, StoreLimits, with_retries

MAX_ID_LENGTH = 65_535  # VARCHAR's limit in Milvus
PAGE = 1000  # ids per listing request


def id_filter(ids: list[str]) -> str:
    """``id in ["...", ...]`` with every id a double-quoted literal, escaped as JSON escapes it
    (backslash, quote, control characters): the escapes Milvus's expression parser reads back
    (Go's ``strconv.Unquote``), so an id can only ever be an id, never part of the expression."""
    return "id in [" + ", ".join(json.dumps(i, ensure_ascii=False) for i in ids) + "]"


@contextmanager
def _lite_failures_named(name: str) -> Iterator[None]:
    """Milvus Lite logs why it could not open its file (another process holds it, say) as a
    traceback and raises a bare "Open local milvus failed": keep the log quiet and put its reason
    into the error instead."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("milvus_lite")
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(handler)
    try:
        yield
    except Exception as err:  # noqa: BLE001 - reported with the reason Milvus Lite logged
        reasons = [str(r.exc_info[1]) for r in records if r.exc_info and r.exc_info[1]] or [str(err)]
        raise SinkError(f"{name}: cannot open the Milvus Lite file: {reasons[-1]}") from err
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


class MilvusSink:
    def __init__(self, cfg: SinkConfig, dimension: int) -> None:
        from pymilvus import MilvusClient

        self.cfg, self.field = cfg, cfg.vector_name
        self._is_loaded = False
        if cfg.url:
            self.name = f"milvus {cfg.url} collection {cfg.collection!r}"
            self.client = MilvusClient(uri=cfg.url, token=os.environ.get(cfg.api_key_variable, ""))
        else:
            self.name = f"milvus (lite {cfg.store_path}) collection {cfg.collection!r}"
            os.makedirs(os.path.dirname(os.path.abspath(cfg.store_path)), exist_ok=True)
            with _lite_failures_named(self.name):
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
        # Never ``delete(ids=...)``: pymilvus pastes string ids into a filter expression unescaped
        # (an id holding a quote breaks it; a crafted one deletes other rows), and Milvus Lite has no
        # filter templates. So the ids go in as escaped string literals (see id_filter).
        self._call(f"deleting {len(ids)} ids", lambda: self.client.delete(self.cfg.collection, filter=id_filter(ids)))
        self.finish()

    def finish(self) -> None:
        self._call("flushing", lambda: self.client.flush(self.cfg.collection))

    def _load(self) -> None:
        """Load the collection into memory once per client: a collection created or last used by
        another process is 'released', and Milvus refuses to search or query it until loaded."""
        if not self._is_loaded:
            self._call("loading the collection", lambda: self.client.load_collection(self.cfg.collection))
            self._is_loaded = True

    def search(self, indices: np.ndarray, values: np.ndarray, k: int) -> list[tuple[str, float]]:
        self._load()
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

    def ids(self) -> Iterator[list[str]]:
        self._load()
        pages = self._call(
            "listing the ids",
            lambda: self.client.query_iterator(self.cfg.collection, batch_size=PAGE, filter="", output_fields=["id"]),
        )
        try:
            while page := self._call("listing the ids", pages.next):
                yield [row["id"] for row in page]
        finally:
            pages.close()

    def fetch(self, ids: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        self._load()  # by query with escaped literals: pymilvus's get(ids=...) pastes them unescaped
        rows = self._call(
            f"fetching {len(ids)} vectors",
            lambda: self.client.query(self.cfg.collection, filter=id_filter(ids), output_fields=["id", self.field]),
        )
        out = {}
        for row in rows:
            terms = sorted(row[self.field].items())
            out[row["id"]] = (
                np.asarray([t[0] for t in terms], np.int64),
                np.asarray([t[1] for t in terms], np.float32),
            )
        return out

    def count(self) -> int:
        self._load()
        rows = self._call(
            "counting", lambda: self.client.query(self.cfg.collection, filter="", output_fields=["count(*)"])
        )
        return int(rows[0]["count(*)"])

    def close(self) -> None:
        self.client.close()
