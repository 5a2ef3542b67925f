"""Certified bf16 screening of the decoder: never drops a term that has weight, same fp32 values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support.reference import densify

from pipeline.encode import splade
from pipeline.encode.screen import (
    MARGIN,
    ScreenedDecoder,
    bf16_error_coefficient,
    bf16_products_accumulate_in_fp32,
    worst_case_rows,
)

LENGTHS = [7, 3, 12, 5]
HIDDEN, VOCAB = 96, 3000


def _decoder_and_rows() -> tuple[torch.nn.Linear, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    decoder = torch.nn.Linear(HIDDEN, VOCAB).requires_grad_(False)
    decoder.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=gen) * 0.1)
    decoder.bias.copy_(torch.randn(VOCAB, generator=gen) - 2.5)  # most terms never reach a positive logit
    rows = torch.nn.functional.layer_norm(torch.randn(sum(LENGTHS), HIDDEN, generator=gen) * 2, (HIDDEN,))
    return decoder, rows


def _exact(decoder: torch.nn.Linear, rows: torch.Tensor) -> torch.Tensor:
    return splade.packed_max_logits(rows, LENGTHS, lambda x: x, decoder, chunk_tokens=64)


def fp32_noise(decoder: torch.nn.Linear, rows: torch.Tensor) -> torch.Tensor:
    """How far two fp32 computations of the same weights may differ, per term ``[V]``.

    The screened recompute and the reference sum the same ``HIDDEN`` products in different
    orders (and blockings). Each fp32 dot product errs by at most ``gamma_n * sum_k |h_k w_k|``
    with ``gamma_n = n u / (1 - n u)``, ``u = 2^-24`` (Higham, Accuracy and Stability of
    Numerical Algorithms, 3.1), so two of them differ by at most twice that, plus one rounding
    of the bias add on each side; ``log1p(relu(.))`` has slope <= 1 and cannot widen it.
    """
    u = 2.0**-24
    gamma = HIDDEN * u / (1 - HIDDEN * u)
    products = (rows.abs().double() @ decoder.weight.abs().double().t()).amax(dim=0)  # max_i sum_k |h_ik w_jk|
    largest = products + decoder.bias.abs().double()
    return (2 * gamma * products + 2 * u * largest).float()


def test_bf16_products_on_this_cpu_are_within_the_bound() -> None:
    assert bf16_products_accumulate_in_fp32(torch.device("cpu"))


@pytest.mark.parametrize("chunk_tokens", [4, 64])
def test_screened_weights_equal_the_fp32_ones(chunk_tokens: int) -> None:
    decoder, rows = _decoder_and_rows()
    screened = ScreenedDecoder(decoder)
    got = splade.splade_activation_(screened.max_logits(rows, LENGTHS, chunk_tokens))
    want = splade.splade_activation_(_exact(decoder, rows))
    assert 20 < int((want > 0).sum(dim=1).min())  # every document has weighted terms
    assert bool(((got - want).abs() <= fp32_noise(decoder, rows)).all())
    assert torch.equal(got > 0, want > 0)
    # And it did screen: far fewer terms recomputed than the vocabulary, at least the non-zeros.
    assert screened.documents == len(LENGTHS)
    assert int((want > 0).sum()) <= screened.kept < 0.2 * VOCAB * len(LENGTHS)


def test_terms_just_above_zero_are_kept_and_just_below_are_zero() -> None:
    decoder, rows = _decoder_and_rows()
    products = rows.double() @ decoder.weight.double().t()  # [T, V]
    doc0 = products[: LENGTHS[0]].amax(dim=0)
    # Move every bias so that document 0's largest logit is +-1e-3: the bf16 pass alone could not
    # tell these apart (its error is up to ~MARGIN x ||h|| ||w||, far more than 1e-3).
    assert float(MARGIN * rows.norm(dim=1).max() * decoder.weight.norm(dim=1).min()) > 1e-2
    sign = torch.where(torch.arange(VOCAB) % 2 == 0, 1.0, -1.0).double()
    decoder.bias.copy_((-doc0 + sign * 1e-3).float())
    got = splade.splade_activation_(ScreenedDecoder(decoder).max_logits(rows, LENGTHS, 64))
    want = splade.splade_activation_(_exact(decoder, rows))
    assert torch.equal(got[0] > 0, want[0] > 0)
    assert int((got[0] > 0).sum()) >= VOCAB // 2 - 5  # about the even terms, all kept
    assert bool(((got - want).abs() <= fp32_noise(decoder, rows)).all())


EPSILON = 0.0356  # the exact largest logit of the planted term: weight log1p(0.0356) = 0.035


def _adversarial_model(folder: Path, tokenizer_from: Path) -> tuple[Path, int]:
    """A BERT masked-LM at bert-base width whose head makes one term's bf16 screen err as far as it
    can: every token's transformed row is :func:`worst_case_rows`' ``h`` (LayerNorm scale 0, shift
    ``h``), the term's decoder row its ``w``, and the bias leaves the exact logit at ``EPSILON``.
    Every other term has a zero decoder row and bias -100 (weight 0)."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=64
    )
    config.tie_word_embeddings = False
    model = BertForMaskedLM(config).eval()
    h, w = worst_case_rows(768)
    term = 2003
    with torch.no_grad():
        transform = model.cls.predictions.transform
        transform.LayerNorm.weight.zero_()
        transform.LayerNorm.bias.copy_(h[0])
        decoder = model.cls.predictions.decoder
        decoder.weight.zero_()
        decoder.weight[term] = w[0]
        bias = torch.full((30522,), -100.0)
        bias[term] = float(-(h.double() @ w.double().t()).item() + EPSILON)
        decoder.bias.copy_(bias)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    return folder, term


