"""How to split a masked-LM into "encoder -> hidden states" and "hidden states -> logits".

The split is what lets the SPLADE head run over a few sequence positions at a time
(:func:`pipeline.encode.splade.pooled_max_logits`, or :func:`pipeline.encode.splade.packed_max_logits` on
packed rows). BERT and DistilBERT are split explicitly (head = ``transform`` then ``decoder``)
and also get a padding-free encoder (:mod:`pipeline.encode.packed`); any other
``AutoModelForMaskedLM`` runs whole (full logits per micro-batch) and gives the same vectors
at a higher peak memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pipeline.encode.packed import PackedEncoder, packed_encoder
from pipeline.encode.splade import Head


@dataclass(frozen=True)
class MaskedLMParts:
    """``hidden(ids, mask) -> [B, L, H]`` plus ``head(hidden) -> [B, L, V]``.

    For ``kind == "generic"`` there is no split: ``hidden`` already returns the logits,
    ``head`` is the identity and there is no ``decoder`` or ``packed`` form.
    """

    kind: Literal["bert", "distilbert", "generic"]
    module: nn.Module
    head: Head
    transform: Head | None = None  # head == decoder(transform(.))
    decoder: nn.Linear | None = None
    packed: PackedEncoder | None = None

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Documents are single sequences: token types are all 0, which is every model's default.
        out = self.module(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return out.logits if self.kind == "generic" else out.last_hidden_state


def split_masked_lm(model: nn.Module) -> MaskedLMParts:
    """Pick the chunked fast path for BERT/DistilBERT MLM heads, the generic path otherwise."""
    from transformers import BertForMaskedLM, DistilBertForMaskedLM

    if isinstance(model, BertForMaskedLM):
        predictions = model.cls.predictions
        return MaskedLMParts(
            "bert", model.bert, model.cls, predictions.transform, predictions.decoder, packed_encoder(model.bert)
        )
    if isinstance(model, DistilBertForMaskedLM):

        def distilbert_transform(hidden: torch.Tensor) -> torch.Tensor:
            # Same order as DistilBertForMaskedLM.forward.
            return model.vocab_layer_norm(model.activation(model.vocab_transform(hidden)))

        def distilbert_head(hidden: torch.Tensor) -> torch.Tensor:
            return model.vocab_projector(distilbert_transform(hidden))

        return MaskedLMParts(
            "distilbert",
            model.distilbert,
            distilbert_head,
            distilbert_transform,
            model.vocab_projector,
            packed_encoder(model.distilbert),
        )
    return MaskedLMParts("generic", model, _identity)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
