"""The per-batch work of each Ray Data stage: read a shard, encode a block, write a block."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import EncoderConfig, InputConfig, SinkConfig
from pipeline.encode.fingerprint import Fingerprint
from pipeline.encode.sparse import SPARSE_TYPE, sparse_rows
from pipeline.errors import ActorStartError
from pipeline.job.attempts import CHUNK_ROWS
from pipeline.job.dedupe import DUPLICATE, later_in_block
from pipeline.job.faults import load_point, out_of_memory_point, poison_point
from pipeline.job.metrics import EncoderMetrics
from pipeline.output.layout import OOM_SPLITS, SPLIT, SPLIT_ID_DETAIL, SPLIT_TYPE, WINDOW_MARK, WINDOWS, BlockWriter
from pipeline.output.location import OutputLocation
from pipeline.sinks import open_sink, store_limits
from pipeline.sinks.protocol import Sink, SinkError, request_batches, request_limits
from pipeline.sources import Shard, read_shard

log = logging.getLogger(__name__)


def read_shards(batch: pa.Table, cfg: InputConfig) -> Iterator[pa.Table]:
    """Rows of shard descriptors in, blocks of validated rows out (streamed, one block at a time)."""
    for row in batch.to_pylist():
        lines = row.pop("lines")
        shard = Shard(
            **{**row, "skip_blocks": tuple(row["skip_blocks"] or ()), "lines": None if lines is None else tuple(lines)}
        )
        yield from read_shard(shard, cfg)


class WriteBlocks:
    """Writes each encoded block's data and rejects files; returns their stats (a writer actor).

    Actors, not tasks: on a node whose worker processes are few (Ray keeps about one idle worker
    per CPU), each writer task could land in a fresh process that imports pyarrow, s3fs and
    botocore and builds a storage client first: about 0.3 s of CPU per block (measured on a
    2-core x86_64 VM, `python -m benchmarks.pipeline_bench`), against 20 ms for the write
    itself. A writer actor pays that once: the output location is resolved in the constructor.
    """

    def __init__(
        self,
        output: OutputLocation,
        compression: str,
        fingerprint: Fingerprint,
        passthrough: list[str],
        attempt: str,
        attempts: Any = None,
        max_deaths: int = 3,
    ) -> None:
        self.deaths = Deaths(attempts, max_deaths, "writer")
        self.writer = BlockWriter(output, compression, fingerprint, passthrough, attempt)
        self.deaths.ready()

    def __call__(self, table: pa.Table) -> pa.Table:
        key = block_key(table, "write")
        if (died := self.deaths.begin(key)) >= WRITE_DEATHS:
            raise ActorDeathsError(
                f"the block of {table['_unit'][0].as_py()} from line {key[3]} killed its writer {died} times on "
                "nodes that stayed up (out of memory on the writer's node?): the run stops rather than restart it "
                "forever; the files written so far are kept for the re-run"
            )
        stats = self.writer.write(table)
        self.deaths.end(key)
        return stats


WRITE_DEATHS = 5  # a block that killed its writer this many times (nodes that stayed up) stops the run


class ActorDeathsError(ActorStartError):
    """An actor kept dying where no isolation helps: while starting (compute.max_startup_deaths), or
    writing one block (:data:`WRITE_DEATHS`)."""


def block_key(block: pa.Table, kind: str) -> tuple | None:
    """A block's key in the attempt log: its unit, its block number and first line (Ray may bundle blocks)."""
    if not block.num_rows:
        return None
    return (kind, block["_unit"][0].as_py(), block["_block"][0].as_py(), pc.min(block["_line"]).as_py())


class Deaths:
    """An actor's side of the run's :class:`pipeline.job.attempts.AttemptLog`: announces its loading
    and its work (with the node it runs on), and stops the run when loading keeps dying."""

    def __init__(self, attempts: Any, limit: int, role: str) -> None:
        self.attempts, self.limit, self.role = attempts, limit, role
        self.node = self.actor = ""
        if attempts is None:
            return
        import ray

        context = ray.get_runtime_context()
        self.node, self.actor = context.get_node_id(), context.get_actor_id() or ""
        died = self._call("loading", self.actor, self.node, role) or 0
        if died >= limit:
            raise ActorDeathsError(
                f"the {role} actor died {died} times while starting (loading the model or opening the output) on "
                f"nodes that stayed up: out of memory on its node? (compute.max_startup_deaths = {limit}). The run "
                "stops rather than restart it forever; the files written so far are kept for the re-run"
            )

    def ready(self) -> None:
        if self.attempts is None:
            return
        if self.role == "encoder":
            self.attempts.ready.remote(time.time(), self.node, self.actor)
        else:
            self.attempts.writer_ready.remote(self.node, self.actor)

    def begin(self, key: tuple | None) -> int:
        if key is None:
            return 0
        return int(self._call("begin", key, self.node) or 0)

    def end(self, key: tuple | None, rows: int = 0) -> None:
        if self.attempts is not None and key is not None:
            self.attempts.end.remote(key, self.node, rows)

    def _call(self, method: str, *args: Any) -> Any:
        if self.attempts is None:
            return None
        import ray

        try:
            return ray.get(getattr(self.attempts, method).remote(*args))
        except ray.exceptions.RayActorError as err:
            # The log lives on the driver's node; gone, the run ends anyway: work on, uncounted.
            log.warning("the run's attempt log is gone (%s); working on without counting deaths", err)
            self.attempts = None
            return None


