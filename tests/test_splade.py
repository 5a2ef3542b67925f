"""Pure math on hand-made tensors: pooling, activation, pruning, CSR conversion."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.encode import splade

HUGE = 1e9


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x.clone()  # a fresh scratch chunk, as a real head returns


def _hand_made() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """3 documents of lengths 4, 2, 3 over a vocab of 5; padded positions hold HUGE."""
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 5)
    lengths = [4, 2, 3]
    mask = torch.zeros(3, 4, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        logits[row, n:] = HUGE
    return logits, mask, lengths


def _definition(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """w_j = max over real i of log(1 + relu(logit_ij)), elementwise, no tricks."""
    out = torch.zeros(logits.shape[0], logits.shape[2])
    for b in range(logits.shape[0]):
        for i in range(logits.shape[1]):
            if mask[b, i]:
                out[b] = torch.maximum(out[b], torch.log1p(torch.relu(logits[b, i])))
    return out


@pytest.mark.parametrize("chunk_tokens", [1, 2, 3, 5, 12, 1000])
def test_pooling_ignores_padding_and_matches_definition(chunk_tokens: int) -> None:
    logits, mask, lengths = _hand_made()
    max_logits = splade.pooled_max_logits(logits.clone(), mask, lengths, _identity, 5, chunk_tokens)
    weights = splade.splade_activation_(max_logits)
    assert weights.max() < 10, "a padded position leaked into the max"
    torch.testing.assert_close(weights, _definition(logits, mask), rtol=0, atol=0)


def test_pooling_rows_not_sorted_by_length() -> None:
    logits, mask, lengths = _hand_made()  # lengths 4, 2, 3: rows active at position 2 are {0, 2}
    got = splade.pooled_max_logits(logits.clone(), mask, lengths, _identity, 5, chunk_tokens=2)
    torch.testing.assert_close(splade.splade_activation_(got), _definition(logits, mask), rtol=0, atol=0)


def test_pooling_skips_chunks_past_each_document() -> None:
    logits, mask, lengths = _hand_made()
    seen: list[tuple[int, int]] = []

    def head(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape[:2]))
        return x.clone()

    splade.pooled_max_logits(logits, mask, lengths, head, 5, chunk_tokens=3)
    assert sum(rows * cols for rows, cols in seen) == sum(lengths)  # no head work on padding
    assert all(rows * cols <= 3 for rows, cols in seen)


@pytest.mark.parametrize("chunk_tokens", [1, 2, 3, 4, 5, 9, 100])
def test_head_steps_cover_every_row_once(chunk_tokens: int) -> None:
    lengths = [4, 2, 3]
    steps = splade.head_steps(lengths, chunk_tokens)
    assert [s[0] for s in steps] == [0] + [s[1] for s in steps[:-1]] and steps[-1][1] == 9  # contiguous
    assert all(stop - start <= chunk_tokens for start, stop, _ in steps)
    rows_of = {doc: [] for doc in range(3)}
    for start, stop, pieces in steps:
        assert pieces[0][1] == start and pieces[-1][2] == stop
        for doc, a, b in pieces:
            rows_of[doc] += list(range(a, b))
    assert rows_of == {0: [0, 1, 2, 3], 1: [4, 5], 2: [6, 7, 8]}
    assert splade.head_steps([4, 2, 3], 3)[1] == (3, 6, [(0, 3, 4), (1, 4, 6)])


@pytest.mark.parametrize(("chunk_tokens", "vocab_chunk"), [(1, 1), (2, 3), (3, 2), (5, 5), (100, 7)])
def test_packed_pooling_matches_definition(chunk_tokens: int, vocab_chunk: int) -> None:
    logits, mask, lengths = _hand_made()
    # Packed rows: each document's real positions back to back; the "decoder" is the identity
    # matrix plus a bias, so its outputs are the hand-made logits plus that bias.
    packed = torch.cat([logits[b, :n] for b, n in enumerate(lengths)])
    decoder = torch.nn.Linear(5, 5).requires_grad_(False)
    decoder.weight.copy_(torch.eye(5))
    decoder.bias.copy_(torch.tensor([0.5, -0.25, 0.0, 1.0, -3.0]))
    got = splade.packed_max_logits(packed, lengths, _identity, decoder, chunk_tokens, vocab_chunk)
    assert got.max() < 10, "a padded position leaked into the max"
    shifted = logits + decoder.bias
    torch.testing.assert_close(splade.splade_activation_(got), _definition(shifted, mask), rtol=0, atol=0)


def test_masked_max_counts_negative_logits_and_bf16() -> None:
    running = torch.full((1, 3), float("-inf"))
    chunk = torch.tensor([[[-2.0, -1.0, HUGE], [-3.0, 0.5, HUGE]]], dtype=torch.bfloat16)
    splade.masked_max_(running, chunk, torch.tensor([[1, 1]]))
    assert running.dtype == torch.float32
    torch.testing.assert_close(running, torch.tensor([[-2.0, 0.5, HUGE]]), rtol=1e-2, atol=0)


def test_activation_values() -> None:
    x = torch.tensor([[float("-inf"), -5.0, 0.0, 1.0, math.e - 1]])
    torch.testing.assert_close(splade.splade_activation_(x), torch.tensor([[0.0, 0.0, 0.0, math.log(2), 1.0]]))


def test_prune_min_weight_then_top_k() -> None:
    w = torch.tensor([[0.125, 0.5, 0.375, 0.0, 0.875], [0.25, 0.0, 0.0, 0.0, 0.0]])
    got = splade.prune_(w.clone(), top_k=2, min_weight=0.25)
    assert got.tolist() == [[0.0, 0.5, 0.0, 0.0, 0.875], [0.25, 0.0, 0.0, 0.0, 0.0]]  # min_weight is kept
    assert splade.prune_(w.clone(), top_k=None, min_weight=0.0).tolist() == w.tolist()
    assert splade.prune_(w.clone(), top_k=3, min_weight=0.0)[0].tolist() == [0.0, 0.5, 0.375, 0.0, 0.875]
    assert splade.prune_(w.clone(), top_k=1, min_weight=0.3).tolist() == [[0.0] * 4 + [0.875], [0.0] * 5]


def test_to_csr_ascending_and_empty_rows() -> None:
    w = torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 4.0]])
    offsets, indices, values = splade.to_csr(w)
    assert offsets.tolist() == [0, 2, 2, 4]
    assert indices.tolist() == [1, 3, 0, 3] and indices.dtype == np.int32
    assert values.tolist() == [2.0, 1.0, 3.0, 4.0] and values.dtype == np.float32


def test_csr_take_rows_reorders() -> None:
    offsets = np.array([0, 2, 2, 5], dtype=np.int32)
    indices = np.array([1, 4, 0, 2, 3], dtype=np.int32)
    values = np.array([1, 2, 3, 4, 5], dtype=np.float32)
    o, i, v = splade.csr_take_rows(offsets, indices, values, np.array([2, 0, 1]))
    assert o.tolist() == [0, 3, 5, 5]
    assert i.tolist() == [0, 2, 3, 1, 4]
    assert v.tolist() == [3, 4, 5, 1, 2]


def _csr(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return splade.to_csr(torch.from_numpy(dense))


def _dense(csr: tuple[np.ndarray, np.ndarray, np.ndarray], vocab: int) -> np.ndarray:
    offsets, indices, values = csr
    out = np.zeros((len(offsets) - 1, vocab), dtype=np.float32)
    for row in range(len(offsets) - 1):
        out[row, indices[offsets[row] : offsets[row + 1]]] = values[offsets[row] : offsets[row + 1]]
    return out


def test_csr_max_by_group_is_the_dense_max_and_keeps_nan() -> None:
    rng = np.random.default_rng(3)
    dense = np.where(rng.random((9, 40)) < 0.3, rng.random((9, 40)), 0.0).astype(np.float32)
    dense[4] = 0.0  # a window with no term
    group = np.array([2, 0, 2, 2, 1, 0, 4, 2, 0])  # unsorted; group 3 has no row
    got = splade.csr_max_by_group(*_csr(dense), group, 5)
    want = np.stack([dense[group == g].max(axis=0) if (group == g).any() else np.zeros(40) for g in range(5)])
    np.testing.assert_array_equal(_dense(got, 40), want)
    assert got[0][3] == got[0][4]  # group 3: an empty row
    for g in range(5):
        row = got[1][got[0][g] : got[0][g + 1]]
        assert np.all(np.diff(row) > 0)
    dense[3, 7] = np.nan  # a broken window: its document is seen as broken, not silently repaired
    nan_row = _dense(splade.csr_max_by_group(*_csr(dense), group, 5), 40)[2]
    assert np.isnan(nan_row[7]) and np.isnan(nan_row).sum() == 1
    empty = splade.csr_max_by_group(np.zeros(1, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32), group[:0], 2)
    assert empty[0].tolist() == [0, 0, 0] and len(empty[1]) == 0


@pytest.mark.parametrize("top_k", [1, 3, 7, 100, None])
def test_csr_top_k_equals_dense_pruning(top_k: int | None) -> None:
    rng = np.random.default_rng(5)
    dense = np.where(rng.random((6, 30)) < 0.4, rng.random((6, 30)), 0.0).astype(np.float32)
    dense[2] = 0.0
    offsets, indices, values = splade.csr_top_k(*_csr(dense), top_k)
    want = splade.prune_(torch.from_numpy(dense.copy()), top_k, 0.0).numpy()
    np.testing.assert_array_equal(_dense((offsets, indices, values), 30), want)
    for row in range(6):
        assert np.all(np.diff(indices[offsets[row] : offsets[row + 1]]) > 0)
    dense[0, 3] = np.nan  # NaN ranks first: kept, so the row is rejected downstream rather than cleaned
    kept = _dense(splade.csr_top_k(*_csr(dense), 1), 30)[0]
    assert np.isnan(kept[3]) and np.count_nonzero(kept) == 1


def test_csr_top_k_keeps_the_lower_indices_among_ties() -> None:
    dense = np.array([[0.0, 2.0, 1.0, 1.0, 0.0, 1.0]], dtype=np.float32)
    offsets, indices, values = splade.csr_top_k(*_csr(dense), 3)
    assert indices.tolist() == [1, 2, 3] and values.tolist() == [2.0, 1.0, 1.0] and offsets.tolist() == [0, 3]
