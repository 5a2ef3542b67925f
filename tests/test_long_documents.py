"""Long documents: ``max`` pools a document's windows into one vector, ``split`` gives one vector
per window; both against the plain reference of each window (cut by hand), on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import s3fs
from support.jobs import read_delta
from support.reference import LONG, TEXTS, VOCAB, densify, pruned, reference_ids, reference_splade, windows_of

from pipeline import SpladeEncoder
from pipeline.config import load_config
from pipeline.errors import SettingError
from pipeline.job.encode import run_job
from pipeline.job.reindex import run_reindex

# 3 windows of 16 tokens at stride 0: 14 word pieces each, 30 + 12 = 42 pieces in all
THREE = " ".join(["tide", "moon", "sun", "wave", "shore", "salt"] * 7)


@pytest.mark.parametrize(("stride", "top_k"), [(0, None), (3, None), (5, 8)])
@pytest.mark.parametrize("model", ["splade_tiny", "bert"])
def test_max_is_the_elementwise_max_of_the_windows(
    splade_tiny: Path, tiny_models: dict[str, Path], model: str, stride: int, top_k: int | None
) -> None:
    folder = str(splade_tiny if model == "splade_tiny" else tiny_models[model])
    enc = SpladeEncoder(
        folder, device="cpu", max_length=16, stride=stride, long_documents="max", top_k=top_k, max_batch_tokens=40
    )
    texts = [THREE, *TEXTS]
    got = enc.encode_batch(texts)
    for row, text in enumerate(texts):
        windows = windows_of(folder, text, 16, stride)
        want = pruned(reference_ids(folder, windows).max(axis=0, keepdims=True), top_k)[0]
        assert np.abs(densify(got.sparse[row : row + 1], VOCAB)[0] - want).max() <= 1e-5, text[:40]
        assert got.windows[row] == len(windows) and got.num_tokens[row] == sum(map(len, windows))
    assert got.windows[0] == 3 if stride == 0 else got.windows[0] > 3
    assert not got.truncated.any()
    if top_k is None:  # the pooled vector holds more than any one window: windows were really merged
        assert (
            np.count_nonzero(densify(got.sparse[:1], VOCAB))
            > np.count_nonzero(reference_ids(folder, windows_of(folder, THREE, 16, stride)), axis=1).max()
        )


def test_max_prunes_after_pooling_and_short_documents_are_unchanged(splade_tiny: Path) -> None:
    folder = str(splade_tiny)
    short = [t for t in TEXTS if len(t) < 100]
    plain = SpladeEncoder(folder, device="cpu", max_length=64, top_k=10, min_weight=0.3)
    pooled = SpladeEncoder(folder, device="cpu", max_length=64, top_k=10, min_weight=0.3, long_documents="max")
    np.testing.assert_allclose(
        densify(pooled.encode(short), VOCAB), densify(plain.encode(short), VOCAB), rtol=0, atol=1e-6
    )
    # pruning per window and then pooling would keep up to 10 terms per window; here 10 in all
    got = densify(pooled.encode([LONG]), VOCAB)[0]
    full = reference_ids(folder, windows_of(folder, LONG, 64, 0)).max(axis=0)
    assert np.count_nonzero(got) == 10
    np.testing.assert_allclose(got, pruned(full[None], 10, 0.3)[0], rtol=0, atol=1e-5)


def test_a_document_is_the_same_alone_or_batched_with_longer_ones(splade_tiny: Path) -> None:
    for mode in ("max", "split"):
        enc = SpladeEncoder(str(splade_tiny), device="cpu", max_length=24, stride=4, long_documents=mode)
        batch = enc.encode_batch([LONG, TEXTS[1], THREE])
        alone = [enc.encode_batch([t]) for t in (LONG, TEXTS[1], THREE)]
        together = densify(batch.sparse, VOCAB)
        np.testing.assert_allclose(
            together, np.concatenate([densify(a.sparse, VOCAB) for a in alone]), rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("stride", [0, 4])
def test_split_gives_each_window_its_reference_vector_and_characters(splade_tiny: Path, stride: int) -> None:
    folder = str(splade_tiny)
    enc = SpladeEncoder(folder, device="cpu", max_length=16, stride=stride, long_documents="split", top_k=12)
    texts = ["short", THREE, "", LONG]
    got = enc.encode_batch(texts)
    windows = [windows_of(folder, t, 16, stride) for t in texts]
    assert got.parent.tolist() == [i for i, w in enumerate(windows) for _ in w]
    assert got.window.tolist() == [k for w in windows for k in range(len(w))]
    assert got.num_tokens.tolist() == [len(x) for w in windows for x in w]
    want = pruned(reference_ids(folder, [x for w in windows for x in w]), 12)
    assert np.abs(densify(got.sparse, VOCAB) - want).max() <= 1e-5
    # each window's characters are exactly its word pieces (ASCII texts: the pieces spell them, spaces aside)
    for (start, end), parent, ids in zip(got.spans.tolist(), got.parent, [x for w in windows for x in w]):
        text = texts[parent]
        assert 0 <= start <= end <= len(text)
        spelled = "".join(t.removeprefix("##") for t in enc.tokenizer.convert_ids_to_tokens(ids[1:-1]))
        assert spelled == text[start:end].replace(" ", "").lower()
    assert got.spans[got.parent == 2].tolist() == [[0, 0]]  # the empty text: one window, no characters


def test_a_long_document_keeps_every_micro_batch_within_its_token_budget(tiny_models: dict[str, Path]) -> None:
    text = "ocean " * 40_000  # 40,000 word pieces: 318 windows of 126 and [CLS]/[SEP]
    enc = SpladeEncoder(str(tiny_models["bert"]), device="cpu", max_length=128, long_documents="max")
    passes: list[int] = []
    enc.before_forward = passes.append
    got = enc.encode_batch([text, "short"])
    assert got.windows.tolist() == [318, 1] and got.num_tokens[0] == 40_000 + 2 * 318
    assert len(passes) >= 318 * 128 // 1024 and max(passes) <= enc.max_batch_tokens == 1024


def test_stride_must_leave_room_for_new_tokens(splade_tiny: Path) -> None:
    with pytest.raises(SettingError, match=r"encoder.stride: 14 must be below the text tokens a window holds \(14"):
        SpladeEncoder(str(splade_tiny), max_length=16, stride=14, long_documents="max")
    SpladeEncoder(str(splade_tiny), max_length=16, stride=14)  # truncate: the stride plays no part
    with pytest.raises(ValueError, match="long_documents"):
        SpladeEncoder(str(splade_tiny), long_documents="chunk")


def test_truncate_stays_the_default(splade_tiny: Path) -> None:
    enc = SpladeEncoder(str(splade_tiny), device="cpu", max_length=16)
    got = enc.encode_batch([THREE])
    assert got.truncated.tolist() == [True] and got.windows is None and got.num_tokens.tolist() == [16]
    want = reference_splade(str(splade_tiny), [THREE], max_length=16)
    assert np.abs(densify(got.sparse, VOCAB) - want).max() <= 1e-5


# ---- the job: one row per document, pooled over its windows; reindex per document -------------


def _put(prefix: str, docs: dict[str, str]) -> None:
    fs = s3fs.S3FileSystem()
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)
    fs.pipe(f"{prefix}/part-0.jsonl", "\n".join(json.dumps({"id": i, "text": t}) for i, t in docs.items()).encode())
    fs.invalidate_cache()


def _assert_table(url: str, docs: dict[str, str], enc: SpladeEncoder) -> None:
    data = read_delta(url)
    ids = data["id"].to_pylist()
    assert sorted(ids) == sorted(docs)  # one row per document, whatever its windows
    want = densify(enc.encode([docs[i] for i in ids]), VOCAB)
    assert np.abs(densify(data["sparse"].combine_chunks(), VOCAB) - want).max() <= 1e-5


def test_the_job_pools_long_documents_and_reindexes_them_per_document(ray_cluster: str, splade_tiny: Path) -> None:
    fs = s3fs.S3FileSystem()
    if not fs.exists("long"):
        fs.mkdir("long")
    docs = {
        f"d{i:02d}": f"{TEXTS[i % len(TEXTS)] or 'a short one'} {THREE if i % 3 == 0 else ''}".strip()
        for i in range(24)
    }
    docs["huge"] = LONG
    _put("long/corpus", docs)
    settings = {"encoder.max_length": 32, "encoder.long_documents": "max", "encoder.stride": 4, "encoder.top_k": 40}
    config = load_config(
        None,
        {
            "input.paths": ["s3://long/corpus/"],
            "output.path": "s3://long/out",
            "encoder.model": str(splade_tiny),
            "input.rows_per_block": 8,
            **settings,
        },
    )
    enc = SpladeEncoder(str(splade_tiny), device="cpu", **{k.split(".")[1]: v for k, v in settings.items()})
    summary = run_job(config)
    windows = enc.encode_batch(list(docs.values())).windows
    assert summary["rows_read"] == summary["rows_written"] == 25 and summary["truncated"] == 0
    assert summary["windows"] == int(windows.sum()) > 25 + 20
    assert summary["fingerprint"]["long_documents"] == "max" and summary["fingerprint"]["stride"] == 4
    _assert_table(config.output.path, docs, enc)

    # a changed long document, a removed one, a new one: only they are encoded again
    now = dict(docs)
    now["huge"] = LONG.replace("alpha", "omega")
    del now["d03"]
    now["new"] = THREE + " " + THREE
    _put("long/corpus", now)
    again = run_reindex(config)
    counts = again["reindex"]
    assert (counts["new"], counts["changed"], counts["deleted"], counts["encoded_now"]) == (1, 1, 1, 2)
    _assert_table(config.output.path, now, enc)

    # another way of cutting long documents is another fingerprint: everything would be encoded again
    truncating = config.model_copy(update={"encoder": config.encoder.model_copy(update={"long_documents": "truncate"})})
    plan = run_reindex(truncating, dry_run=True)
    assert plan["full"] and "long_documents" in plan["reason"], plan


def test_split_asks_for_encode_batch_and_a_bad_stride_stops_the_job_before_it_starts(
    splade_tiny: Path, tmp_path: Path
) -> None:
    from pipeline.job.plan import make_plan

    with pytest.raises(SettingError, match="use encode_batch"):
        SpladeEncoder(str(splade_tiny), long_documents="split").encode(["a text"])
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": "a text"}) + "\n")
    settings = {"input.paths": [str(corpus)], "output.path": str(tmp_path / "out"), "encoder.model": str(splade_tiny)}
    with pytest.raises(SettingError, match=r"encoder.stride: 62 must be below .*\(62: max_length 64 minus 2"):
        make_plan(
            load_config(
                None, settings | {"encoder.max_length": 64, "encoder.stride": 62, "encoder.long_documents": "max"}
            )
        )
    with pytest.raises(SettingError, match="'split' gives one vector per window"):
        make_plan(load_config(None, settings | {"encoder.long_documents": "split"}))