class EncodeBlocks:
    """One SpladeEncoder per actor, loaded once; encodes the good rows of each block.

    Tokenization runs here, inside the encoder actor, not as a separate CPU stage: on CPU
    actors it shares the same cores anyway (SPLADE-tiny on a 2-core x86_64 VM, measured with
    `python -m benchmarks.encoder_bench`: 0.02 s to tokenize 256 passages against 1.4 s to
    encode them), and on an H200 host it was 30% of the
    encoder's time per call (40,800 docs/s tokenizing alone vs 12,500 docs/s encoding) — a
    separate stage would only pay off with the GPU pipelined behind it, which is future work.

    Failures (see :mod:`pipeline.job.attempts`): a document whose encoding raises is isolated by
    splitting the rows in halves and rejected (``encoder_error``), the rest encoded; a block whose
    actor died ``isolate_after`` times is encoded in pieces so that the documents that kill the
    process are found and rejected (``encoder_crash``). Out of memory halves the micro-batch
    (in :class:`SpladeEncoder`); the count travels with the block (:data:`OOM_SPLITS`).
    """

    def __init__(
        self,
        encoder: EncoderConfig,
        expected: Fingerprint,
        threads: int,
        attempts: Any = None,
        isolate_after: int = 2,
        max_deaths: int = 3,
        run: str = "",
    ) -> None:
        self.deaths = Deaths(attempts, max_deaths, "encoder")
        self.metrics = EncoderMetrics(run) if attempts is not None else None  # Ray's metrics: in a Ray job
        load_point()  # test-only fault injection; a no-op unless configured
        import torch

        from pipeline.encode.encoder import SpladeEncoder
        from pipeline.encode.fingerprint import fingerprint

        torch.set_num_threads(max(1, threads))
        mine = fingerprint(encoder)
        if mine.weights_sha256 != expected.weights_sha256:
            raise ActorStartError(
                f"model {encoder.model!r}: weights on this worker (sha256 {mine.weights_sha256[:12]}) differ from the "
                f"driver's ({expected.weights_sha256[:12]}); pin encoder.revision or use one model folder"
            )
        self.encoder = SpladeEncoder.from_config(encoder)
        dtype = str(self.encoder.compute_dtype).removeprefix("torch.")
        if dtype != expected.dtype:
            raise ActorStartError(
                f"encoder.dtype: this worker computes in {dtype} ({self.encoder.device.type}), the output is "
                f"{expected.dtype}: vectors of two precisions must not be mixed; set encoder.dtype explicitly"
            )
        self.encoder.before_forward = out_of_memory_point  # test-only fault injection; a no-op unless configured
        self.isolate_after = isolate_after
        self.split = encoder.long_documents == "split"
        self.deaths.ready()

    def __call__(self, block: pa.Table) -> pa.Table:
        started = time.monotonic()
        good_mask = pc.is_null(block["_reject"])
        good = block.filter(good_mask)
        rest = block.filter(pc.invert(good_mask)).drop_columns(["text"])
        texts = good["text"].to_pylist()
        key = block_key(block, "block")
        result = Encoded()
        ids = good
        if self.split:  # an id with the window mark is refused first, each row of it (as reindex does)
            marked = pc.match_substring(good["id"], WINDOW_MARK)
            for pos in np.flatnonzero(marked.to_numpy(zero_copy_only=False)).tolist():
                result.failed[pos] = ("invalid_id", SPLIT_ID_DETAIL)
            ids = good.set_column(
                good.schema.get_field_index("id"), "id", pc.if_else(marked, pa.scalar(None, pa.string()), good["id"])
            )
        # a later row of an id in this call is a duplicate: rejected here, where lines are known
        for pos, first in later_in_block(ids).items():
            result.failed[pos] = (DUPLICATE, f"an earlier row of the corpus has this id (in {first})")
        todo = np.array([i for i in range(len(texts)) if i not in result.failed], np.int64)
        if self._begin(key) < self.isolate_after:
            self._encode_rows(texts, todo, result)
        else:
            self._isolate(key, texts, todo, result)
        self.deaths.end(key, block.num_rows)
        failed = result.failed
        if len(todo) > 1 and all(failed.get(int(i), ("",))[0] == "encoder_error" for i in todo):
            # Every document failing alone is the encoder's problem (a broken device), not the data's.
            raise RuntimeError(f"every document of the block failed to encode, e.g.: {next(iter(failed.values()))[1]}")
        encoded = pa.concat_tables([_EMPTY_PIECE, *result.pieces]).sort_by("_pos")
        out = good.take(encoded["_pos"]).drop_columns(["text"])
        for name, _ in _ENCODED_COLUMNS:
            out = out.append_column(name, encoded[name])
        if failed:
            rest = pa.concat_tables([rest, _rejected(good.drop_columns(["text"]), failed)])
        for name, kind in _ENCODED_COLUMNS:
            rest = rest.append_column(name, pa.nulls(rest.num_rows, kind))
        table = pa.concat_tables([out, rest], promote_options="permissive")
        if self.metrics is not None:
            self.metrics.block(table, time.monotonic() - started, result.oom_splits)
        # Counted once per block, on its first row: a block Ray splits between writers still sums right.
        splits = np.zeros(table.num_rows, np.int32)
        if table.num_rows:
            splits[0] = result.oom_splits
        return table.append_column(OOM_SPLITS, pa.array(splits, pa.int32()))

    def _encode_rows(self, texts: list[str], rows: np.ndarray, result: Encoded) -> None:
        """Encode ``texts[rows]`` into ``result``; a failure splits the rows in halves until the failing
        documents are alone, and those are rejected."""
        encode_or_isolate(self.encoder, texts, rows, result.failed, partial(self._keep, result=result))

    def _keep(self, batch: Any, rows: np.ndarray, result: Encoded) -> None:
        """The encoded ``batch`` of ``texts[rows]`` into ``result`` (non-finite vectors rejected)."""
        if batch.parent is None:
            windows = np.ones(len(rows), np.int32) if batch.windows is None else batch.windows
            columns = {"sparse": batch.sparse, "num_tokens": batch.num_tokens, "truncated": batch.truncated}
            columns |= {WINDOWS: windows, SPLIT: pa.nulls(len(rows), SPLIT_TYPE)}
            infinite, nan = non_finite_counts(batch.sparse)
        else:  # long_documents split: each document's windows travel as one list, exploded by the writer
            columns = split_columns(batch, len(rows))
            infinite, nan = (
                np.bincount(batch.parent, c, len(rows)).astype(np.int64) for c in non_finite_counts(batch.sparse)
            )
        piece = pa.table(
            {"_pos": pa.array(rows, pa.int64())}
            | {name: _arrow(columns[name], kind) for name, kind in _ENCODED_COLUMNS}
        )
        broken = (infinite + nan) > 0
        for i in np.flatnonzero(broken):
            detail = f"{infinite[i]} infinite and {nan[i]} NaN weights (a float16 overflow?); no store takes them"
            result.failed[int(rows[i])] = ("non_finite_weights", detail)
        result.pieces.append(piece.filter(pa.array(~broken)) if broken.any() else piece)
        result.oom_splits += batch.oom_splits

    def _isolate(self, key: tuple, texts: list[str], todo: np.ndarray, result: Encoded) -> None:
        """Encode the rows ``todo`` of a block that keeps killing its actor in announced pieces (see
        :mod:`pipeline.job.attempts`)."""
        for start in range(0, len(todo), CHUNK_ROWS):
            chunk = todo[start : start + CHUNK_ROWS]
            if self._begin(("chunk", key, start)) == 0:
                self._encode_rows(texts, chunk, result)
            else:  # this chunk was announced before and never finished: one row at a time
                for row in chunk.tolist():
                    row_key = ("row", key, row)
                    if died := self._begin(row_key):
                        detail = f"the encoder process died on this document ({died} times)"
                        result.failed[row] = ("encoder_crash", detail)
                        continue
                    self._encode_rows(texts, np.array([row]), result)
                    self._end(row_key)
            self._end(("chunk", key, start))

    def _begin(self, key: tuple | None) -> int:
        return self.deaths.begin(key)

    def _end(self, key: tuple | None) -> None:
        self.deaths.end(key)


