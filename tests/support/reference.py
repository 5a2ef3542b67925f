"""The plain, obviously-correct SPLADE: full logits, log(1 + relu), masked max, fp32."""

from __future__ import annotations

import inspect

import numpy as np
import pyarrow as pa
import torch

from pipeline.encode.sparse import sparse_rows

VOCAB = 30522  # bert-base-uncased, the vocabulary of every test model
# Texts that exercise the encoder: empty, unicode, far past 64 tokens, a duplicate.
LONG = " ".join(f"word{i} alpha beta gamma" for i in range(400))  # far past 64 tokens
TEXTS = [
    "machine learning algorithms",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "",
    "naïve café — 東京 🚀 unicode text",
    LONG,
    "short",
    "machine learning algorithms",  # a duplicate of the first
    "A medium length sentence about ocean tides, the moon and the gravitational pull of the sun.",
]


@torch.inference_mode()
def reference_splade(model_dir: str, texts: list[str], max_length: int = 512) -> np.ndarray:
    """``[len(texts), vocab]`` SPLADE weights straight from the definition, one padded batch."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForMaskedLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    accepted = inspect.signature(model.forward).parameters
    logits = model(**{k: v for k, v in batch.items() if k in accepted}).logits.float()
    weights = torch.log1p(torch.relu(logits))
    real = batch["attention_mask"].bool().unsqueeze(-1)
    return torch.where(real, weights, torch.zeros(())).amax(dim=1).numpy()


def densify(vectors: pa.StructArray, vocab: int) -> np.ndarray:
    out = np.zeros((len(vectors), vocab), dtype=np.float32)
    for row, (indices, values) in enumerate(sparse_rows(vectors)):
        out[row, indices] = values
    return out


def windows_of(model_dir: str, text: str, max_length: int, stride: int) -> list[list[int]]:
    """The token ids of ``text``'s windows, cut by hand: ``max_length - 2`` word pieces each, the
    next one starting ``stride`` pieces before the end of the one before, [CLS]/[SEP] around each."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
    room, out, start = max_length - 2, [], 0
    while True:
        out.append([tokenizer.cls_token_id, *pieces[start : start + room], tokenizer.sep_token_id])
        if start + room >= len(pieces):
            return out
        start += room - stride


@torch.inference_mode()
def reference_ids(model_dir: str, windows: list[list[int]]) -> np.ndarray:
    """``[len(windows), vocab]`` SPLADE weights of token id lists (special tokens included), one
    padded batch with its attention mask, straight from the definition."""
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    width = max(len(w) for w in windows)
    ids = torch.tensor([w + [0] * (width - len(w)) for w in windows])
    mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w in windows])
    weights = torch.log1p(torch.relu(model(input_ids=ids, attention_mask=mask).logits.float()))
    return torch.where(mask.bool().unsqueeze(-1), weights, torch.zeros(())).amax(dim=1).numpy()


def pruned(weights: np.ndarray, top_k: int | None = None, min_weight: float = 0.0) -> np.ndarray:
    """Dense weights with those below ``min_weight`` zeroed and only each row's ``top_k`` largest kept."""
    out = np.where(weights >= min_weight, weights, 0.0).astype(np.float32)
    if top_k is not None:
        for row in out:
            row[np.argsort(-row, kind="stable")[top_k:]] = 0.0
    return out
