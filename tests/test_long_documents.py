"""Long documents: ``max`` pools a document's windows into one vector, ``split`` gives one vector
per window; both against the plain reference of each window (cut by hand), on the same weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import s3fs
from support.jobs import read_delta
from support.reference import LONG, TEXTS, VOCAB, densify, pruned, reference_ids, reference_splade, windows_of
from support.sink_checks import store_vectors

from pipeline import SpladeEncoder
from pipeline.config import JobConfig, load_config
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
    text = "ocean " * 350_000  # 2.1 MB, 350,000 word pieces: 2,778 windows of 126 and [CLS]/[SEP]
    assert len(text) > 2_000_000
    enc = SpladeEncoder(str(tiny_models["bert"]), device="cpu", max_length=128, long_documents="max")
    passes: list[int] = []
    enc.before_forward = passes.append
    got = enc.encode_batch([text, "short"])
    assert got.windows.tolist() == [2778, 1] and got.num_tokens[0] == 350_000 + 2 * 2778
    assert len(passes) >= 2778 * 128 // 1024 and max(passes) <= enc.max_batch_tokens == 1024
    # 2,777 windows of the same 126 tokens and one of the last 98: the max of those two vectors
    want = densify(enc.encode_batch(["ocean " * 126, "ocean " * 98]).sparse, VOCAB).max(axis=0)
    assert np.abs(densify(got.sparse.slice(0, 1), VOCAB)[0] - want).max() <= 1e-5


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


def _put(prefix: str, docs: dict[str, str], *later: dict[str, str]) -> None:
    """``docs`` in one JSONL file, each of ``later`` in a file after it."""
    fs = s3fs.S3FileSystem()
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)
    for n, part in enumerate([docs, *later]):
        rows = "\n".join(json.dumps({"id": i, "text": t}) for i, t in part.items())
        fs.pipe(f"{prefix}/part-{n}.jsonl", rows.encode())
    fs.invalidate_cache()


def _mixed(prefix: str, n: int, every: int) -> dict[str, str]:
    """``n`` sample texts, every ``every``-th with three windows' worth of words added (bucket made)."""
    fs = s3fs.S3FileSystem()
    if not fs.exists("long"):
        fs.mkdir("long")
    return {
        f"{prefix}{i:02d}": f"{TEXTS[i % len(TEXTS)] or 'a short one'} {THREE if i % every == 0 else ''}".strip()
        for i in range(n)
    }


def _job(
    model: Path, corpus: str, out: str, settings: dict[str, Any], extra: dict[str, Any]
) -> tuple[JobConfig, SpladeEncoder]:
    """A job over ``s3://long/<corpus>/`` into ``s3://long/<out>``, and an encoder with its ``settings``."""
    paths = {"input.paths": [f"s3://long/{corpus}/"], "output.path": f"s3://long/{out}", "encoder.model": str(model)}
    config = load_config(None, paths | extra | settings)
    return config, SpladeEncoder(str(model), device="cpu", **{k.split(".")[1]: v for k, v in settings.items()})


def _assert_table(url: str, docs: dict[str, str], enc: SpladeEncoder) -> None:
    data = read_delta(url)
    ids = data["id"].to_pylist()
    assert sorted(ids) == sorted(docs)  # one row per document, whatever its windows
    want = densify(enc.encode([docs[i] for i in ids]), VOCAB)
    assert np.abs(densify(data["sparse"].combine_chunks(), VOCAB) - want).max() <= 1e-5


def test_the_job_pools_long_documents_and_reindexes_them_per_document(ray_cluster: str, splade_tiny: Path) -> None:
    docs = _mixed("d", 24, every=3)
    docs["huge"] = LONG
    _put("long/corpus", docs)
    settings = {"encoder.max_length": 32, "encoder.long_documents": "max", "encoder.stride": 4, "encoder.top_k": 40}
    config, enc = _job(splade_tiny, "corpus", "out", settings, {"input.rows_per_block": 8})
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
    assert counts["rewritten_files"] >= 1  # files copied without their changed rows still count their windows
    assert again["windows"] == int(enc.encode_batch(list(now.values())).windows.sum())
    _assert_table(config.output.path, now, enc)

    # another way of cutting long documents is another fingerprint: everything would be encoded again
    truncating = config.model_copy(update={"encoder": config.encoder.model_copy(update={"long_documents": "truncate"})})
    plan = run_reindex(truncating, dry_run=True)
    assert plan["full"] and "long_documents" in plan["reason"], plan