@dataclass
class Encoded:
    """What encoding one block produced: vector pieces (by row position), the rows rejected with
    their reason and detail, and the micro-batches halved after running out of memory."""

    pieces: list[pa.Table] = field(default_factory=list)
    failed: dict[int, tuple[str, str]] = field(default_factory=dict)
    oom_splits: int = 0


def encode_or_isolate(
    encoder: Any,
    texts: list[str],
    rows: np.ndarray,
    failed: dict[int, tuple[str, str]],
    keep: Callable[..., None],
) -> None:
    """``keep(batch, rows=rows)`` with ``texts[rows]`` encoded by ``encoder``; where encoding raises,
    the rows are split in halves until the failing documents are alone, and those go to ``failed``
    (``encoder_error``, with what was raised): one bad document never fails the others."""
    from pipeline.encode.encoder import is_out_of_memory

    if not len(rows):
        return
    subset = [texts[i] for i in rows]
    poison_point(subset)  # test-only fault injection; a no-op unless configured
    try:
        batch = encoder.encode_batch(subset)
    except Exception as err:
        if len(rows) == 1:
            what = "out of memory even alone" if is_out_of_memory(err) else "encoding raised"
            failed[int(rows[0])] = ("encoder_error", f"{what}: {type(err).__name__}: {str(err)[:300]}")
            return
        half = len(rows) // 2
        encode_or_isolate(encoder, texts, rows[:half], failed, keep)
        encode_or_isolate(encoder, texts, rows[half:], failed, keep)
        return
    keep(batch, rows=rows)


