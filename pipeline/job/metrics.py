"""Metrics of the encoder actors, exported through Ray's metrics API: a Ray cluster's Prometheus
endpoint (each node's metrics agent; Grafana on top) sees them as ``ray_``-prefixed series.

- ``splade_pipeline_documents_total``: documents encoded (their blocks finished), by ``outcome``
  (``encoded`` or ``rejected``); ``rate(ray_splade_pipeline_documents_total[1m])`` is docs/s.
- ``splade_pipeline_tokens_total``: tokens encoded; its rate is tokens/s.
- ``splade_pipeline_block_documents``: documents per block an encoder was handed (a histogram).
- ``splade_pipeline_block_seconds``: seconds an encoder spent on a block (a histogram).
- ``splade_pipeline_oom_splits_total``: micro-batches halved after running out of memory.

Each series is tagged with the run's ``attempt`` (so two runs on one cluster stay apart).
"""

from __future__ import annotations

from typing import Any

PREFIX = "splade_pipeline_"
BLOCK_SIZES = [16, 64, 256, 1024, 4096, 16384]
BLOCK_SECONDS = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 300]


class EncoderMetrics:
    """An encoder actor's metrics (created in the actor; a no-op outside Ray)."""

    def __init__(self, attempt: str) -> None:
        self.tags = {"attempt": attempt}
        try:
            from ray.util.metrics import Counter, Histogram

            keys = ("attempt",)
            self.documents = Counter(PREFIX + "documents_total", "documents encoded", tag_keys=(*keys, "outcome"))
            self.tokens = Counter(PREFIX + "tokens_total", "tokens encoded", tag_keys=keys)
            self.oom_splits = Counter(PREFIX + "oom_splits_total", "micro-batches halved (out of memory)", keys)
            self.sizes = Histogram(PREFIX + "block_documents", "documents per block", BLOCK_SIZES, keys)
            self.seconds = Histogram(PREFIX + "block_seconds", "seconds per block", BLOCK_SECONDS, keys)
            self.on = True
        except Exception:  # noqa: BLE001 - no Ray worker here (Spark, a test): nothing to export to
            self.on = False

    def block(self, table: Any, seconds: float, oom_splits: int) -> None:
        """A block done: ``table`` its rows (``num_tokens`` null for a rejected one)."""
        if not self.on:
            return
        import pyarrow.compute as pc

        try:  # metrics never fail a block (Ray's Counter.inc refuses 0)
            rejected = int(table["num_tokens"].null_count)
            for value, tags in (
                (table.num_rows - rejected, {**self.tags, "outcome": "encoded"}),
                (rejected, {**self.tags, "outcome": "rejected"}),
            ):
                if value > 0:
                    self.documents.inc(value, tags)
            tokens = int(pc.sum(table["num_tokens"]).as_py() or 0)
            if tokens > 0:
                self.tokens.inc(tokens, self.tags)
            if oom_splits > 0:
                self.oom_splits.inc(oom_splits, self.tags)
            self.sizes.observe(table.num_rows, self.tags)
            self.seconds.observe(seconds, self.tags)
        except Exception:  # noqa: BLE001 - a metric is a view of the work, never a reason to fail it
            pass
