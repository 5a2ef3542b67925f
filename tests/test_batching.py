from __future__ import annotations

import numpy as np

from pipeline.encode.batching import padded_length, plan_micro_batches


def test_padded_length() -> None:
    assert padded_length(1, 8, 512) == 8
    assert padded_length(8, 8, 512) == 8
    assert padded_length(9, 8, 512) == 16
    assert padded_length(510, 8, 510) == 510  # never padded past max_length


def test_every_document_once_longest_first_within_budget() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 300, size=500)
    batches = plan_micro_batches(lengths, max_batch_tokens=1024, pad_multiple=8, max_length=512)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(500))
    firsts = [lengths[b[0]] for b in batches]
    assert firsts == sorted(firsts, reverse=True)
    for b in batches:
        assert lengths[b].max() == lengths[b[0]]
        assert len(b) * padded_length(int(lengths[b[0]]), 8, 512) <= 1024


def test_document_larger_than_budget_runs_alone() -> None:
    batches = plan_micro_batches([500, 3, 4], max_batch_tokens=64, pad_multiple=8, max_length=512)
    assert [b.tolist() for b in batches] == [[0], [2, 1]]
