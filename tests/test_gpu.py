"""CUDA checks: the same vectors on the GPU as the CPU reference. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support.reference import TEXTS, densify, reference_splade

from pipeline import SpladeEncoder

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
VOCAB = 30522


@pytest.mark.parametrize(("packed", "screen"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_cuda_fp32_paths_match_cpu_reference(
    tiny_models: dict[str, Path], kind: str, packed: bool, screen: bool
) -> None:
    enc = SpladeEncoder(
        str(tiny_models[kind]),
        device="cuda",
        dtype="float32",
        max_length=64,
        max_batch_tokens=96,
        packed=packed,
        screen=screen,
    )
    want = reference_splade(str(tiny_models[kind]), TEXTS, max_length=64)
    assert np.abs(densify(enc.encode(TEXTS), VOCAB) - want).max() <= 1e-5


def test_cuda_generic_model_matches_cpu_reference(tiny_models: dict[str, Path]) -> None:
    kind = "roberta"
    enc = SpladeEncoder(str(tiny_models[kind]), device="cuda", dtype="float32", max_length=64, max_batch_tokens=96)
    want = reference_splade(str(tiny_models[kind]), TEXTS, max_length=64)
    assert np.abs(densify(enc.encode(TEXTS), VOCAB) - want).max() <= 1e-5


def test_cuda_splade_tiny_fp32_and_bf16(splade_tiny: Path) -> None:
    want = reference_splade(str(splade_tiny), TEXTS)
    fp32 = densify(SpladeEncoder(str(splade_tiny), device="cuda", dtype="float32").encode(TEXTS), VOCAB)
    diff = np.abs(fp32 - want).max()
    print(f"SPLADE-tiny cuda fp32 max |diff| vs CPU reference: {diff:.2e}")
    assert diff <= 1e-5
    enc = SpladeEncoder(str(splade_tiny), device="cuda")
    assert enc.compute_dtype == torch.bfloat16  # the CUDA default
    bf16 = densify(enc.encode(TEXTS), VOCAB)
    k = 32
    overlap = np.mean([len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k for a, b in zip(bf16, want)])
    print(f"SPLADE-tiny cuda bf16 top-{k} overlap with fp32: {overlap:.3f}, max |diff| {np.abs(bf16 - want).max():.3f}")
    assert overlap >= 0.9
