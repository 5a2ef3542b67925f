"""PostgreSQL + pgvector: a table ``(id text primary key, embedding sparsevec(<vocab>))``.

Upserts are ``INSERT ... ON CONFLICT (id) DO UPDATE``; search orders by ``<#>`` (negative
inner product). The ``sparsevec`` text format is 1-based, our indices 0-based. Rows that share
no term with the query score 0 and are not returned as hits.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.config import SinkConfig
from pipeline.sinks.protocol import SinkError, StoreLimits, with_retries


def to_sparsevec(indices: np.ndarray, values: np.ndarray, dimension: int) -> str:
    terms = ",".join(f"{i + 1}:{v!r}" for i, v in zip(indices.tolist(), values.tolist()))
    return f"{{{terms}}}/{dimension}"


def from_sparsevec(text: str) -> tuple[np.ndarray, np.ndarray]:
    """``{i:v,...}/dim`` (1-based) -> 0-based indices and values."""
    terms = [t.split(":") for t in text.rsplit("/", 1)[0].strip("{}").split(",") if t]
    return np.asarray([int(i) - 1 for i, _ in terms], np.int64), np.asarray([float(v) for _, v in terms], np.float32)


PAGE = 10_000  # ids per listing request
HNSW_MAX_NONZEROS = 1000  # pgvector's HNSW index on sparsevec


class PgvectorSink:
    def __init__(self, cfg: SinkConfig, dimension: int) -> None:
        self.cfg, self.dimension, self.table = cfg, dimension, cfg.collection
        self.name = f"pgvector ({cfg.dsn}) table {cfg.collection!r}"
        self._conn: Any = None

    @classmethod
    def limits(cls, cfg: SinkConfig) -> StoreLimits:
        # '{}/30522' is a valid sparsevec (it matches nothing): empty vectors are stored.
        return StoreLimits(
            embedded=False,
            accepts_empty_vectors=True,
            max_nonzeros=HNSW_MAX_NONZEROS if cfg.hnsw_index else None,
            nonzeros_reason="pgvector's HNSW index on sparsevec (sink.hnsw_index)",
            nonzeros_remedy="or sink.hnsw_index: false",
        )

    def _connection(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.cfg.dsn, autocommit=True, connect_timeout=10)
        return self._conn

    def _call(self, what: str, sql: str, params: Any = None, *, many: bool = False, fetch: bool = False) -> Any:
        def action() -> Any:
            try:
                conn = self._connection()
                with conn.transaction(), conn.cursor() as cur:
                    (cur.executemany if many else cur.execute)(sql, params)
                    return cur.fetchall() if fetch else None
            except Exception:
                self._reset()  # a broken connection is replaced on the next try
                raise

        return with_retries(action, what, self.cfg.retry_deadline_s, self.name)

    def _reset(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - closing a dead connection may fail; it is dropped anyway
                pass
            self._conn = None

    def ensure(self) -> None:
        self._call("enabling pgvector", "CREATE EXTENSION IF NOT EXISTS vector")
        found = self._call(
            "reading the table",
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = "
            "'embedding'",
            (self.table,),
            fetch=True,
        )
        exists = bool(
            self._call("checking the table", "SELECT to_regclass(%s) IS NOT NULL", (self.table,), fetch=True)[0][0]
        )
        wanted = f"sparsevec({self.dimension})"
        if exists:
            if not found or found[0][0] != wanted:
                have = found[0][0] if found else "no 'embedding' column"
                raise SinkError(
                    f"{self.name}: exists with {have}, this model needs embedding {wanted}; use another table"
                )
        elif not self.cfg.create_if_missing:
            raise SinkError(f"{self.name}: table does not exist and sink.create_if_missing is false")
        else:
            self._call(
                "creating the table",
                f"CREATE TABLE IF NOT EXISTS {self.table} (id text PRIMARY KEY, embedding {wanted} NOT NULL)",
            )
        if self.cfg.hnsw_index:
            self._call(
                "creating the HNSW index",
                f"CREATE INDEX IF NOT EXISTS {self.table}_embedding_hnsw ON {self.table} USING hnsw (embedding "
                "sparsevec_ip_ops)",
            )

    def upsert(self, ids: list[str], indices: list[np.ndarray], values: list[np.ndarray]) -> None:
        rows = [(doc_id, to_sparsevec(i, v, self.dimension)) for doc_id, i, v in zip(ids, indices, values)]
        sql = (
            f"INSERT INTO {self.table} (id, embedding) VALUES (%s, %s::sparsevec) "
            "ON CONFLICT (id) DO UPDATE SET embedding = EXCLUDED.embedding"
        )
        self._call(f"upserting {len(rows)} vectors (first id {ids[0]!r})", sql, rows, many=True)

    def delete(self, ids: list[str]) -> None:
        self._call(f"deleting {len(ids)} ids", f"DELETE FROM {self.table} WHERE id = ANY(%s)", (ids,))

    def search(self, indices: np.ndarray, values: np.ndarray, k: int) -> list[tuple[str, float]]:
        query = to_sparsevec(indices, values, self.dimension)
        rows = self._call(
            "searching",
            f"SELECT id, -(embedding <#> %s::sparsevec) AS score FROM {self.table} ORDER BY embedding <#> "
            "%s::sparsevec LIMIT %s",
            (query, query, k),
            fetch=True,
        )
        return [(doc_id, float(score)) for doc_id, score in rows if score > 0]

    def ids(self) -> Iterator[list[str]]:
        last = None
        while True:
            after = "" if last is None else "WHERE id > %s "  # keyset pages along the primary key's index
            rows = self._call(
                "listing the ids",
                f"SELECT id FROM {self.table} {after}ORDER BY id LIMIT {PAGE}",
                () if last is None else (last,),
                fetch=True,
            )
            if not rows:
                return
            yield [r[0] for r in rows]
            last = rows[-1][0]

    def fetch(self, ids: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        rows = self._call(
            f"fetching {len(ids)} vectors",
            f"SELECT id, embedding::text FROM {self.table} WHERE id = ANY(%s)",
            (ids,),
            fetch=True,
        )
        return {doc_id: from_sparsevec(text) for doc_id, text in rows}

    def finish(self) -> None:
        """Every upsert is committed when it returns: nothing to do."""

    def count(self) -> int:
        return int(self._call("counting", f"SELECT count(*) FROM {self.table}", fetch=True)[0][0])

    def close(self) -> None:
        self._reset()