def test_screen_keeps_a_term_every_rounding_works_against(
    splade_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the public encoder with the screen on (the default where bf16 is native): the planted
    term, whose bf16 logit errs by 0.0102 S (all roundings the same way), keeps its exact weight 0.035."""
    from pipeline import SpladeEncoder
    from pipeline.encode import screen as screen_module

    folder, term = _adversarial_model(tmp_path / "adversarial", splade_tiny)
    texts = ["machine learning algorithms", "a second, longer document about tides and the moon"]
    plain = SpladeEncoder(str(folder), device="cpu", screen=False)
    want = densify(plain.encode(texts), 30522)
    assert np.allclose(want[:, term], np.log1p(EPSILON), atol=1e-3) and (want > 0).sum() == len(texts)

    screened = SpladeEncoder(str(folder), device="cpu", screen=True)
    assert screened.screen is not None
    got = densify(screened.encode(texts), 30522)
    # Both are fp32 sums of 768 products of size ~0.25 (S ~ 194) in different orders: they may
    # differ by 2 gamma_768 S (see fp32_noise), far below the term's weight.
    h, w = worst_case_rows(768)
    noise = 2 * 768 * 2.0**-24 / (1 - 768 * 2.0**-24) * float((h.double() @ w.double().t()).item())
    assert noise < 0.02 < float(got[:, term].min())
    assert np.abs(got - want).max() <= noise and ((got > 0) == (want > 0)).all()

    # The margin an earlier version used (2^-7, from bf16's unit roundoff taken as 2^-9) loses the term.
    monkeypatch.setattr(screen_module, "MARGIN", 2.0**-7)
    lost = densify(SpladeEncoder(str(folder), device="cpu", screen=True).encode(texts), 30522)
    assert (lost[:, term] == 0).all()


def test_worst_case_rows_err_by_nearly_the_bound() -> None:
    for n in (128, 768, 4096):
        h, w = worst_case_rows(n)
        exact = float((h.double() @ w.double().t()).item())
        approx = float((h.bfloat16() @ w.bfloat16().t()).double().item())
        total = float((h.abs().double() @ w.abs().double().t()).item())
        assert 2.5 * 2.0**-8 < (exact - approx) / total <= bf16_error_coefficient(n) <= MARGIN
