"""The real trained SPLADE-tiny: sensible terms, retrieval, and parity with sentence-transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.reference import densify

from pipeline import SpladeEncoder
from pipeline.demo import load_sample_corpus

VOCAB = 30522
QUERIES = {
    "what causes ocean tides": "Tides",
    "how do vaccines work": "Vaccines",
    "python programming language": "Python",
    "coffee brewing under pressure": "Espresso",
    "why do rainbows form": "Rainbows",
    "cryptocurrency ledger": "Bitcoin",
    "who wrote hamlet": "Shakespeare",
}


@pytest.fixture(scope="module")
def encoder(splade_tiny: Path) -> SpladeEncoder:
    return SpladeEncoder(str(splade_tiny), device="cpu")


def test_expansion_terms(encoder: SpladeEncoder) -> None:
    terms = encoder.decode(encoder.encode(["machine learning algorithms"]))[0]
    assert {"machine", "learning", "algorithms"} <= set(terms)
    expansions = {"software", "learn", "method", "computer"} & set(terms)
    assert len(expansions) >= 3, f"expected expansion terms, got {list(terms)[:20]}"
    assert max(terms, key=terms.get) == "machine"


def test_stopwords_absent_from_documents(encoder: SpladeEncoder) -> None:
    rows = load_sample_corpus()
    dense = densify(encoder.encode([f"{r['title']} {r['text']}" for r in rows]), VOCAB)
    for stopword in ("the", "a", "an", "of", "in", "by", "which"):
        assert not dense[:, encoder.tokenizer.convert_tokens_to_ids(stopword)].any(), stopword


def test_queries_rank_their_document_first(encoder: SpladeEncoder) -> None:
    rows = load_sample_corpus()
    docs = densify(encoder.encode([f"{r['title']} {r['text']}" for r in rows]), VOCAB)
    queries = densify(encoder.encode(list(QUERIES)), VOCAB)
    best = (queries @ docs.T).argmax(axis=1)
    assert [rows[i]["title"] for i in best] == list(QUERIES.values())


def test_same_vectors_as_sentence_transformers(encoder: SpladeEncoder, splade_tiny: Path) -> None:
    from sentence_transformers import SparseEncoder

    try:  # sentence-transformers >= 6.2 moved these
        from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling
    except ImportError:
        from sentence_transformers.sparse_encoder.models import MLMTransformer, SpladePooling

    texts = [f"{r['title']} {r['text']}" for r in load_sample_corpus()] + ["", "x " * 600]
    st = SparseEncoder(modules=[MLMTransformer(str(splade_tiny)), SpladePooling("max")], device="cpu")
    theirs = st.encode(texts, convert_to_tensor=True).to_dense().numpy()
    ours = densify(encoder.encode(texts), VOCAB)
    assert np.count_nonzero(theirs) > 1000
    assert np.abs(ours - theirs).max() <= 1e-5
