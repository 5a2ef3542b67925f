"""Token-budget micro-batching: which documents run through the model together.

Sorting by length and cutting by padded tokens (not by a fixed count) keeps padding low and
the work per forward pass near constant, whatever the mix of short and long documents.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def padded_length(length: int, multiple: int, cap: int) -> int:
    """``length`` rounded up to a multiple of ``multiple`` (tensor-core friendly), at most ``cap``."""
    return min(-(-length // multiple) * multiple, max(cap, length))


def plan_micro_batches(
    lengths: Sequence[int], max_batch_tokens: int, pad_multiple: int, max_length: int
) -> list[np.ndarray]:
    """Split documents into micro-batches of positions into ``lengths``.

    Documents are taken longest first, so every batch is right-padded to its first (longest)
    document and holds as many documents as fit ``max_batch_tokens`` padded tokens (at least
    one: a single document is never split). Longest first also means an out-of-memory shows
    on the first batch, not after an hour.
    """
    lens = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lens, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        width = padded_length(int(lens[order[start]]), pad_multiple, max_length)
        count = max(1, max_batch_tokens // width)
        batches.append(order[start : start + count])
        start += count
    return batches
