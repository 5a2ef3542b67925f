"""The query side of inference-free ("doc-only") sparse models: a query is tokenized, and each of
its distinct word pieces weighted by the IDF table the model ships (``idf.json``: token -> weight);
no forward pass. Documents of such models are encoded as usual (:class:`SpladeEncoder`).

Models of this kind (e.g. OpenSearch's ``opensearch-neural-sparse-encoding-doc-*``) score a document
by the dot product of this query vector with the document's SPLADE vector.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.encode.sparse import sparse_array
from pipeline.errors import SettingError

IDF_FILE = "idf.json"


def idf_file(model_path: str, revision: str | None = None) -> Path | None:
    """The model's ``idf.json`` (a local folder's, or downloaded from the hub), or None without one."""
    local = Path(model_path)
    if local.is_dir():
        return local / IDF_FILE if (local / IDF_FILE).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(model_path, IDF_FILE, revision=revision))
    except LocalEntryNotFoundError as err:  # offline or unreachable: whether it has one is unknown
        raise SettingError(
            f"model {model_path!r}: cannot tell whether it ships an {IDF_FILE} (inference-free queries): the hub "
            f"cannot be reached and no copy is cached ({type(err).__name__}); queries are not encoded without knowing"
        ) from None
    except EntryNotFoundError:
        return None


def load_idf(path: Path, tokenizer: object, vocab_size: int) -> np.ndarray:
    """``float32[vocab_size]`` weights from ``idf.json``; a token the vocabulary lacks, or a weight that is
    not a finite number >= 0, is an error naming it (a wrong table must not weight queries quietly)."""
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SettingError(f"{path}: cannot be read as JSON: {err}") from None
    if not isinstance(table, dict):
        raise SettingError(f"{path}: must map tokens to weights, got a JSON {type(table).__name__}")
    weights = np.zeros(vocab_size, dtype=np.float32)
    vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
    for token, weight in table.items():
        if token not in vocab or vocab[token] >= vocab_size:
            raise SettingError(f"{path}: token {token!r} is not in the model's vocabulary")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
            raise SettingError(f"{path}: the weight of {token!r} must be a finite number >= 0, got {weight!r}")
        weights[vocab[token]] = weight
    return weights


class IdfQueries:
    """Query vectors of an inference-free model: ``w_j = idf_j`` for each distinct word piece ``j`` of
    the query ([CLS], [SEP] and other special tokens left out), indices ascending, zeros dropped."""

    def __init__(self, tokenizer: object, backend: object, weights: np.ndarray) -> None:
        self.backend = backend
        self.weights = weights
        self.special = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)  # type: ignore[attr-defined]

    def encode(self, texts: Sequence[str]) -> pa.StructArray:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)  # type: ignore[attr-defined]
        offsets, indices = [0], []
        for encoding in encodings:
            ids = np.setdiff1d(np.asarray(encoding.ids, dtype=np.int64), self.special)  # sorted, distinct
            ids = ids[self.weights[ids] > 0]
            indices.append(ids.astype(np.int32))
            offsets.append(offsets[-1] + len(ids))
        flat = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int32)
        return sparse_array(np.array(offsets, dtype=np.int32), flat, self.weights[flat].astype(np.float32))
