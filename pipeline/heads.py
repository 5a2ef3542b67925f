"""How to split a masked-LM into "encoder -> hidden states" and "hidden states -> logits".

The split is what lets the SPLADE head run over a few sequence positions at a time
(:func:`pipeline.splade.pooled_max_logits`). BERT and DistilBERT heads are split explicitly;
any other ``AutoModelForMaskedLM`` runs whole (full logits per micro-batch) and gives the same
vectors at a higher peak memory.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pipeline.splade import Head


@dataclass(frozen=True)
class MaskedLMParts:
    """``hidden(ids, mask, type_ids) -> [B, L, H]`` plus ``head(hidden) -> [B, L, V]``.

    For ``kind == "generic"`` there is no split: ``hidden`` already returns the logits and
    ``head`` is the identity.
    """

    kind: Literal["bert", "distilbert", "generic"]
    module: nn.Module
    head: Head
    takes_token_types: bool

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.takes_token_types:
            kwargs["token_type_ids"] = token_type_ids
        out = self.module(**kwargs, return_dict=True)
        return out.logits if self.kind == "generic" else out.last_hidden_state


def split_masked_lm(model: nn.Module) -> MaskedLMParts:
    """Pick the chunked fast path for BERT/DistilBERT MLM heads, the generic path otherwise."""
    from transformers import BertForMaskedLM, DistilBertForMaskedLM

    if isinstance(model, BertForMaskedLM):
        return MaskedLMParts("bert", model.bert, model.cls, _takes_token_types(model.bert))
    if isinstance(model, DistilBertForMaskedLM):

        def distilbert_head(hidden: torch.Tensor) -> torch.Tensor:
            # Same order as DistilBertForMaskedLM.forward.
            x = model.activation(model.vocab_transform(hidden))
            return model.vocab_projector(model.vocab_layer_norm(x))

        return MaskedLMParts("distilbert", model.distilbert, distilbert_head, False)
    return MaskedLMParts("generic", model, _identity, _takes_token_types(model))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _takes_token_types(module: nn.Module) -> bool:
    return "token_type_ids" in inspect.signature(module.forward).parameters
