"""Exports for search engines: every format parsed back and compared with the committed output
(anserini's quantisation within half a step, the engines' escaped feature names restored),
locally and on S3 through moto's server; hostile tokens through the escape; refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import s3fs
from support.jobs import ROOT, read_delta

from pipeline.encode.sparse import sparse_array, sparse_rows
from pipeline.errors import SettingError
from pipeline.export import ExportSettings, feature_name, lines, token_of, vocabulary

SAMPLE = ROOT / "pipeline" / "data" / "sample_corpus.jsonl"


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "export", *args], capture_output=True, text=True, timeout=240, cwd=ROOT
    )


@pytest.fixture(scope="module")
def output(ray_cluster: str, splade_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample corpus encoded by the job, with a passthrough column for anserini's contents."""
    out = tmp_path_factory.mktemp("export") / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "encode",
            "--input",
            str(SAMPLE),
            "--output",
            str(out),
            "--model",
            str(splade_tiny),
            "--passthrough-columns",
            '["title"]',
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def table_vectors(output: Path) -> dict[str, dict[int, float]]:
    table = read_delta(str(output))
    return {
        doc: dict(zip(idx.tolist(), val.tolist(), strict=True))
        for doc, (idx, val) in zip(table["id"].to_pylist(), sparse_rows(table["sparse"].combine_chunks()), strict=True)
    }


def parsed(folder: Path) -> list[dict]:
    header = json.loads((folder / "_EXPORT.json").read_text())
    rows = []
    for name in header["files"]:
        rows += [json.loads(line) for line in (folder / name).read_text().splitlines()]
    return rows


@pytest.mark.parametrize("quantize", [100, 7])
def test_anserini_weights_are_within_half_a_step(
    output: Path, splade_tiny: Path, tmp_path: Path, quantize: int
) -> None:
    to = tmp_path / "anserini"
    proc = export(
        "--from",
        str(output),
        "--format",
        "anserini",
        "--to",
        str(to),
        "--quantize",
        str(quantize),
        "--contents-column",
        "title",
        "--shard-docs",
        "10",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = json.loads((to / "_EXPORT.json").read_text())
    assert header["documents"] == 32 and len(header["files"]) == 4  # 10 + 10 + 10 + 2
    assert header["fingerprint"]["vocab_size"] == 30522 and header["table_version"] == 0
    vocab = {t: i for i, t in enumerate(vocabulary(str(splade_tiny)))}
    want = table_vectors(output)
    titles = {r["id"]: r["title"] for r in map(json.loads, SAMPLE.read_text().splitlines())}
    docs = parsed(to)
    assert sorted(d["id"] for d in docs) == sorted(want)
    for doc in docs:
        assert doc["contents"] == titles[doc["id"]]
        got = {vocab[t]: w for t, w in doc["vector"].items()}
        expected = want[doc["id"]]
        assert all(isinstance(w, int) and w > 0 for w in got.values())
        # every term that rounds to a positive integer is there, within half a step; the rest dropped
        assert set(got) == {i for i, w in expected.items() if round(w * quantize) > 0}
        assert max(abs(got[i] / quantize - expected[i]) for i in got) <= 0.5 / quantize + 1e-7


@pytest.mark.parametrize("fmt", ["opensearch", "elasticsearch", "jsonl"])
def test_engine_and_jsonl_exports_read_back_exactly(output: Path, splade_tiny: Path, tmp_path: Path, fmt: str) -> None:
    to = tmp_path / fmt
    proc = export("--from", str(output), "--format", fmt, "--to", str(to), "--index", "passages", "--field", "sp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported 32 documents" in proc.stdout
    vocab = {t: i for i, t in enumerate(vocabulary(str(splade_tiny)))}
    want = table_vectors(output)
    rows = parsed(to)
    if fmt == "jsonl":
        docs = {r["id"]: {vocab[t]: w for t, w in r["terms"].items()} for r in rows}
    else:
        actions, sources = rows[0::2], rows[1::2]
        assert all(a["index"]["_index"] == "passages" for a in actions)
        assert all("." not in f and w > 0 for s in sources for f, w in s["sp"].items())  # what both engines demand
        docs = {
            a["index"]["_id"]: {vocab[token_of(f)]: w for f, w in s["sp"].items()}
            for a, s in zip(actions, sources, strict=True)
        }
    assert docs.keys() == want.keys()
    for doc, vector in docs.items():  # float32 values through JSON and back: exact
        assert vector == want[doc]


def test_export_to_object_storage(output: Path, s3_endpoint: str) -> None:
    fs = s3fs.S3FileSystem()
    if not fs.exists("exports"):
        fs.mkdir("exports")
    proc = export("--from", str(output), "--format", "jsonl", "--to", "s3://exports/run1", "--shard-docs", "20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    fs.invalidate_cache()
    header = json.loads(fs.cat("exports/run1/_EXPORT.json"))
    assert header["files"] == ["part-00000.jsonl", "part-00001.jsonl"]
    got = [json.loads(line) for f in header["files"] for line in fs.cat(f"exports/run1/{f}").decode().splitlines()]
    assert len(got) == 32 == header["documents"]


def test_an_export_never_mixes_with_an_earlier_one_and_bad_settings_are_named(output: Path, tmp_path: Path) -> None:
    to = tmp_path / "twice"
    assert export("--from", str(output), "--format", "jsonl", "--to", str(to)).returncode == 0
    again = export("--from", str(output), "--format", "jsonl", "--to", str(to))
    assert again.returncode == 2 and "holds an earlier export" in again.stderr and "Traceback" not in again.stderr
    bad = export("--from", str(output), "--format", "solr", "--to", str(tmp_path / "x"))
    assert bad.returncode == 2 and "'solr' is not one of anserini, opensearch, elasticsearch, jsonl" in bad.stderr
    missing = export("--from", str(tmp_path / "nothing"), "--format", "jsonl", "--to", str(tmp_path / "y"))
    assert missing.returncode == 2 and "no Delta table here" in missing.stderr


def test_hostile_tokens_survive_the_feature_name_escape(splade_tiny: Path) -> None:
    for token in [".", "...", "##.", "%", "%2E", "%25", "a.b%2Ec", "", "é.ü", "\u2024"]:
        name = feature_name(token)
        assert "." not in name and token_of(name) == token
    vocab = vocabulary(str(splade_tiny))
    ids = [vocab.index("."), vocab.index("%"), vocab.index("...") if "..." in vocab else vocab.index(","), 2000]
    batch = pa.table(
        {
            "id": ['d"1\n\u2028'],  # an id JSON must escape
            "sparse": sparse_array(np.array([0, 4]), np.array(ids), np.array([0.5, 1.25, 2.0, 3e-3], np.float32)),
        }
    )
    action, source = (json.loads(line) for line in lines(ExportSettings("elasticsearch", "x"), batch, vocab))
    assert action["index"]["_id"] == 'd"1\n\u2028'
    assert {vocab.index(token_of(f)): w for f, w in source["splade"].items()} == dict(
        zip(ids, [0.5, 1.25, 2.0, float(np.float32(3e-3))], strict=True)
    )
    (anserini,) = (json.loads(line) for line in lines(ExportSettings("anserini", "x", quantize=100), batch, vocab))
    assert list(anserini["vector"].values()) == [50, 125, 200]  # 0.3 rounds to 0: dropped
    with pytest.raises(SettingError, match="without dots"):
        ExportSettings("opensearch", "x", field="a.b")