def non_finite_counts(sparse: pa.StructArray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``sparse``: how many weights are +-inf, and how many NaN."""
    _, weights = sparse.flatten()  # flatten() honours a sliced struct's offset
    offsets = weights.offsets.to_numpy()
    values = pc.list_flatten(weights).to_numpy(zero_copy_only=False)
    counts = np.diff(offsets)

    def per_row(flags: np.ndarray) -> np.ndarray:
        cumulative = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
        return cumulative[offsets[1:] - offsets[0]] - cumulative[offsets[:-1] - offsets[0]] if len(counts) else counts

    return per_row(np.isinf(values)), per_row(np.isnan(values))


def _rejected(good: pa.Table, failed: dict[int, tuple[str, str]]) -> pa.Table:
    rows = sorted(failed)
    bad = good.take(pa.array(rows, pa.int64()))
    for column, values in (("_reject", [failed[i][0] for i in rows]), ("_detail", [failed[i][1] for i in rows])):
        bad = bad.set_column(bad.schema.get_field_index(column), column, pa.array(values, pa.string()))
    return bad


_ENCODED_COLUMNS = (
    ("sparse", SPARSE_TYPE),
    ("num_tokens", pa.int32()),
    ("truncated", pa.bool_()),
    (WINDOWS, pa.int32()),
    (SPLIT, SPLIT_TYPE),
)


def _arrow(values: Any, kind: pa.DataType) -> pa.Array:
    return values if isinstance(values, pa.Array) else pa.array(values, kind)


def split_columns(batch: Any, documents: int) -> dict[str, Any]:
    """The encoded columns of ``documents`` texts from a split :class:`EncodedBatch`: per document, its
    windows as one list (vector, tokens, characters), tokens summed, never truncated."""
    windows = np.bincount(batch.parent, minlength=documents).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(windows)]).astype(np.int32)
    items = pa.StructArray.from_arrays(
        [
            batch.sparse,
            pa.array(batch.num_tokens, pa.int32()),
            pa.array(batch.spans[:, 0], pa.int64()),
            pa.array(batch.spans[:, 1], pa.int64()),
        ],
        fields=list(SPLIT_TYPE.value_type),
    )
    return {
        "sparse": pa.nulls(documents, SPARSE_TYPE),
        "num_tokens": np.bincount(batch.parent, batch.num_tokens, documents).astype(np.int32),
        "truncated": np.zeros(documents, bool),
        WINDOWS: windows,
        SPLIT: pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), items),
    }


_EMPTY_PIECE = pa.schema([("_pos", pa.int64()), *_ENCODED_COLUMNS]).empty_table()


def upsert_batch(sink: Sink, cfg: SinkConfig, batch: pa.Table) -> tuple[int, int]:
    """Upsert ``id`` + ``sparse`` rows in size-capped requests; return (upserted, empty vectors rejected).

    A store that refuses empty vectors gets none: the ids of empty vectors are deleted from it
    instead (an older vector of the document must not outlive it), so such a store holds the
    table's non-empty vectors."""
    limits = store_limits(cfg)
    rows = batch
    if not limits.accepts_empty_vectors:
        nonempty = pc.greater(pc.list_value_length(pc.struct_field(batch["sparse"], "indices")), 0)
        rows = batch.filter(nonempty)
        empty = batch.filter(pc.invert(nonempty))["id"].to_pylist()
        for i in range(0, len(empty), cfg.batch_size):
            sink.delete(empty[i : i + cfg.batch_size])
    for request in request_batches(rows, *request_limits(cfg, limits)):
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
        self.cfg = sink
        self.sink = open_sink(sink, dimension)
        self.failed: str | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        upserted = empty = 0
        if self.failed is None:
            try:
                upserted, empty = upsert_batch(self.sink, self.cfg, batch)
            except SinkError as err:
                self.failed = str(err)
        return pa.table({"upserted": [upserted], "empty": [empty], "error": pa.array([self.failed], pa.string())})
