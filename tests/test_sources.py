"""Listing and reading shards, without Ray: formats, compression, ordering, column mapping."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import InputConfig
from pipeline.sources import InputError, detect_format, list_shards, read_shard


def _rows(cfg: InputConfig) -> list[dict]:
    return [row for shard in list_shards(cfg) for block in read_shard(shard, cfg) for row in block.to_pylist()]


def test_formats_and_compression(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl.gz").write_bytes(
        gzip.compress(b'{"id": "j1", "title": "T", "text": "gz text", "lang": "fr"}\n')
    )
    pq.write_table(
        pa.table({"id": [1, 2], "title": [None, "P"], "text": ["pq one", "pq two"], "lang": ["en", "de"]}),
        tmp_path / "a.parquet",
    )
    (tmp_path / "c.csv").write_text("id,title,text,lang\nc1,,csv text,es\n")
    (tmp_path / "_SUCCESS").write_text("")
    cfg = InputConfig(paths=[str(tmp_path)], title_column="title", passthrough_columns=["lang"])
    assert [s.format for s in list_shards(cfg)] == ["parquet", "jsonl", "csv"]  # sorted by URL, markers ignored
    rows = _rows(cfg)
    assert [(r["id"], r["text"], r["lang"], r["_reject"]) for r in rows] == [
        ("1", "pq one", "en", None),  # integer ids become strings; a null title is left out
        ("2", "P pq two", "de", None),
        ("j1", "T gz text", "fr", None),
        ("c1", "csv text", "es", None),
    ]
    assert [r["_line"] for r in rows] == [0, 1, 1, 2]


def test_glob_and_explicit_format(tmp_path: Path) -> None:
    for name in ("x2.txt", "x1.txt", "y.txt"):
        (tmp_path / name).write_text(json.dumps({"id": name, "text": "t"}) + "\n")
    cfg = InputConfig(paths=[str(tmp_path / "x*.txt")], format="jsonl")
    assert [r["id"] for r in _rows(cfg)] == ["x1.txt", "x2.txt"]
    with pytest.raises(InputError, match="unknown file format"):
        list_shards(InputConfig(paths=[str(tmp_path / "x*.txt")]))


def test_blocks_carry_their_size(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"id": i, "text": "t"}) for i in range(5)))
    cfg = InputConfig(paths=[str(tmp_path)], rows_per_block=2)
    blocks = [b.to_pylist() for b in read_shard(list_shards(cfg)[0], cfg)]
    assert [len(b) for b in blocks] == [2, 2, 1]
    assert [(b[0]["_block"], b[0]["_block_rows"]) for b in blocks] == [(0, 2), (1, 2), (2, 1)]


def test_detect_format() -> None:
    assert detect_format("s3://b/x.JSONL.GZ") == "jsonl"
    assert (
        detect_format("x.ndjson") == "jsonl"
        and detect_format("x.csv.bz2") == "csv"
        and detect_format("x.pq") == "parquet"
    )
    assert detect_format("x.txt") is None


def test_empty_file_is_one_empty_block(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    cfg = InputConfig(paths=[str(tmp_path / "empty.jsonl")])
    blocks = list(read_shard(list_shards(cfg)[0], cfg))
    assert len(blocks) == 1 and blocks[0].num_rows == 0
