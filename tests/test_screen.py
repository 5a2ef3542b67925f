"""Certified bf16 screening of the decoder: never drops a term that has weight, same fp32 values."""

from __future__ import annotations

import pytest
import torch

from pipeline.encode import splade
from pipeline.encode.screen import MARGIN, ScreenedDecoder, bf16_products_accumulate_in_fp32

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
