"""SpladeEncoder against the plain reference on the same weights, and its contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from support.reference import LONG, TEXTS, VOCAB, densify, reference_splade

from pipeline import SPARSE_TYPE, SpladeEncoder
from pipeline.encode.sparse import sparse_rows


def _check_rows(vectors: pa.StructArray, vocab: int) -> None:
    assert vectors.type == SPARSE_TYPE
    for indices, values in sparse_rows(vectors):
        assert indices.dtype == np.int32 and values.dtype == np.float32
        assert np.all(np.diff(indices) > 0), "indices must be strictly ascending"
        assert indices.size == 0 or (indices[0] >= 0 and indices[-1] < vocab)
        assert np.all(values > 0)


@pytest.mark.parametrize(
    ("kind", "packed"),
    [("bert", True), ("bert", False), ("distilbert", True), ("distilbert", False), ("roberta", None)],
)
def test_random_models_match_reference(tiny_models: dict[str, Path], kind: str, packed: bool | None) -> None:
    # Small budgets and head chunks force several micro-batches and many head steps.
    enc = SpladeEncoder(
        str(tiny_models[kind]), device="cpu", max_length=64, max_batch_tokens=96, head_chunk_tokens=7, packed=packed
    )
    assert enc.parts.kind == {"bert": "bert", "distilbert": "distilbert", "roberta": "generic"}[kind]
    assert (enc.packed is not None) == bool(packed)  # roberta: the library's forward, whatever the default
    got = enc.encode(TEXTS)
    _check_rows(got, VOCAB)
    want = reference_splade(str(tiny_models[kind]), TEXTS, max_length=64)
    assert np.count_nonzero(want) > 1000, "the reference is degenerate"
    assert np.abs(densify(got, VOCAB) - want).max() <= 1e-5


@pytest.mark.parametrize("packed", [True, False])
def test_splade_tiny_matches_reference(splade_tiny: Path, packed: bool) -> None:
    enc = SpladeEncoder(str(splade_tiny), device="cpu", max_batch_tokens=256, head_chunk_tokens=33, packed=packed)
    got = enc.encode(TEXTS)
    _check_rows(got, VOCAB)
    want = reference_splade(str(splade_tiny), TEXTS)
    assert np.abs(densify(got, VOCAB) - want).max() <= 1e-5


def test_packed_is_the_cpu_default_and_equal_lengths_need_no_padding(splade_tiny: Path) -> None:
    from pipeline.encode.screen import bf16_products_pay

    auto = SpladeEncoder(str(splade_tiny), device="cpu")
    pays = bf16_products_pay(auto.parts.decoder, auto.device)  # native bf16 (AMX, AVX512-BF16) or not
    assert auto.packed is not None and (auto.screen is not None) == pays and f"screen={pays}" in repr(auto)
    enc = SpladeEncoder(str(splade_tiny), device="cpu", screen=True)  # asked for: screened even where it is slow
    assert "packed=True, screen=True" in repr(enc)
    same = ["alpha beta gamma", "delta epsilon zeta", "one two three"]  # 5 tokens each: no padded layout
    assert len({len(ids) for ids in enc.tokenizer(same)["input_ids"]}) == 1
    want = reference_splade(str(splade_tiny), same)
    assert np.abs(densify(enc.encode(same), VOCAB) - want).max() <= 1e-5
    # The bf16 screen recomputed a small share of the vocabulary in fp32, at least every weighted term.
    assert np.count_nonzero(want) <= enc.screen.kept < 0.05 * VOCAB * len(same)


@pytest.mark.parametrize("screen", [True, False])
def test_screened_and_unscreened_decoders_agree(splade_tiny: Path, screen: bool) -> None:
    enc = SpladeEncoder(str(splade_tiny), device="cpu", screen=screen, max_batch_tokens=64, head_chunk_tokens=9)
    assert (enc.screen is not None) == screen
    want = reference_splade(str(splade_tiny), TEXTS)
    got = densify(enc.encode(TEXTS), VOCAB)
    assert np.abs(got - want).max() <= 1e-5 and np.array_equal(got > 0, want > 0)


@pytest.mark.parametrize("pays", [True, False])
def test_the_screen_is_on_by_default_only_where_bf16_products_are_faster(
    splade_tiny: Path, monkeypatch: pytest.MonkeyPatch, pays: bool
) -> None:
    """Without native bf16 a CPU emulates bf16 products ~30x slower than fp32: screening there
    would cost, not save (the vectors are the same either way)."""
    from pipeline.encode import screen

    probe = SpladeEncoder(str(splade_tiny), device="cpu", screen=False)
    monkeypatch.setitem(screen._PAYS, (tuple(probe.parts.decoder.weight.shape), "cpu"), pays)
    assert (SpladeEncoder(str(splade_tiny), device="cpu").screen is not None) == pays


def test_screen_refused_where_it_cannot_apply(splade_tiny: Path, tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="screen: true cannot be used: it screens fp32 logits, and dtype is bfloat16"):
        SpladeEncoder(str(splade_tiny), device="cpu", dtype="bfloat16", screen=True)
    with pytest.raises(ValueError, match="it needs the packed path"):
        SpladeEncoder(str(tiny_models["roberta"]), device="cpu", screen=True)
    with pytest.raises(ValueError, match=r"packed: true cannot be used with this model \(RobertaForMaskedLM\)"):
        SpladeEncoder(str(tiny_models["roberta"]), device="cpu", packed=True)
    assert SpladeEncoder(str(splade_tiny), device="cpu", dtype="bfloat16").screen is None  # auto: quietly off


def test_batch_invariance_and_order(splade_tiny: Path) -> None:
    batched = SpladeEncoder(str(splade_tiny), device="cpu", max_length=64)
    together = densify(batched.encode(TEXTS), VOCAB)
    alone = np.stack([densify(batched.encode([t]), VOCAB)[0] for t in TEXTS])
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)
    for budget in (8, 64, 200, 100_000):
        other = SpladeEncoder(
            str(splade_tiny), device="cpu", max_length=64, max_batch_tokens=budget, head_chunk_tokens=5
        )
        np.testing.assert_allclose(densify(other.encode(TEXTS), VOCAB), together, rtol=0, atol=1e-5)
    reversed_ = densify(batched.encode(TEXTS[::-1]), VOCAB)[::-1]
    np.testing.assert_allclose(reversed_, together, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(together[0], together[6])  # duplicates in one call: same vector
    assert np.count_nonzero(together[2]) > 0  # the empty string still has [CLS] [SEP]


def test_truncation_reported(splade_tiny: Path) -> None:
    enc = SpladeEncoder(str(splade_tiny), device="cpu", max_length=32)
    out = enc.encode_batch(["two words", LONG, "x " * 30])  # 30 + 2 tokens fits exactly
    assert out.num_tokens.tolist() == [4, 32, 32]
    assert out.truncated.tolist() == [False, True, False]
    # A truncated text equals its own first 30 word pieces.
    head = enc.tokenizer.convert_tokens_to_string(enc.tokenizer.tokenize(LONG)[:30])
    np.testing.assert_allclose(densify(enc.encode([LONG]), VOCAB), densify(enc.encode([head]), VOCAB), atol=1e-5)


def test_top_k_and_min_weight(splade_tiny: Path) -> None:
    full = densify(SpladeEncoder(str(splade_tiny), device="cpu").encode(TEXTS), VOCAB)
    top = densify(SpladeEncoder(str(splade_tiny), device="cpu", top_k=5).encode(TEXTS), VOCAB)
    for f, t in zip(full, top):
        assert np.count_nonzero(t) == min(5, np.count_nonzero(f))
        kept = np.flatnonzero(t)
        assert f[kept].min() >= np.sort(f)[-5] - 1e-6  # the five largest
        np.testing.assert_allclose(t[kept], f[kept], atol=1e-5)
    pruned = densify(SpladeEncoder(str(splade_tiny), device="cpu", min_weight=1.0).encode(TEXTS), VOCAB)
    np.testing.assert_allclose(pruned, np.where(full >= 1.0, full, 0.0), atol=1e-5)
    assert 0 < np.count_nonzero(pruned) < np.count_nonzero(full)


def test_decode_round_trip(splade_tiny: Path) -> None:
    enc = SpladeEncoder(str(splade_tiny), device="cpu")
    vectors = enc.encode(TEXTS[:2])
    for (indices, values), terms in zip(sparse_rows(vectors), enc.decode(vectors)):
        weights = list(terms.values())
        assert weights == sorted(weights, reverse=True)
        ids = enc.tokenizer.convert_tokens_to_ids(list(terms))
        assert dict(zip(ids, weights)) == dict(zip(indices.tolist(), values.tolist()))
    assert len(enc.decode(vectors, top=3)[0]) == 3


def test_empty_input(splade_tiny: Path) -> None:
    out = SpladeEncoder(str(splade_tiny), device="cpu").encode_batch([])
    assert len(out.sparse) == 0 and out.sparse.type == SPARSE_TYPE and out.num_tokens.size == 0


def test_bad_inputs_and_settings(splade_tiny: Path) -> None:
    enc = SpladeEncoder(str(splade_tiny), device="cpu")
    with pytest.raises(TypeError, match=r"texts\[2\] is NoneType"):
        enc.encode(["a", "b", None])
    with pytest.raises(TypeError, match="not a single string"):
        enc.encode("a lone string")
    with pytest.raises(ValueError, match=r"max_length: 1024 exceeds .*\(512 tokens\)"):
        SpladeEncoder(str(splade_tiny), device="cpu", max_length=1024)
    with pytest.raises(ValueError, match="top_kk"):
        SpladeEncoder(str(splade_tiny), top_kk=3)
    with pytest.raises(ValueError, match="dtype"):
        SpladeEncoder(str(splade_tiny), dtype="float8")
    with pytest.raises(ValueError, match="unknown bundled model"):
        SpladeEncoder("bundled:nope")


def test_out_of_memory_halves_the_micro_batch(splade_tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A micro-batch that runs out of memory is retried as two halves, down to one text: same vectors."""
    import torch

    from pipeline.job.faults import OOM_ABOVE, out_of_memory_point

    texts = [f"{t} {i}" for i, t in enumerate(TEXTS * 4)]
    encoder = SpladeEncoder(str(splade_tiny), device="cpu", max_batch_tokens=4096)
    encoder.before_forward = out_of_memory_point  # as the job's encoder actors set it
    clean = encoder.encode_batch(texts)
    assert clean.oom_splits == 0
    monkeypatch.setenv(OOM_ABOVE, "600")  # far below the 4096-token budget, above one 512-token text
    squeezed = encoder.encode_batch(texts)
    assert squeezed.oom_splits >= 3
    np.testing.assert_allclose(densify(squeezed.sparse, 30522), densify(clean.sparse, 30522), rtol=0, atol=1e-5)
    monkeypatch.setenv(OOM_ABOVE, "4")  # not even one text fits: the error is raised, not looped on
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        encoder.encode_batch(texts[:3])


@pytest.mark.parametrize("packed", [True, False])
def test_cpu_bfloat16_keeps_the_top_terms(splade_tiny: Path, packed: bool) -> None:
    enc = SpladeEncoder(str(splade_tiny), device="cpu", dtype="bfloat16", packed=packed)
    got = densify(enc.encode(TEXTS), VOCAB)
    want = reference_splade(str(splade_tiny), TEXTS)
    k = 32
    overlap = np.mean([len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k for a, b in zip(got, want)])
    assert overlap >= 0.9
    assert 0 < np.abs(got - want).max() < 0.5  # bf16 rounding shows, but only as rounding
