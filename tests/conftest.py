"""Session fixtures: the bundled SPLADE-tiny and tiny random masked-LMs saved to disk."""

from __future__ import annotations

import os

# Tests never reach a model hub: everything loads from folders on disk.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.bundled import fetch_splade_tiny  # noqa: E402


@pytest.fixture(scope="session")
def splade_tiny() -> Path:
    """The real trained SPLADE-tiny, verified by sha256 (fetched once into the user cache)."""
    return fetch_splade_tiny()


def _save_tiny(model: torch.nn.Module, folder: Path, splade_tiny: Path) -> Path:
    from transformers import AutoTokenizer

    model.eval().save_pretrained(folder)
    AutoTokenizer.from_pretrained(splade_tiny).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, splade_tiny: Path) -> dict[str, Path]:
    """Random tiny masked-LMs sharing the bert-base-uncased tokenizer: one per encoder path.

    ``bert`` and ``distilbert`` take the chunked-head path, ``roberta`` the generic one.
    """
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        DistilBertConfig,
        DistilBertForMaskedLM,
        RobertaConfig,
        RobertaForMaskedLM,
    )

    torch.manual_seed(0)
    vocab = 30522
    models = {
        "bert": BertForMaskedLM(
            BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        ),
        "distilbert": DistilBertForMaskedLM(
            DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
        ),
        "roberta": RobertaForMaskedLM(
            RobertaConfig(
                vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                pad_token_id=0, max_position_embeddings=514,
            )
        ),
    }
    root = tmp_path_factory.mktemp("tiny-models")
    return {name: _save_tiny(model, root / name, splade_tiny) for name, model in models.items()}
