"""How to split a masked-LM into "encoder -> hidden states" and "hidden states -> logits".

The split is what lets the SPLADE head run over a few sequence positions at a time
(:func:`pipeline.splade.pooled_max_logits`). BERT and DistilBERT heads are split explicitly;
any other ``AutoModelForMaskedLM`` runs whole (full logits per micro-batch) and gives the same
vectors at a higher peak memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pipeline.splade import Head


@dataclass(frozen=True)
class MaskedLMParts:
    """``hidden(ids, mask) -> [B, L, H]`` plus ``head(hidden) -> [B, L, V]``.

    For ``kind == "generic"`` there is no split: ``hidden`` already returns the logits and
    ``head`` is the identity.
    """

    kind: Literal["bert", "distilbert", "generic"]
    module: nn.Module
    head: Head

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Documents are single sequences: token types are all 0, which is every model's default.
        out = self.module(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return out.logits if self.kind == "generic" else out.last_hidden_state


def split_masked_lm(model: nn.Module) -> MaskedLMParts:
    """Pick the chunked fast path for BERT/DistilBERT MLM heads, the generic path otherwise."""
    from transformers import BertForMaskedLM, DistilBertForMaskedLM

    if isinstance(model, BertForMaskedLM):
        return MaskedLMParts("bert", model.bert, model.cls)
    if isinstance(model, DistilBertForMaskedLM):

        def distilbert_head(hidden: torch.Tensor) -> torch.Tensor:
            # Same order as DistilBertForMaskedLM.forward.
            x = model.activation(model.vocab_transform(hidden))
            return model.vocab_projector(model.vocab_layer_norm(x))

        return MaskedLMParts("distilbert", model.distilbert, distilbert_head)
    return MaskedLMParts("generic", model, _identity)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x

