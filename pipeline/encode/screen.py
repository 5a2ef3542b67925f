"""Certified bf16 screening of the MLM decoder: fp32 vectors at a fraction of the fp32 cost.

A SPLADE weight is ``w_j = log1p(relu(max_i logit_ij))``: every term whose largest logit is
<= 0 weighs exactly 0, and a document has a few hundred non-zero terms out of 30522. So the
fp32 decoder (hidden x vocab per token, a fifth of bert-base's FLOPs and nearly all of a small
model's) is run in three steps:

1. every logit is approximated by a bf16 product (AMX on a Xeon: 3-5x the fp32 rate);
2. a bound on that approximation's error keeps, per document, only the terms whose largest
   logit could still be > 0;
3. those terms are recomputed in fp32 from the document's rows (about twice the non-zeros).

The bound. For a row ``h`` and a decoder row ``w`` of length ``n``, the screen computes
``a = bf16(sum_k bf16(h_k) bf16(w_k))``: both inputs rounded to bf16, their products (exact in
fp32: 8 + 8 significant bits) accumulated in fp32, the sum rounded to bf16 on output. With
bf16's unit roundoff ``u = 2^-8`` (8 significant bits) and fp32's ``gamma_n = n 2^-24 / (1 -
n 2^-24)`` (Higham, Accuracy and Stability of Numerical Algorithms, 3.1), and ``S = sum_k
|h_k w_k|``, the three roundings give

    |bf16(h_k) bf16(w_k) - h_k w_k| <= (2u + u^2) |h_k w_k|                     (inputs)
    |fl32(sum) - sum| <= gamma_n (1 + u)^2 S                                     (accumulation)
    |bf16(s) - s| <= u |s| <= u (1 + u)^2 (1 + gamma_n) S                        (output)

so ``|a - h.w| <= c_n S <= c_n ||h|| ||w||`` with ``c_n = 2u + u^2 + (1 + u)^2 (gamma_n + u (1 +
gamma_n))`` (:func:`bf16_error_coefficient`): 0.01201 for ``n = 4096`` (:data:`MAX_HIDDEN`).
Every rounding can err the same way: ``tests/test_screen.py`` builds such a case (all inputs
and the sum rounding down) and finds an error of ``0.0102 S``, above the ``2^-7 = 0.0078`` an
earlier margin assumed. :data:`MARGIN` is ``c_n`` plus a relative slack of ``2^-10``, which
covers the fp32 roundings of the bound's own arithmetic (norms, products, the additions
below: a few ``2^-24`` of values no larger than ``||h|| ||w||`` where the sign can flip).

Hence if ``max_i a_ij + MARGIN * max_i ||h_i|| * ||w_j|| + b_j <= 0`` for a document, its exact
largest logit of term ``j`` is <= 0 as well and ``w_j = 0``: leaving the term out changes
nothing. Every kept term is recomputed in fp32, so the vectors are the fp32 computation's (up
to the summation order of a differently shaped product). The bound assumes bf16 products are
accumulated in fp32 and rounded once, as AMX, AVX512-BF16 and tensor cores do;
:func:`bf16_products_accumulate_in_fp32` checks that on the device, on the worst case above and
on random data, before screening is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import torch

from pipeline.encode.splade import VOCAB_CHUNK, segment_max_products

BF16_UNIT_ROUNDOFF = 2.0**-8  # 8 significant bits
FP32_UNIT_ROUNDOFF = 2.0**-24
MAX_HIDDEN = 4096  # screening is used for hidden sizes up to this


def bf16_error_coefficient(n: int) -> float:
    """``c_n``: ``|bf16 product - exact| <= c_n * sum_k |h_k w_k|`` for length-``n`` rows (see above)."""
    u = BF16_UNIT_ROUNDOFF
    gamma = n * FP32_UNIT_ROUNDOFF / (1 - n * FP32_UNIT_ROUNDOFF)
    return 2 * u + u * u + (1 + u) ** 2 * (gamma + u * (1 + gamma))


MARGIN = bf16_error_coefficient(MAX_HIDDEN) * (1 + 2.0**-10)


class ScreenedDecoder:
    """An MLM decoder (``[V, H]`` weight, optional bias) with its bf16 copy and row norms."""

    def __init__(self, decoder: torch.nn.Linear) -> None:
        self.weight = decoder.weight
        self.bias = decoder.bias
        self.weight_bf16_t = decoder.weight.detach().to(torch.bfloat16).t().contiguous()  # [H, V]
        self.weight_norms = decoder.weight.detach().float().norm(dim=1)
        self.documents = 0  # documents screened so far, and terms recomputed for them in fp32
        self.kept = 0

    def max_logits(self, rows: torch.Tensor, lengths: Sequence[int], chunk_tokens: int) -> torch.Tensor:
        """Same as ``splade.packed_max_logits`` on already transformed packed fp32 ``rows``,
        except that terms certified to have no positive logit are ``-inf`` (weight 0 either way)."""
        approx = segment_max_products(rows.to(torch.bfloat16), lengths, self.weight_bf16_t, chunk_tokens, VOCAB_CHUNK)
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        counts = torch.as_tensor(np.asarray(lengths, dtype=np.int64), device=rows.device)
        doc_norms = torch.segment_reduce(rows.float().norm(dim=1), "max", lengths=counts)
        bias = self.bias.float() if self.bias is not None else torch.zeros_like(self.weight_norms)
        bound = approx.add_(MARGIN * doc_norms[:, None] * self.weight_norms[None, :]).add_(bias)
        out = torch.full_like(approx, float("-inf"))
        for doc, (a, b) in enumerate(pairwise(offsets)):
            terms = torch.nonzero(~(bound[doc] <= 0)).squeeze(1)  # NaN bounds kept: the recompute shows them
            if terms.numel() == 0:
                continue
            exact = torch.mm(rows[a:b], self.weight.index_select(0, terms).t()).amax(dim=0)
            if self.bias is not None:
                exact += bias[terms]
            out[doc, terms] = exact
            self.kept += int(terms.numel())
        self.documents += len(lengths)
        return out


def bf16_products_pay(decoder: torch.nn.Linear, device: torch.device, tokens: int = 64) -> bool:
    """Whether bf16 products on ``device`` run at least 1.5x the fp32 rate on this decoder: with
    native bf16 (AMX, AVX512-BF16) they run 3-5x on a Xeon; without it they are emulated and run
    ~30x slower than fp32 (measured on an AMD EPYC VM with AVX2 only: SPLADE-tiny 15 s for 100
    passages screened, 0.5 s not). Timed once per decoder shape and device, best of three."""
    key = (tuple(decoder.weight.shape), str(device))
    if key not in _PAYS:
        import time

        gen = torch.Generator().manual_seed(0)
        h = torch.randn(tokens, decoder.in_features, generator=gen).to(device)
        w = decoder.weight.detach()
        hb, wb = h.to(torch.bfloat16), w.to(torch.bfloat16)

        def best(a: torch.Tensor, b: torch.Tensor) -> float:
            times = []
            for _ in range(3):
                start = time.perf_counter()
                (a @ b.t()).amax()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            return min(times)

        with torch.inference_mode():
            fp32 = best(h, w)
            start = time.perf_counter()
            (hb @ wb.t()).amax()  # warm-up (kernels picked, memory touched); emulated bf16 shows here already
            if time.perf_counter() - start > 20 * fp32:
                _PAYS[key] = False
            else:
                _PAYS[key] = best(hb, wb) * 1.5 <= fp32
    return _PAYS[key]


_PAYS: dict[tuple, bool] = {}


def bf16_products_accumulate_in_fp32(device: torch.device) -> bool:
    """Whether bf16 matrix products on ``device`` stay within the error bound screening relies on.

    Probes the worst case (every input and the output rounding down, all products positive, so
    no error cancels: :func:`worst_case_rows`), and random all-positive and signed data, at
    bert-base's width. A device that accumulates in bf16 or rounds more than once fails by far.
    """
    gen = torch.Generator().manual_seed(0)
    probes = [
        worst_case_rows(768),
        (torch.rand(64, 768, generator=gen) + 0.5, torch.rand(512, 768, generator=gen) + 0.5),
        (torch.randn(64, 768, generator=gen) * 3, torch.randn(512, 768, generator=gen) * 0.05),
    ]
    for h, w in probes:
        exact = h.double() @ w.double().t()
        approx = (h.to(device, torch.bfloat16) @ w.to(device, torch.bfloat16).t()).double().cpu()
        limit = bf16_error_coefficient(h.shape[1]) * (h.abs().double() @ w.abs().double().t())
        if not bool(((approx - exact).abs() <= limit).all()):
            return False
    return True


def worst_case_rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A row ``h`` and a decoder row ``w`` (``[1, n]`` each, fp32) on which every bf16 rounding
    errs downward: each entry sits just below the midpoint above a bf16 value (relative error
    close to ``u``), the products are all positive, and the bf16-rounded products sum to just
    below the midpoint above a bf16 value, so the output rounds down too. The bf16 product then
    errs by about ``3u S`` (0.0102 S at ``n = 768``)."""
    if n % 64:
        raise ValueError(f"worst_case_rows: n must be a multiple of 64, got {n}")
    below_midpoint = 1 + 0.499 / 128  # rounds down to 1.0 in bf16, by nearly half a step
    h = torch.full((1, n), 8.0 * below_midpoint)
    w = torch.full((1, n), 2.0**-5 * below_midpoint)
    # bf16(h) bf16(w) = 2^-2 each, n of them: n/4, a bf16 value for n a multiple of 64. Raising
    # some w to 2^-5 (17/16) (just below its own midpoint) adds 2^-6 each; stop just below the
    # midpoint above n/4, so the sum rounds down to n/4.
    half_step = 2.0 ** (torch.tensor(n / 4).log2().floor().item() - 7) / 2
    raised = int(half_step / 2.0**-6) - (half_step % 2.0**-6 == 0)
    w[0, :raised] = 2.0**-5 * (1 + (8 + 0.499) / 128)
    return h, w
