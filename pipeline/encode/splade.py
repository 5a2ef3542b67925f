"""SPLADE pooling, pruning and sparse conversion: pure torch, no I/O, no models.

For a document with real tokens ``i`` (attention mask 1, [CLS] and [SEP] included, as in
naver/splade) and masked-LM logits ``logit[i, j]``, the SPLADE weight of vocabulary term ``j``
is::

    w_j = max_i log(1 + relu(logit[i, j]))

``log1p(relu(.))`` is monotonic non-decreasing, so it commutes with the max:
``w_j = log1p(relu(max_i logit[i, j]))``. That lets us keep only a running ``[batch, vocab]``
max of the raw logits while the head runs over chunks of sequence positions, and apply the
activation once at the end: peak extra memory is O(batch x chunk x vocab), never
O(batch x seq x vocab), and the result is the same float for float (a max is exact and the
activation is applied to the very value the elementwise form would pick).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

Head = Callable[[torch.Tensor], torch.Tensor]


def masked_max_(running: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> None:
    """Fold ``logits`` ``[B, C, V]`` into ``running`` ``[B, V]`` (fp32), in place.

    Positions where ``mask`` ``[B, C]`` is 0 never contribute, whatever their logits hold.
    ``logits`` is overwritten (it is a scratch chunk).
    """
    logits.masked_fill_(~mask.bool().unsqueeze(-1), float("-inf"))
    torch.maximum(running, logits.amax(dim=1).to(running.dtype), out=running)


def pooled_max_logits(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    lengths: Sequence[int],
    head: Head,
    vocab_size: int,
    chunk_tokens: int,
) -> torch.Tensor:
    """Masked max over positions of ``head(hidden)``, computed a few positions at a time.

    ``hidden`` is ``[B, L, H]`` (right padded), ``lengths`` the real token count per row (on
    the host, so no device sync is needed to plan chunks). Rows whose document has ended
    before a chunk starts are skipped for that chunk, so padding costs no head FLOPs when
    rows are sorted by length. Each chunk spans about ``chunk_tokens`` (row, position) pairs.
    Returns the fp32 ``[B, V]`` max of the raw logits (``-inf`` where a row has no token).
    """
    batch, seq_len = attention_mask.shape
    lens = np.asarray(lengths, dtype=np.int64)
    running = torch.full((batch, vocab_size), float("-inf"), dtype=torch.float32, device=hidden.device)
    start = 0
    while start < seq_len:
        active = np.flatnonzero(lens > start)
        if active.size == 0:
            break
        stop = min(seq_len, start + max(1, chunk_tokens // active.size))
        if active[-1] == active.size - 1:  # a prefix of rows: slicing, no gather
            rows = slice(0, active.size)
            logits = head(hidden[rows, start:stop])
            masked_max_(running[rows], logits, attention_mask[rows, start:stop])
        else:
            idx = torch.as_tensor(active, device=hidden.device)
            logits = head(hidden[idx, start:stop])
            sub = running[idx]
            masked_max_(sub, logits, attention_mask[idx, start:stop])
            running[idx] = sub
        start = stop
    return running


# Vocabulary columns per decoder product in the padding-free head. Measured with
# `python -m benchmarks.pooling_memory` on a 2-core x86_64 Xeon VM with AMX (bert-base decoder,
# 2048 packed tokens): 2048 columns ran at 314 GFLOP/s including the max,
# against 240-258 for the whole vocabulary at once (a [tokens, 30522] product overflows the caches).
VOCAB_CHUNK = 2048


def head_steps(lengths: Sequence[int], chunk_tokens: int) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """Cut packed rows (documents back to back, ``lengths`` each) into MLM-head steps.

    Each step is ``(start, stop, pieces)``: rows ``start:stop``, at most ``chunk_tokens`` of
    them, and ``pieces`` the ``(document, start, stop)`` row ranges inside it. A document
    longer than the room left is split across steps.
    """
    steps: list[tuple[int, int, list[tuple[int, int, int]]]] = []
    step_start, pieces, pos = 0, [], 0
    for doc, length in enumerate(int(n) for n in lengths):
        end = pos + length
        while pos < end:
            room = chunk_tokens - (pos - step_start)
            if room == 0:
                steps.append((step_start, pos, pieces))
                step_start, pieces = pos, []
                continue
            take = min(room, end - pos)
            pieces.append((doc, pos, pos + take))
            pos += take
    if pieces:
        steps.append((step_start, pos, pieces))
    return steps


def packed_max_logits(
    hidden: torch.Tensor,
    lengths: Sequence[int],
    transform: Head,
    decoder: torch.nn.Linear,
    chunk_tokens: int,
    vocab_chunk: int = VOCAB_CHUNK,
) -> torch.Tensor:
    """Per-document max over positions of ``decoder(transform(hidden))`` for packed rows.

    ``hidden`` is ``[T, H]``: document ``b``'s real tokens back to back, ``lengths[b]`` rows
    each, no padding, so no masking is needed. The decoder's bias is added after the max:
    ``max_i fl(a_i + b) == fl(max_i a_i + b)`` because rounding is monotonic, so that is exact.
    Returns the fp32 ``[B, V]`` max of the raw logits.
    """
    out = segment_max_products(transform(hidden), lengths, decoder.weight.t(), chunk_tokens, vocab_chunk)
    if decoder.bias is not None:
        out += decoder.bias.float()
    return out


def segment_max_products(
    rows: torch.Tensor,
    lengths: Sequence[int],
    weight_t: torch.Tensor,
    chunk_tokens: int,
    vocab_chunk: int = VOCAB_CHUNK,
) -> torch.Tensor:
    """``[B, V]`` fp32: for each document (``lengths[b]`` consecutive rows), the column-wise
    max of ``rows @ weight_t`` over its rows, computed ``chunk_tokens`` rows x ``vocab_chunk``
    columns at a time (``weight_t`` is ``[H, V]``, e.g. a transposed decoder weight)."""
    vocab = weight_t.shape[1]
    first_row = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]])
    out = torch.empty((len(lengths), vocab), dtype=torch.float32, device=rows.device)
    for start, stop, pieces in head_steps(lengths, chunk_tokens):
        step = rows[start:stop]
        for col in range(0, vocab, vocab_chunk):
            logits = torch.mm(step, weight_t[:, col : col + vocab_chunk])
            for doc, a, b in pieces:
                best = logits[a - start : b - start].amax(dim=0)
                target = out[doc, col : col + vocab_chunk]
                if a == first_row[doc]:
                    target.copy_(best)
                else:  # the rest of a document split across steps
                    torch.maximum(target, best.float(), out=target)
    return out


def splade_activation_(max_logits: torch.Tensor) -> torch.Tensor:
    """``log(1 + relu(x))`` in place; rows with no token (``-inf``) become all zeros."""
    return max_logits.clamp_(min=0.0).log1p_()


def prune_(weights: torch.Tensor, top_k: int | None, min_weight: float) -> torch.Tensor:
    """Zero every weight below ``min_weight``, then keep at most the ``top_k`` largest per row.

    Ties at the k-th weight are broken by ``torch.topk``; zeros are never kept as terms.
    """
    if min_weight > 0:
        weights.masked_fill_(weights < min_weight, 0.0)
    if top_k is not None and top_k < weights.shape[1]:
        kept = torch.zeros_like(weights)
        values, indices = torch.topk(weights, top_k, dim=1, sorted=False)
        kept.scatter_(1, indices, values)
        weights = kept
    return weights


def to_csr(weights: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense ``[B, V]`` weights to CSR on the host: ``(offsets int32[B+1], indices int32, values float32)``.

    Row ``r`` owns ``indices[offsets[r]:offsets[r+1]]``, strictly ascending, with values > 0, or
    NaN: a NaN weight (an overflow upstream) is kept, never silently dropped, so callers see it
    (the job rejects such rows).
    """
    nonzero = ~(weights <= 0)  # NaN compares false both ways: kept
    coords = nonzero.nonzero()  # row-major, so columns ascend within each row
    values = weights[coords[:, 0], coords[:, 1]].float()
    counts = nonzero.sum(dim=1)
    offsets = np.zeros(weights.shape[0] + 1, dtype=np.int32)
    np.cumsum(counts.cpu().numpy(), out=offsets[1:])
    return offsets, coords[:, 1].to(torch.int32).cpu().numpy(), values.cpu().numpy()


