"""The per-batch work of each Ray Data stage: read a shard, encode a block, write a block."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import EncoderConfig, InputConfig, OutputConfig, SinkConfig
from pipeline.output import output_fs, write_blocks
from pipeline.schema import SPARSE_TYPE, sparse_rows
from pipeline.sources import Shard, read_shard


def read_shards(batch: pa.Table, cfg: InputConfig) -> Iterator[pa.Table]:
    """Rows of shard descriptors in, blocks of validated rows out (streamed, one block at a time)."""
    for row in batch.to_pylist():
        lines = row.pop("lines")
        shard = Shard(**{**row, "skip_blocks": tuple(row["skip_blocks"] or ()), "lines": None if lines is None else tuple(lines)})
        yield from read_shard(shard, cfg)


class WriteBlocks:
    """Writes each encoded block's data and rejects files; returns their stats (a writer actor).

    Actors, not tasks: on a node whose worker processes are few (Ray keeps about one idle worker
    per CPU), each writer task could land in a fresh process that imports pyarrow, s3fs and
    botocore and builds a storage client first: about 0.3 s of CPU per block on the 2-core test
    machine, against 20 ms for the write itself. A writer actor pays that once.
    """

    def __init__(self, cfg: OutputConfig, fingerprint: dict[str, Any], passthrough: list[str]) -> None:
        self.cfg, self.fingerprint, self.passthrough = cfg, fingerprint, passthrough
        output_fs(cfg)  # build the storage client now, not on the first block

    def __call__(self, table: pa.Table) -> pa.Table:
        return write_blocks(table, self.cfg, self.fingerprint, self.passthrough)


class EncodeBlocks:
    """One SpladeEncoder per actor, loaded once; encodes the good rows of each block.

    Tokenization runs here, inside the encoder actor, not as a separate CPU stage: on CPU
    actors it shares the same cores anyway (SPLADE-tiny on this 2-core machine: 0.02 s to
    tokenize 256 passages against 1.4 s to encode them), and on an H200 host it was 30% of the
    encoder's time per call (40,800 docs/s tokenizing alone vs 12,500 docs/s encoding) — a
    separate stage would only pay off with the GPU pipelined behind it, which is future work.

    Failures (see :mod:`pipeline.attempts`): a document whose encoding raises is isolated by
    splitting the rows in halves and rejected (``encoder_error``), the rest encoded; a block whose
    actor died ``isolate_after`` times is encoded in pieces so that the documents that kill the
    process are found and rejected (``encoder_crash``). Out of memory halves the micro-batch
    (in :class:`SpladeEncoder`); the count travels with the block (``_oom``).
    """

    def __init__(self, encoder: EncoderConfig, expected_fingerprint: dict[str, Any], threads: int, attempts: Any = None,
                 isolate_after: int = 2) -> None:  # fmt: skip
        import torch

        from pipeline.encoder import SpladeEncoder
        from pipeline.fingerprint import fingerprint

        torch.set_num_threads(max(1, threads))
        mine = fingerprint(encoder)
        if mine["weights_sha256"] != expected_fingerprint["weights_sha256"]:
            raise RuntimeError(
                f"model {encoder.model!r}: weights on this worker (sha256 {mine['weights_sha256'][:12]}) differ from the "
                f"driver's ({expected_fingerprint['weights_sha256'][:12]}); pin encoder.revision or use one model folder"
            )
        self.encoder = SpladeEncoder.from_config(encoder)
        self.attempts, self.isolate_after = attempts, isolate_after
        if attempts is not None:
            import ray

            attempts.ready.remote(time.time())
            if ray.get_runtime_context().was_current_actor_reconstructed:
                attempts.restarted.remote()

    def __call__(self, block: pa.Table) -> pa.Table:
        good_mask = pc.is_null(block["_reject"])
        good = block.filter(good_mask)
        rest = block.filter(pc.invert(good_mask)).drop_columns(["text"])
        texts = good["text"].to_pylist()
        key = ("block", block["_unit"][0].as_py(), block["_block"][0].as_py(), pc.min(block["_line"]).as_py()) if block.num_rows else None
        died = self._begin(key)
        if died < self.isolate_after:
            pieces, failed = self._encode_rows(texts, np.arange(len(texts)))
        else:
            pieces, failed = self._isolate(key, texts)
        self._end(key)
        if len(texts) > 1 and len(failed) == len(texts) and all(reason == "encoder_error" for reason, _ in failed.values()):
            # Every document failing alone is the encoder's problem (a broken device), not the data's.
            raise RuntimeError(f"every document of the block failed to encode, e.g.: {next(iter(failed.values()))[1]}")
        encoded = pa.concat_tables([_EMPTY_PIECE, *pieces]).sort_by("_pos")
        done = encoded["_pos"]
        out = good.take(done).drop_columns(["text"])
        for name in ("sparse", "num_tokens", "truncated"):
            out = out.append_column(name, encoded[name])
        if failed:
            bad = good.take(pa.array(sorted(failed), pa.int64())).drop_columns(["text"])
            reasons = [failed[i] for i in sorted(failed)]
            bad = bad.set_column(bad.schema.get_field_index("_reject"), "_reject", pa.array([r[0] for r in reasons], pa.string()))
            bad = bad.set_column(bad.schema.get_field_index("_detail"), "_detail", pa.array([r[1] for r in reasons], pa.string()))
            rest = pa.concat_tables([rest, bad])
        rest = rest.append_column("sparse", pa.nulls(rest.num_rows, SPARSE_TYPE))
        rest = rest.append_column("num_tokens", pa.nulls(rest.num_rows, pa.int32()))
        rest = rest.append_column("truncated", pa.nulls(rest.num_rows, pa.bool_()))
        table = pa.concat_tables([out, rest], promote_options="permissive")
        ooms = np.zeros(table.num_rows, np.int32)
        if table.num_rows:
            ooms[0] = sum(int((p.schema.metadata or {}).get(b"oom", b"0")) for p in pieces)
        return table.append_column("_oom", pa.array(ooms, pa.int32()))

    def _encode_rows(self, texts: list[str], rows: np.ndarray) -> tuple[list[pa.Table], dict[int, tuple[str, str]]]:
        """Encode ``texts[rows]``; a failure splits the rows in halves until the failing documents are alone."""
        from pipeline.encoder import is_out_of_memory
        from pipeline.faults import poison_point

        subset = [texts[i] for i in rows]
        poison_point(subset)  # test-only fault injection; a no-op unless configured
        try:
            batch = self.encoder.encode_batch(subset)
        except Exception as err:
            if len(rows) == 1:
                what = "out of memory even alone" if is_out_of_memory(err) else "encoding raised"
                return [], {int(rows[0]): ("encoder_error", f"{what}: {type(err).__name__}: {str(err)[:300]}")}
            half = len(rows) // 2
            left, bad_left = self._encode_rows(texts, rows[:half])
            right, bad_right = self._encode_rows(texts, rows[half:])
            return left + right, bad_left | bad_right
        piece = pa.table({
            "_pos": pa.array(rows, pa.int64()), "sparse": batch.sparse, "num_tokens": pa.array(batch.num_tokens, pa.int32()),
            "truncated": pa.array(batch.truncated, pa.bool_()),
        })  # fmt: skip
        return [piece.replace_schema_metadata({b"oom": str(batch.oom_splits).encode()})], {}

    def _isolate(self, key: tuple, texts: list[str]) -> tuple[list[pa.Table], dict[int, tuple[str, str]]]:
        """Encode a block that keeps killing its actor in announced pieces (see :mod:`pipeline.attempts`)."""
        from pipeline.attempts import CHUNK_ROWS

        pieces: list[pa.Table] = []
        failed: dict[int, tuple[str, str]] = {}
        for start in range(0, len(texts), CHUNK_ROWS):
            chunk = np.arange(start, min(len(texts), start + CHUNK_ROWS))
            parts = [("chunk", chunk)] if self._begin(("chunk", key, start)) == 0 else [("row", np.array([i])) for i in chunk]
            for kind, rows in parts:
                row_key = ("row", key, int(rows[0]))
                if kind == "row" and (died := self._begin(row_key)):
                    failed[int(rows[0])] = ("encoder_crash", f"the encoder process died on this document ({died} times)")
                    continue
                done, bad = self._encode_rows(texts, rows)
                pieces += done
                failed |= bad
                if kind == "row":
                    self._end(row_key)
            self._end(("chunk", key, start))
        return pieces, failed

    def _begin(self, key: tuple | None) -> int:
        if self.attempts is None or key is None:
            return 0
        import ray

        return int(ray.get(self.attempts.begin.remote(key)))

    def _end(self, key: tuple | None) -> None:
        if self.attempts is not None and key is not None:
            self.attempts.end.remote(key)


_EMPTY_PIECE = pa.schema(
    [("_pos", pa.int64()), ("sparse", SPARSE_TYPE), ("num_tokens", pa.int32()), ("truncated", pa.bool_())]
).empty_table()


def upsert_batch(sink: Any, cfg: SinkConfig, batch: pa.Table) -> tuple[int, int]:
    """Upsert ``id`` + ``sparse`` rows in size-capped requests; return (upserted, empty vectors rejected)."""
    from pipeline.sinks import request_batches, request_limits

    rows = batch
    if not sink.accepts_empty_vectors:
        rows = batch.filter(pc.greater(pc.list_value_length(pc.struct_field(batch["sparse"], "indices")), 0))
    for request in request_batches(rows, *request_limits(cfg)):
        pairs = sparse_rows(request["sparse"])
        sink.upsert(request["id"].to_pylist(), [p[0] for p in pairs], [p[1] for p in pairs])
    return rows.num_rows, batch.num_rows - rows.num_rows


class UpsertBlocks:
    """One store client per actor (server stores), loaded once; upserts each batch it is given.

    A store failure that outlived the retries is returned as data (the ``error`` column), not
    raised: Ray would wrap it beyond recognition, and the driver must name the store and cause.
    After one such failure the actor stops trying, so a dead store costs one retry deadline.
    """

    def __init__(self, sink: SinkConfig, dimension: int) -> None:
        from pipeline.sinks import open_sink

        self.cfg = sink
        self.sink = open_sink(sink, dimension)
        self.failed: str | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.sinks import SinkError

        upserted = empty = 0
        if self.failed is None:
            try:
                upserted, empty = upsert_batch(self.sink, self.cfg, batch)
            except SinkError as err:
                self.failed = str(err)
        return pa.table({"upserted": [upserted], "empty": [empty], "error": pa.array([self.failed], pa.string())})
