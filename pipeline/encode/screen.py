"""Certified bf16 screening of the MLM decoder: fp32 vectors at a fraction of the fp32 cost.

A SPLADE weight is ``w_j = log1p(relu(max_i logit_ij))``: every term whose largest logit is
<= 0 weighs exactly 0, and a document has a few hundred non-zero terms out of 30522. So the
fp32 decoder (hidden x vocab per token, a fifth of bert-base's FLOPs and nearly all of a small
model's) is run in three steps:

1. every logit is approximated by a bf16 product (AMX on a Xeon: 3-5x the fp32 rate);
2. a bound on that approximation's error keeps, per document, only the terms whose largest
   logit could still be > 0;
3. those terms are recomputed in fp32 from the document's rows (about twice the non-zeros).

The bound. For a row ``h`` and decoder row ``w`` (length ``n``), the fp32 product
``e = fl32(h.w)`` and the bf16 one ``a = bf16(sum_k bf16(h_k) bf16(w_k))``, accumulated in fp32,
differ by at most ``(2u + u^2 + u + 2n 2^-24) * sum_k |h_k w_k|`` with ``u = 2^-9`` (bf16's unit
roundoff): below ``0.0064 * ||h|| ||w||`` for ``n <= 4096``. :data:`MARGIN` is ``2^-7 = 0.0078``.
Hence if ``max_i a_ij + MARGIN * max_i ||h_i|| * ||w_j|| + b_j <= 0`` for a document, its exact
largest logit of term ``j`` is <= 0 as well and ``w_j = 0``: leaving the term out changes
nothing. Every kept term is recomputed in fp32, so the vectors are the fp32 computation's (up
to the summation order of a differently shaped product). The bound assumes bf16 products are
accumulated in fp32, as AMX, AVX512-BF16 and tensor cores do; :func:`bf16_products_accumulate_in_fp32`
checks that on the device before screening is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import torch

from pipeline.encode.splade import VOCAB_CHUNK, segment_max_products

MARGIN = 2.0**-7
MAX_HIDDEN = 4096  # the bound above is derived for hidden sizes up to this


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
            terms = torch.nonzero(bound[doc] > 0).squeeze(1)
            if terms.numel() == 0:
                continue
            exact = torch.mm(rows[a:b], self.weight.index_select(0, terms).t()).amax(dim=0)
            if self.bias is not None:
                exact += bias[terms]
            out[doc, terms] = exact
            self.kept += int(terms.numel())
        self.documents += len(lengths)
        return out


def bf16_products_accumulate_in_fp32(device: torch.device) -> bool:
    """Whether bf16 matrix products on ``device`` stay within the error bound screening relies on.

    Probes with all-positive inputs (whose errors cannot cancel, so a bf16 accumulator would be
    off by far more than the bound) and with signed ones, at bert-base's width.
    """
    gen = torch.Generator().manual_seed(0)
    probes = [
        (torch.rand(64, 768, generator=gen) + 0.5, torch.rand(512, 768, generator=gen) + 0.5),
        (torch.randn(64, 768, generator=gen) * 3, torch.randn(512, 768, generator=gen) * 0.05),
    ]
    for h, w in probes:
        exact = h.double() @ w.double().t()
        approx = (h.to(device, torch.bfloat16) @ w.to(device, torch.bfloat16).t()).double().cpu()
        limit = MARGIN / 2 * (h.abs().double() @ w.abs().double().t())
        if not bool(((approx - exact).abs() <= limit).all()):
            return False
    return True
