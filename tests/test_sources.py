"""Listing and reading shards, without Ray: formats, compression, ordering, column mapping."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import InputConfig
from pipeline.sources import InputError, check_columns, detect_format, list_shards, read_shard


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


def test_lone_surrogates_cost_one_row_not_the_file(tmp_path: Path) -> None:
    """``"\\ud800"`` is valid JSON but no UTF-8: such a row (in the id, text, title or a passthrough
    column) is rejected with its field named; the rows around it, in the same block, are read."""
    lines = [
        '{"id": "ok-1", "title": "t", "text": "fine", "lang": "en"}',
        '{"id": "bad-text", "title": "t", "text": "a \\ud800 b", "lang": "en"}',
        '{"id": "bad-\\udc00-id", "title": "t", "text": "fine", "lang": "en"}',
        '{"id": "bad-title", "title": "\\udfff", "text": "fine", "lang": "en"}',
        '{"id": "bad-lang", "title": "t", "text": "fine", "lang": "\\ud83d"}',
        '{"id": "ok-2", "title": "t", "text": "emoji \\ud83d\\ude80 pair is fine", "lang": "en"}',
        '{"id": "ok-3", "title": "t", "text": "nested", "lang": {"x": "\\ud800", "y": "\u00e9"}}',
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    for on_bad_file in ("error", "skip"):
        cfg = InputConfig(
            paths=[str(tmp_path)], title_column="title", passthrough_columns=["lang"], on_bad_file=on_bad_file
        )
        blocks = list(read_shard(list_shards(cfg)[0], cfg))
        table = pa.concat_tables(blocks)
        assert table.num_rows == len(lines)
        rows = {r["_line"]: r for r in table.to_pylist()}
        assert rows[7]["_reject"] is None and json.loads(rows[7]["lang"]) == {"x": "\ud800", "y": "\u00e9"}
        assert [rows[i]["_reject"] for i in range(1, 7)] == [
            None,
            "invalid_unicode",
            "invalid_unicode",
            "invalid_unicode",
            "invalid_unicode",
            None,
        ]
        assert "'text'" in rows[2]["_detail"] and "'id'" in rows[3]["_detail"] and "'lang'" in rows[5]["_detail"]
        assert rows[3]["id"] == "bad-\\udc00-id"  # kept readable, as UTF-8, for the rejects file
        assert rows[6]["text"] == "t emoji \U0001f680 pair is fine" and rows[6]["_hash"] is not None
        pq.write_table(table.drop_columns(["text"]), tmp_path / f"block-{on_bad_file}.parquet")  # Arrow-clean


def _by_line(cfg: InputConfig) -> dict[int, dict]:
    return {r["_line"]: r for r in _rows(cfg)}


def test_long_csv_fields_are_documents_and_oversized_ones_cost_a_row(tmp_path: Path) -> None:
    """Python's csv refuses fields over 131,072 characters by default: a long document is read;
    one over input.max_document_bytes is rejected alone."""
    long_text = "tide " * 60_000  # 300,000 characters
    (tmp_path / "a.csv").write_text(f"id,text\nshort,hello\nlong,{long_text}\nhuge,{'x' * 5000}\nafter,bye\n")
    rows = _by_line(InputConfig(paths=[str(tmp_path)], max_document_bytes=400_000))
    assert rows[3]["_reject"] is None and rows[3]["text"] == long_text
    assert [rows[i]["_reject"] for i in (2, 4, 5)] == [None, None, None]
    small = _by_line(InputConfig(paths=[str(tmp_path)], max_document_bytes=4096))
    assert small[3]["_reject"] == small[4]["_reject"] == "document_too_large"
    assert "input.max_document_bytes (4096)" in small[4]["_detail"]
    assert small[2]["_reject"] is None and small[5]["text"] == "bye"


def test_byte_order_marks_are_not_part_of_the_first_column(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_bytes(b"\xef\xbb\xbfid,text\nc1,from excel\n")
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"id": "j1", "text": "with a bom"}\n{"id": "j2", "text": "x"}\n')
    cfg = InputConfig(paths=[str(tmp_path)], on_bad_file="skip")
    for shard in list_shards(cfg):
        check_columns(shard, cfg)  # no "missing column 'id'"
    assert [(r["id"], r["_reject"]) for r in _rows(cfg)] == [("c1", None), ("j1", None), ("j2", None)]


def test_jsonl_optional_keys_may_be_missing_and_passthrough_keeps_one_type(tmp_path: Path) -> None:
    records = [
        {"id": "1", "title": "T", "text": "a", "lang": "en", "n": 3},
        {"id": "2", "text": "b"},  # no title, no passthrough values
        {"id": "3", "text": "c", "lang": None, "n": {"nested": True}},
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cfg = InputConfig(paths=[str(tmp_path)], title_column="title", passthrough_columns=["lang", "n"], rows_per_block=1)
    shard = list_shards(cfg)[0]
    check_columns(shard, cfg)
    blocks = list(read_shard(shard, cfg))
    assert [b.schema.field("lang").type for b in blocks] == [pa.string()] * 3
    assert [b.schema.field("n").type for b in blocks] == [pa.string()] * 3
    rows = [r for b in blocks for r in b.to_pylist()]
    assert [(r["text"], r["lang"], r["n"], r["_reject"]) for r in rows] == [
        ("T a", "en", "3", None),
        ("b", None, None, None),
        ("c", None, '{"nested": true}', None),
    ]


def test_a_line_over_the_limit_is_rejected_without_the_file(tmp_path: Path) -> None:
    big = "y" * 5000
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"id": "1", "text": "ok"})
        + "\n"
        + json.dumps({"id": "2", "text": big})
        + "\n"
        + json.dumps({"id": "3", "text": "fine"})  # no final newline
    )
    (tmp_path / "b.csv").write_text(f"id,text\nc1,ok\nc2,{big}\nc3,fine\n")
    cfg = InputConfig(paths=[str(tmp_path)], max_line_bytes=1024)
    rows = _rows(cfg)
    assert [(r["_source"].rsplit("/", 1)[-1], r["_line"], r["_reject"]) for r in rows] == [
        ("a.jsonl", 1, None),
        ("a.jsonl", 2, "line_too_long"),
        ("a.jsonl", 3, None),
        ("b.csv", 2, None),
        ("b.csv", 3, "line_too_long"),
        ("b.csv", 4, None),
    ]
    assert rows[2]["text"] == "fine" and rows[5]["text"] == "fine"


def test_ids_are_strings_or_integers_and_nothing_else(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": [7, 8], "text": ["int id", "int id"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": [1.0, float("nan")], "text": ["float", "nan"]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"id": [b"raw"], "text": ["bytes"]}), tmp_path / "c.parquet")
    (tmp_path / "d.jsonl").write_text(
        '{"id": true, "text": "bool"}\n{"id": "s", "text": "str"}\n{"id": 2.5, "text": "f"}\n'
    )
    rows = _rows(InputConfig(paths=[str(tmp_path)]))
    assert [(r["id"], r["_reject"]) for r in rows] == [
        ("7", None),
        ("8", None),
        (None, "invalid_id"),
        (None, "invalid_id"),
        (None, "invalid_id"),
        (None, "invalid_id"),
        ("s", None),
        (None, "invalid_id"),
    ]
    assert "float" in rows[2]["_detail"] and "ids are strings or integers" in rows[2]["_detail"]