def csr_take_rows(
    offsets: np.ndarray, indices: np.ndarray, values: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorder CSR rows: row ``r`` of the result is row ``rows[r]`` of the input (vectorised)."""
    counts = np.diff(offsets)[rows]
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(counts, out=new_offsets[1:])
    gather = np.repeat(offsets[:-1][rows] - new_offsets[:-1], counts) + np.arange(new_offsets[-1])
    return new_offsets, indices[gather], values[gather]


def csr_max_by_group(
    offsets: np.ndarray, indices: np.ndarray, values: np.ndarray, group: np.ndarray, groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Element-wise max of CSR rows by ``group`` (row ``r`` belongs to ``group[r]`` in ``[0, groups)``):
    row ``g`` of the result holds, per term, the largest weight any of its rows gives it (a NaN wins,
    so a broken window is seen). Indices ascend within each row, as :func:`to_csr` leaves them."""
    row_group = np.repeat(group.astype(np.int64), np.diff(offsets))
    order = np.lexsort((indices, row_group))
    g, i, v = row_group[order], indices[order], values[order]
    first = np.ones(len(g), dtype=bool)
    first[1:] = (g[1:] != g[:-1]) | (i[1:] != i[:-1])
    starts = np.flatnonzero(first)
    top = np.maximum.reduceat(v, starts) if len(v) else v
    new_offsets = np.zeros(groups + 1, dtype=np.int32)
    np.cumsum(np.bincount(g[starts], minlength=groups), out=new_offsets[1:])
    return new_offsets, i[starts].astype(np.int32), top.astype(np.float32)


def csr_top_k(
    offsets: np.ndarray, indices: np.ndarray, values: np.ndarray, top_k: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep at most the ``top_k`` largest weights of each CSR row (a NaN counts as the largest),
    indices still ascending: :func:`prune_` for rows already on the host. Ties at the k-th weight
    are kept in index order."""
    counts = np.diff(offsets)
    if top_k is None or not len(counts) or counts.max() <= top_k:
        return offsets, indices, values
    row = np.repeat(np.arange(len(counts)), counts)
    rank_key = np.where(np.isnan(values), -np.inf, -values.astype(np.float64))
    by_weight = np.lexsort((indices, rank_key, row))  # per row: heaviest first
    rank = np.empty(len(values), dtype=np.int64)
    rank[by_weight] = np.arange(len(values)) - np.repeat(offsets[:-1], counts)
    keep = rank < top_k
    new_offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(np.minimum(counts, top_k), out=new_offsets[1:])
    return new_offsets, indices[keep], values[keep]