def test_encode_refuses_split_and_a_bad_stride_stops_the_job_before_it_starts(
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


# ---- the job, split: one row per window, reconciled per document; reindex and the store per document


def _window_reference(enc: SpladeEncoder, docs: dict[str, str]) -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
    """``<id>#<k>`` -> the window's vector (densified) and characters, from encode_batch in split mode
    (itself checked against hand-cut windows above)."""
    ids = list(docs)
    got = enc.encode_batch([docs[i] for i in ids])
    dense = densify(got.sparse, VOCAB)
    return {
        f"{ids[p]}#{w}": (dense[row], (int(got.spans[row, 0]), int(got.spans[row, 1])))
        for row, (p, w) in enumerate(zip(got.parent.tolist(), got.window.tolist(), strict=True))
    }


def _assert_windows(url: str, docs: dict[str, str], enc: SpladeEncoder, postgres: Any, collection: str) -> int:
    data = read_delta(url)
    want = _window_reference(enc, docs)
    ids = data["id"].to_pylist()
    assert sorted(ids) == sorted(want)  # every window of every document, nothing else
    parents, windows = data["parent_id"].to_pylist(), data["window"].to_pylist()
    assert ids == [f"{p}#{w}" for p, w in zip(parents, windows, strict=True)]
    got = densify(data["sparse"].combine_chunks(), VOCAB)
    spans = list(zip(data["start_char"].to_pylist(), data["end_char"].to_pylist(), strict=True))
    for row, doc in enumerate(ids):
        assert np.abs(got[row] - want[doc][0]).max() <= 1e-5, doc
        assert spans[row] == want[doc][1], doc
    hashes = dict(zip(parents, data["content_hash"].to_pylist(), strict=False))
    assert all(h == hashes[p] for p, h in zip(parents, data["content_hash"].to_pylist(), strict=True))
    stored = store_vectors(postgres, collection)
    assert sorted(stored) == sorted(ids)  # the store holds the windows, by window id
    for row, doc in enumerate(ids):
        assert np.abs(stored[doc] - got[row]).max() <= 1e-6, doc
    return len(ids)


def test_the_job_splits_long_documents_into_window_rows_and_reindexes_them_per_document(
    ray_cluster: str, splade_tiny: Path, postgres: Any
) -> None:
    docs = _mixed("s", 14, every=4)
    docs["grows"] = "a short one"
    hostile = {"page#2": "an id that could name a window", "x": THREE}
    # a later copy of "grows" (another file) with more windows than the first: all of them are rejected
    later = {"grows": THREE + " " + THREE, "tail": "the last one", "page#2": "again: each row of it is refused"}
    _put("long/split", docs | hostile, later)
    settings = {"encoder.max_length": 16, "encoder.long_documents": "split", "encoder.stride": 3, "encoder.top_k": 10}
    store = {"sink.type": "pgvector", "sink.dsn": postgres.dsn, "sink.collection": "split_windows"}
    extra = {"input.rows_per_block": 4, "reindex.max_delete_percent": 50, **store}
    config, enc = _job(splade_tiny, "split", "split-out", settings, extra)
    summary = run_job(config)
    first = docs | {"x": THREE, "tail": "the last one"}
    windows = _assert_windows(config.output.path, first, enc, postgres, "split_windows")
    assert summary["rows_read"] == 20 and summary["rows_written"] == 17 and summary["rows_rejected"] == 3
    assert summary["rejected_by_reason"] == {"duplicate_id": 1, "invalid_id": 2}
    assert summary["windows"] == windows > 17 + 8
    rejects = read_delta(config.output.path + "/_rejects")
    assert sorted(rejects["id"].to_pylist()) == ["grows", "page#2", "page#2"]
    assert "could take the name of another document's window" in " ".join(rejects["detail"].to_pylist())
    assert summary["sink"]["store_count"] == windows and not summary.get("errors")

    # a document that shrinks to one window, one removed, one new, one unchanged: per document
    now = {k: v for k, v in first.items() if k not in ("s04", "tail")}
    now["s00"] = "it shrank to a single window"
    now["fresh"] = THREE
    _put("long/split", now | {"page#2": "still here, still refused"})
    again = run_reindex(config)
    counts = again["reindex"]
    assert (counts["new"], counts["changed"], counts["deleted"], counts["encoded_now"]) == (1, 1, 2, 2), counts
    assert counts["unchanged"] == len(now) - 2 and counts["documents"] == len(now) and counts["rejected"] == 1
    assert again["rows_read"] == len(now) + 1 and again["rows_written"] == len(now)
    windows = _assert_windows(config.output.path, now, enc, postgres, "split_windows")  # s00#1.. gone from the store
    assert again["windows"] == windows and again["sink"]["store_count"] == windows
    assert run_reindex(config)["reindex"]["encoded_now"] == 0  # nothing changed: nothing encoded

    # search --group-by-parent: the best documents by their best window, as brute force ranks them
    from pipeline.search import search

    table = read_delta(config.output.path)
    parents = table["parent_id"].to_pylist()
    windows_dense = densify(table["sparse"].combine_chunks(), VOCAB).astype(np.float64)
    queries = ["tide moon shore", "the quick brown fox"]
    q = densify(enc.encode_queries(queries), VOCAB).astype(np.float64)
    k = len(now) - 1  # more documents than a first ask of 4k windows names: the store is asked again
    asked_again = False
    for hits, scores in zip(search(config, queries, k, group_by_parent=True), q @ windows_dense.T, strict=True):
        asked_again |= len({parents[i] for i in np.argsort(-scores)[: 4 * k]}) < k
        best: dict[str, float] = {}
        for parent, score in zip(parents, scores, strict=True):
            best[parent] = max(best.get(parent, 0.0), score)
        want = sorted(((s, p) for p, s in best.items() if s > 0), reverse=True)[:k]
        assert len(hits) == len(want) and len({p for p, _ in hits}) == len(hits)
        np.testing.assert_allclose([s for _, s in hits], [s for s, _ in want], rtol=1e-5)
        assert all(abs(best[p] - s) <= 1e-5 * max(1.0, s) for p, s in hits)
    assert asked_again  # the doubling was needed for one query at least


@pytest.mark.parametrize("where", ["driver", "cluster"])
def test_a_later_copy_of_a_split_document_leaves_with_all_its_windows_as_one_reject(
    splade_tiny: Path, tmp_path: Path, where: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cross-file duplicates (the job's step after writing; the ids grouped on the driver, or by Ray
    past DRIVER_MAX_ROWS): the later copy of ``a`` has more windows than the first; none of them
    may stay, and it is one rejected row."""
    from pipeline.job import dedupe

    if where == "cluster":
        request.getfixturevalue("ray_cluster")
        monkeypatch.setattr(dedupe, "DRIVER_MAX_ROWS", 0)
    from pipeline.config import EncoderConfig, InputConfig, OutputConfig
    from pipeline.encode.fingerprint import fingerprint
    from pipeline.job.stages import EncodeBlocks
    from pipeline.output.layout import BlockWriter, fingerprint_metadata
    from pipeline.output.location import OutputLocation
    from pipeline.sources import Shard, read_shard

    files = [{"a": "a short one", "b": THREE}, {"a": THREE + " " + THREE, "c": "another short one"}]
    encoder = EncoderConfig(model=str(splade_tiny), device="cpu", max_length=16, long_documents="split")
    fp = fingerprint(encoder)
    stage = EncodeBlocks(encoder, fp, threads=1)
    loc = OutputLocation.of(OutputConfig(path=str(tmp_path / "out")))
    writer = BlockWriter(loc, "zstd", fp, [], "t1")
    urls, parts = [], []
    for n, docs in enumerate(files):
        path = tmp_path / f"part-{n}.jsonl"
        path.write_text("\n".join(json.dumps({"id": i, "text": t}) for i, t in docs.items()))
        urls.append(str(path))
        for block in read_shard(Shard(n, str(path), "jsonl", unit=f"u{n}"), InputConfig(paths=[str(path)])):
            parts.append(writer.write(stage(block)))
    entries = pa.concat_tables(parts)
    assert int(pc.sum(entries["written"]).as_py()) == 4 and int(pc.sum(entries["windows"]).as_py()) == 1 + 3 + 6 + 1
    out = dedupe.drop_later_duplicates(loc, entries, urls, "t2", "zstd", fingerprint_metadata(fp), None, "parent_id")
    data = pa.concat_tables([loc.read_parquet(f) for f in out["data_file"].to_pylist() if f])
    assert sorted(data["id"].to_pylist()) == ["a#0", "b#0", "b#1", "b#2", "c#0"]
    rejects = pa.concat_tables([loc.read_parquet(f) for f in out["rejects_file"].to_pylist() if f])
    assert rejects["id"].to_pylist() == ["a"] and rejects["reason"].to_pylist() == ["duplicate_id"]
    assert str(path.parent / "part-0.jsonl") in rejects["detail"][0].as_py()
    rows, written = (int(pc.sum(out[c]).as_py()) for c in ("rows", "written"))
    assert rows == 4 == written + rejects.num_rows and int(pc.sum(out["windows"]).as_py()) == 5


@pytest.mark.parametrize("windows", [False, True])
def test_reindex_keeps_a_documents_windows_together_and_an_old_tables_second_row_goes(windows: bool) -> None:
    """``compare`` on a state: with windows, every row of a kept document stays (its file's); without,
    a table written before the duplicate rule that holds an id twice in one file keeps the first row."""
    from pipeline.job.reindex import SCAN_SCHEMA, compare

    rows = [("a", 1, "data/f1", 0), ("a", 1, "data/f1", 1), ("b", 2, "data/f1", 2), ("a", 1, "data/f2", 0)]
    state = pa.Table.from_pylist(
        [dict(zip(("id", "hash", "file", "pos"), r, strict=True)) for r in rows],
        schema=pa.schema([("id", pa.string()), ("hash", pa.int64()), ("file", pa.string()), ("pos", pa.int32())]),
    )
    scanned = pa.Table.from_pylist(
        [{"id": "a", "_hash": 1, "_shard": 0, "_line": 1}, {"id": "b", "_hash": 3, "_shard": 0, "_line": 2}],
        schema=SCAN_SCHEMA,
    )
    diff = compare(scanned, state, False, ["corpus.jsonl"], windows=windows)
    assert diff.counts["unchanged"] == 1 and diff.counts["changed"] == 1 and diff.counts["deleted"] == 0
    assert diff.encode["id"].to_pylist() == ["b"]
    dropped = {f: sorted(p.to_pylist()) for f, p in diff.rewrite.items()}
    # a's rows in f1 are its windows (kept) or a first row and its old duplicate (the second goes)
    assert dropped == ({"data/f1": [2], "data/f2": [0]} if windows else {"data/f1": [1, 2], "data/f2": [0]})
