"""The query side: a separate query model, and inference-free (doc-only) models whose queries are
weighted by the model's IDF table without a forward pass; each against a plain computation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from support.reference import TEXTS, VOCAB, densify, reference_splade

from pipeline import SpladeEncoder
from pipeline.config import ConfigError, load_config
from pipeline.errors import SettingError


def test_a_query_model_encodes_queries_and_the_document_model_documents(
    splade_tiny: Path, tiny_models: dict[str, Path]
) -> None:
    query_model = str(tiny_models["bert"])
    enc = SpladeEncoder(str(splade_tiny), device="cpu", max_length=64, query_model=query_model, top_k=5)
    queries = densify(enc.encode_queries(TEXTS), VOCAB)
    assert np.abs(queries - reference_splade(query_model, TEXTS, max_length=64)).max() <= 1e-5
    assert (np.count_nonzero(queries, axis=1) > 5).all()  # queries are never pruned: top_k is for documents
    documents = densify(enc.encode(TEXTS), VOCAB)
    assert (np.count_nonzero(documents, axis=1) <= 5).all()
    # without a query model, queries go through the document model, unpruned and one row per text
    same = SpladeEncoder(str(splade_tiny), device="cpu", max_length=16, long_documents="split", min_weight=0.5)
    want = reference_splade(str(splade_tiny), TEXTS, max_length=16)
    assert np.abs(densify(same.encode_queries(TEXTS), VOCAB) - want).max() <= 1e-5


def _doc_only(tiny: Path, folder: Path, idf: object) -> Path:
    shutil.copytree(tiny, folder)
    (folder / "idf.json").write_text(json.dumps(idf))
    return folder


def test_an_inference_free_model_weights_query_pieces_by_its_idf(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["bert"])
    vocab = tokenizer.get_vocab()
    rng = np.random.default_rng(7)
    idf = {token: round(float(rng.uniform(0.1, 9.0)), 4) for token in list(vocab)[:25_000]}
    idf["the"] = 0.0  # a zero weight: the piece is left out
    idf["[UNK]"] = 3.0  # special tokens never weigh, even with a weight in the table ("🚀" reads [UNK])
    folder = _doc_only(tiny_models["bert"], tmp_path / "doc-only", idf)
    enc = SpladeEncoder(str(folder), device="cpu", max_length=64)
    enc.before_forward = lambda tokens: pytest.fail("a query ran a forward pass")
    got = densify(enc.encode_queries(TEXTS), VOCAB)
    for row, text in enumerate(TEXTS):
        want = np.zeros(VOCAB, np.float32)
        for piece in tokenizer(text, add_special_tokens=False, truncation=True, max_length=64)["input_ids"]:
            if piece not in tokenizer.all_special_ids:
                want[piece] = idf.get(tokenizer.convert_ids_to_tokens(piece), 0.0)
        np.testing.assert_array_equal(got[row], want)
    assert got[2].sum() == 0 and got[0].sum() > 0  # the empty query; no [CLS]/[SEP] weight anywhere
    assert got[:, [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id, vocab["the"]]].sum() == 0
    enc.before_forward = None  # documents: the model's forward pass, as usual
    assert np.abs(densify(enc.encode(TEXTS), VOCAB) - reference_splade(str(folder), TEXTS, 64)).max() <= 1e-5
    # the same table as a separate query "model" (a tokenizer and idf.json beside a document model)
    other = SpladeEncoder(str(tiny_models["distilbert"]), device="cpu", max_length=64, query_model=str(folder))
    np.testing.assert_array_equal(densify(other.encode_queries(TEXTS), VOCAB), got)


@pytest.mark.parametrize(
    ("idf", "named"),
    [
        ({"ocean": 1.0, "notatoken!!": 2.0}, "token 'notatoken!!' is not in the model's vocabulary"),
        ({"ocean": -1.0}, "the weight of 'ocean' must be a finite number >= 0, got -1.0"),
        ({"ocean": "high"}, "the weight of 'ocean' must be a finite number >= 0, got 'high'"),
        ([1.0, 2.0], "must map tokens to weights, got a JSON list"),
    ],
)
def test_a_wrong_idf_table_is_named(tiny_models: dict[str, Path], tmp_path: Path, idf: object, named: str) -> None:
    folder = _doc_only(tiny_models["bert"], tmp_path / "bad", idf)
    enc = SpladeEncoder(str(folder), device="cpu")
    with pytest.raises(SettingError, match="idf.json: " + named.replace("(", r"\(").replace("[", r"\[")):
        enc.encode_queries(["ocean waves"])


def test_a_query_model_with_another_vocabulary_is_refused(splade_tiny: Path, tmp_path: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30_000, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertForMaskedLM(config).save_pretrained(tmp_path / "other")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (splade_tiny / name).exists():
            shutil.copy(splade_tiny / name, tmp_path / "other" / name)
    enc = SpladeEncoder(str(splade_tiny), device="cpu", query_model=str(tmp_path / "other"))
    with pytest.raises(SettingError, match="30000 vocabulary terms and encoder.model .* 30522"):
        enc.encode_queries(["ocean"])


def test_the_query_model_moved_to_the_encoder() -> None:
    with pytest.raises(ConfigError, match="sink.query_model was moved to encoder.query_model"):
        load_config(None, {"sink.type": "qdrant", "sink.query_model": "x"})
    assert load_config(None, {"encoder.query_model": "some/query-model"}).encoder.query_model == "some/query-model"
