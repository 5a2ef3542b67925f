"""Input shards: listing them (sorted, on any fsspec filesystem) and reading them into blocks.

Each block is an Arrow table with the mapped columns ``id`` and ``text`` (title joined in front),
the passthrough columns, and bookkeeping columns: ``_source`` (file URL), ``_line`` (1-based line
for JSONL/CSV, 0-based row for Parquet), ``_reject`` (null for a good row, else the reason),
``_detail`` (what exactly was wrong), ``_hash`` (64-bit content hash of exactly the text that is
encoded, title included, and of the passthrough values; null for rejects),
``_shard``/``_unit``/``_block`` (where the block came from: the shard's position, its unit of
resumable work, the block within it), ``_block_rows``
(rows in that block: the writer checks that none went missing on the way) and ``_last`` (the
shard's final block: a unit is complete once all blocks up to it are committed).

A bad row never stops a run: it becomes a reject with its reason. A file that cannot be read
at all stops the run with its URL named, or with ``on_bad_file: skip`` becomes one
``bad_file`` marker row that the summary reports (and that is not counted as a row read).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.errors import PipelineError
from pipeline.storage import open_url, url_to_fs

GLOB_CHARS = "*?["
BAD_FILE = "bad_file"
BOM = b"\xef\xbb\xbf"
TOO_LONG = "\uffffline_too_long\uffff\n"  # stands in for a CSV line over the limit (U+FFFF is no character)
_SUFFIXES = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
}
_COMPRESSION = (".gz", ".bz2", ".zst", ".xz")


class InputError(PipelineError, ValueError):
    """The input cannot be used as configured; the message names the URL or file."""


@dataclass(frozen=True)
class Shard:
    """One input file, and what of it a run reads.

    ``version`` identifies the file's content (ETag on object stores, size and mtime on local
    disks); ``unit`` names the work of reading it under one config (see :mod:`pipeline.output.commits`);
    ``skip_blocks`` are blocks already committed; ``lines`` (when set) restricts reading to
    those rows (``_line`` values), as a reindex does for new and changed documents.
    """

    index: int
    url: str
    format: str
    version: str = ""
    unit: str = ""
    skip_blocks: tuple[int, ...] = ()
    lines: tuple[int, ...] | None = None
    size: int = 0  # bytes, as listed (compressed size for compressed files)


def detect_format(url: str) -> str | None:
    name = url.lower()
    for comp in _COMPRESSION:
        name = name.removesuffix(comp)
    return next((fmt for suffix, fmt in _SUFFIXES.items() if name.endswith(suffix)), None)


def list_shards(cfg: InputConfig) -> list[Shard]:
    """Every input file, sorted by URL, with its format; fails before any cluster work."""
    found: dict[str, tuple[str, str, int]] = {}
    for path in cfg.paths:
        for url, version, size in _expand(path, cfg.storage_options):
            fmt = cfg.format if cfg.format != "auto" else detect_format(url)
            if fmt is None:
                raise InputError(
                    f"{url}: unknown file format; use .parquet, .jsonl/.json/.ndjson or .csv (optionally .gz), or set "
                    "input.format"
                )
            found[url] = (fmt, version, size)
    return [
        Shard(i, url, fmt, version, size=size) for i, (url, (fmt, version, size)) in enumerate(sorted(found.items()))
    ]


def file_version(info: dict[str, Any]) -> str:
    """What identifies a file's content without reading it: its ETag/generation where the store
    has one, else size and modification time."""
    for key in ("ETag", "etag", "md5Hash", "generation", "content_md5"):
        if info.get(key):
            return f"{key}:{str(info[key]).strip(chr(34))}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated") or ""
    return f"size:{info.get('size')}:mtime:{mtime}"


def _expand(path: str, storage_options: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(URL, version, size) of every file ``path`` names; the listing's details give the versions."""
    try:
        fs, root = url_to_fs(path, storage_options)
        fs.invalidate_cache()  # a long-lived process (notebook, scheduler) must see the input as it is now
        if any(c in root for c in GLOB_CHARS):
            matches = {p: info for p, info in fs.glob(root, detail=True).items() if info.get("type") == "file"}
        elif fs.isdir(root):
            matches = fs.find(root, detail=True)
        elif fs.isfile(root):
            info = fs.info(root)
            return [(fs.unstrip_protocol(root), file_version(info), int(info.get("size") or 0))]
        else:
            raise InputError(f"{path}: no such file or folder")
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any storage failure is reported with the URL
        raise InputError(f"{path}: cannot list input: {_describe(err)}") from None
    # Hidden and marker files (_SUCCESS, .crc, _SUMMARY.json) are never data.
    files = [p for p in matches if not p.rsplit("/", 1)[-1].startswith((".", "_"))]
    if not files:
        raise InputError(f"{path}: no input files matched")
    return [(fs.unstrip_protocol(p), file_version(matches[p]), int(matches[p].get("size") or 0)) for p in files]


def _describe(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return f"{type(err).__name__}: {text}" if type(err).__name__ not in text else text


def check_columns(shard: Shard, cfg: InputConfig) -> None:
    """Plan-time check on one shard that the configured columns exist (lists those found). A file
    that cannot be read is an error naming it, or with ``on_bad_file: skip`` left to the reader
    (which reports it as skipped)."""
    try:
        _check_columns(shard, cfg)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - a file we cannot read at all
        if cfg.on_bad_file == "error":
            raise _unreadable(shard, err) from None


def _unreadable(shard: Shard, err: BaseException) -> InputError:
    return InputError(
        f"{shard.url}: cannot read as {shard.format}: {_describe(err)} (set input.on_bad_file: skip to skip such files)"
    )


def _check_columns(shard: Shard, cfg: InputConfig) -> None:
    with _open(shard, cfg) as fh:
        if shard.format == "parquet":
            found = pq.ParquetFile(fh).schema_arrow.names
        elif shard.format == "csv":
            found = next(csv.reader(io.TextIOWrapper(fh, encoding="utf-8-sig", errors="replace", newline="")), [])
        else:
            lines = (line for line in _capped_lines(fh, cfg.max_line_bytes) if line is None or line.strip())
            first = next(lines, b"{}")
            try:
                record = json.loads(first.removeprefix(BOM)) if first is not None else None
            except ValueError:
                record = None
            if not isinstance(record, dict):
                return  # the row-level reader reports the line with its number
            # JSON records need not all carry the optional keys (title, passthrough): missing ones
            # are null. Only the id and text columns are checked here, on the first record.
            found = list(record)
            _require_columns(shard, cfg, found, optional=False)
            return
    _require_columns(shard, cfg, found)


def _require_columns(shard: Shard, cfg: InputConfig, found: list[str], *, optional: bool = True) -> None:
    wanted = [cfg.id_column, cfg.text_column]
    if optional:
        wanted += [*([cfg.title_column] if cfg.title_column else []), *cfg.passthrough_columns]
    missing = [c for c in wanted if c not in found]
    if missing:
        raise InputError(f"{shard.url}: missing column(s) {missing}; columns found: {list(found)}")


def _open(shard: Shard, cfg: InputConfig) -> Any:
    compression = None if shard.format == "parquet" else "infer"  # Parquet needs a seekable file
    return open_url(shard.url, "rb", cfg.storage_options, compression=compression)


# ---- reading -----------------------------------------------------------------------------------


class _BlockBuilder:
    """Collects validated rows and cuts them into blocks of ``rows_per_block``."""

    def __init__(self, shard: Shard, cfg: InputConfig) -> None:
        self.shard, self.cfg = shard, cfg
        self.rows: list[dict[str, Any]] = []
        self.block = 0
        # Passthrough columns keep one type across blocks and files: a Parquet file's own column
        # types (set by its reader), strings for JSONL and CSV (JSON values other than strings as
        # their JSON text); a missing value is null.
        self.types: dict[str, pa.DataType] = {name: pa.string() for name in cfg.passthrough_columns}

    def add(
        self, record: dict[str, Any] | None, line: int, reject: str | None = None, detail: str | None = None
    ) -> pa.Table | None:
        """Append one row; return a finished block when this row fills one."""
        row = {"id": None, "text": None, **{c: None for c in self.cfg.passthrough_columns}}
        if reject is None:
            reject, detail = map_record(record, self.cfg, row)
        if self.shard.format != "parquet":
            for name in self.cfg.passthrough_columns:
                value = row[name]
                row[name] = value if value is None or isinstance(value, str) else _json_text(value)
        row.update(
            _source=self.shard.url,
            _line=line,
            _reject=reject,
            _detail=detail,
            _hash=None if reject else content_hash(row["text"], [row[c] for c in self.cfg.passthrough_columns]),
        )
        self.rows.append(row)
        return self.flush() if len(self.rows) >= self.cfg.rows_per_block else None

    def flush(self) -> pa.Table:
        n = len(self.rows)
        for row in self.rows:
            row.update(_shard=self.shard.index, _unit=self.shard.unit, _block=self.block, _block_rows=n)
        table = _to_table(self.rows, self.cfg, self.types)
        self.rows, self.block = [], self.block + 1
        return table


def _to_table(rows: list[dict[str, Any]], cfg: InputConfig, types: dict[str, pa.DataType]) -> pa.Table:
    columns: dict[str, pa.Array] = {
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "text": pa.array([r["text"] for r in rows], pa.string()),
    }
    for name in cfg.passthrough_columns:
        columns[name] = pa.array([r[name] for r in rows], types[name])
    columns |= {
        "_source": pa.array([r["_source"] for r in rows], pa.string()),
        "_line": pa.array([r["_line"] for r in rows], pa.int64()),
        "_reject": pa.array([r["_reject"] for r in rows], pa.string()),
        "_detail": pa.array([r["_detail"] for r in rows], pa.string()),
        "_hash": pa.array([r["_hash"] for r in rows], pa.int64()),
        "_shard": pa.array([r["_shard"] for r in rows], pa.int32()),
        "_unit": pa.array([r["_unit"] for r in rows], pa.string()),
        "_block": pa.array([r["_block"] for r in rows], pa.int32()),
        "_block_rows": pa.array([r["_block_rows"] for r in rows], pa.int32()),
        "_last": pa.array([False] * len(rows), pa.bool_()),
    }
    return pa.table(columns)


def content_hash(text: str, passthrough: list[Any] | None = None) -> int:
    """64-bit hash of what a document's row holds: the text that is encoded and, where passthrough
    columns are configured, their values (the reindex compares it per document id, so a changed
    passthrough value rewrites the row too). Without passthrough columns, the hash of the text."""
    data = text.encode("utf-8")
    if passthrough:
        data += b"\x00" + json.dumps(passthrough, default=str, ensure_ascii=True, sort_keys=True).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def map_record(record: dict[str, Any], cfg: InputConfig, row: dict[str, Any]) -> tuple[str | None, str | None]:
    """Fill ``row`` from ``record``; return (reason, detail) when the row must be rejected."""
    broken = _field_with_lone_surrogate(record, cfg)
    if broken is not None:
        # Valid JSON ("\ud800") but not encodable as UTF-8: nothing of the row can reach Arrow as it is.
        raw = record.get(cfg.id_column)
        row["id"] = raw.encode("utf-8", "backslashreplace").decode() if isinstance(raw, str) else None
        for name in cfg.passthrough_columns:
            row[name] = None
        return "invalid_unicode", f"{broken!r} holds a lone surrogate (U+D800..U+DFFF), which UTF-8 cannot encode"
    raw_id = record.get(cfg.id_column)
    row["id"] = _normalised_id(raw_id)
    for name in cfg.passthrough_columns:
        row[name] = record.get(name)
    if cfg.id_column not in record:
        return "missing_id", f"no {cfg.id_column!r} field; fields found: {sorted(record)}"
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        return "missing_id", f"{cfg.id_column!r} is null or empty"
    if row["id"] is None:
        shown = repr(raw_id)[:80]
        return "invalid_id", f"{cfg.id_column!r} is {type(raw_id).__name__} {shown}: ids are strings or integers"
    if cfg.text_column not in record:
        return "missing_text", f"no {cfg.text_column!r} field; fields found: {sorted(record)}"
    text = record[cfg.text_column]
    if text is None:
        return "null_text", f"{cfg.text_column!r} is null"
    if not isinstance(text, str):
        return "non_string_text", f"{cfg.text_column!r} is {type(text).__name__}"
    title = record.get(cfg.title_column) if cfg.title_column else None
    if title is not None and not isinstance(title, str):
        return "non_string_title", f"{cfg.title_column!r} is {type(title).__name__}"
    if title and title.strip():
        text = f"{title} {text}"
    if not text.strip():
        return "empty_text", f"{cfg.text_column!r} is empty or whitespace"
    size = len(text.encode("utf-8"))
    if size > cfg.max_document_bytes:
        return (
            "document_too_large",
            f"{size} bytes of text, more than input.max_document_bytes ({cfg.max_document_bytes})",
        )
    row["text"] = text
    return None, None


def _json_text(value: Any) -> str:
    """A JSON value as JSON text, readable (non-ASCII kept) unless it holds a lone surrogate, which
    only an escape can carry into UTF-8."""
    text = json.dumps(value, ensure_ascii=False)
    return json.dumps(value) if _has_surrogates(text) else text


def _normalised_id(raw: Any) -> str | None:
    """The id rule: strings as they are, integers in decimal; anything else (floats, NaN, booleans,
    bytes, lists) is no id, and the row is rejected."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    return None


def _field_with_lone_surrogate(record: dict[str, Any], cfg: InputConfig) -> str | None:
    title = [cfg.title_column] if cfg.title_column else []
    names = [cfg.id_column, cfg.text_column, *title, *cfg.passthrough_columns]
    return next((n for n in names if isinstance(record.get(n), str) and _has_surrogates(record[n])), None)


def read_shard(shard: Shard, cfg: InputConfig) -> Iterator[pa.Table]:
    """Blocks of validated rows from one file (see the module docstring for the columns).

    Blocks in ``shard.skip_blocks`` are read (to find where the next one starts) but not
    yielded; with ``shard.lines`` set, only those rows are taken. Each block is held back until
    the next one exists, so the final block can be flagged ``_last``.
    """
    builder = _BlockBuilder(shard, cfg)
    skip, wanted = set(shard.skip_blocks), None if shard.lines is None else set(shard.lines)
    held: tuple[int, pa.Table] | None = None  # (block number, block): an empty file's one block has no rows to ask
    try:
        with _open(shard, cfg) as fh:
            reader = {"parquet": _parquet_rows, "jsonl": _jsonl_rows, "csv": _csv_rows}[shard.format]
            for record, line, reject, detail in reader(fh, shard, cfg, builder.types):
                if wanted is not None and line not in wanted:
                    continue
                if (block := builder.add(record, line, reject, detail)) is not None:
                    if held is not None and held[0] not in skip:
                        yield held[1]
                    held = (builder.block - 1, block)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - a file we cannot read at all
        if cfg.on_bad_file == "error":
            raise _unreadable(shard, err) from None
        # Rows of blocks already handed on stay (they were read and are valid); the marker says
        # how far the file got, and the rows of the unfinished block are dropped with the file.
        if held is not None and held[0] not in skip:
            yield held[1]
        done = builder.block * cfg.rows_per_block
        builder.rows.clear()
        builder.add({}, -1, BAD_FILE, f"{_describe(err)}" + (f" (after {done} rows)" if done else ""))
        yield builder.flush()
        return
    if builder.rows or builder.block == 0:
        if held is not None and held[0] not in skip:
            yield held[1]
        held = (builder.block, builder.flush())
    if held is not None and held[0] not in skip:
        last = held[1]
        yield last.set_column(
            last.schema.get_field_index("_last"), "_last", pa.array([True] * last.num_rows, pa.bool_())
        )


def _parquet_rows(
    fh: Any, shard: Shard, cfg: InputConfig, types: dict[str, pa.DataType]
) -> Iterator[tuple[dict, int, None, None]]:
    pf = pq.ParquetFile(fh)
    _require_columns(shard, cfg, pf.schema_arrow.names)
    types.update({name: pf.schema_arrow.field(name).type for name in cfg.passthrough_columns})
    wanted = list(
        dict.fromkeys(
            [
                cfg.id_column,
                cfg.text_column,
                *([cfg.title_column] if cfg.title_column else []),
                *cfg.passthrough_columns,
            ]
        )
    )
    row = 0
    for batch in pf.iter_batches(batch_size=cfg.rows_per_block, columns=wanted):
        for record in batch.to_pylist():
            yield record, row, None, None
            row += 1


def _jsonl_rows(
    fh: Any, shard: Shard, cfg: InputConfig, types: dict[str, pa.DataType]
) -> Iterator[tuple[dict | None, int, str | None, str | None]]:
    for number, raw in enumerate(_capped_lines(fh, cfg.max_line_bytes), start=1):
        if raw is None:
            yield None, number, "line_too_long", f"more than input.max_line_bytes ({cfg.max_line_bytes}) bytes"
            continue
        if number == 1:
            raw = raw.removeprefix(BOM)  # files saved by Excel and some editors start with one
        if not raw.strip():
            continue  # blank lines are not records
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield None, number, "undecodable_bytes", f"not UTF-8: byte {raw[err.start]:#04x} at column {err.start + 1}"
            continue
        try:
            record = json.loads(text)
        except ValueError as err:
            yield None, number, "malformed_json", str(err)
            continue
        if not isinstance(record, dict):
            yield None, number, "malformed_json", f"a JSON {type(record).__name__}, not an object"
            continue
        yield record, number, None, None


def _capped_lines(fh: Any, limit: int, chunk: int = 1 << 20) -> Iterator[bytes | None]:
    """The file's lines (newline kept), each at most ``limit`` bytes before its newline; a longer
    line comes out as ``None``, and no more than ``limit + chunk`` bytes of it are ever held."""
    pending = bytearray()
    too_long = False  # the current line already ran past the limit (its start was dropped)
    while True:
        data = fh.read(chunk)
        pending += data
        start = 0
        while (cut := pending.find(b"\n", start)) >= 0:
            line = pending[start : cut + 1]
            yield None if too_long or len(line) - 1 > limit else bytes(line)
            too_long, start = False, cut + 1
        del pending[:start]
        if len(pending) > limit:
            too_long = True
            pending.clear()
        if not data:
            if too_long:
                yield None
            elif pending:
                yield bytes(pending)
            return


def _csv_rows(
    fh: Any, shard: Shard, cfg: InputConfig, types: dict[str, pa.DataType]
) -> Iterator[tuple[dict | None, int, str | None, str | None]]:
    # utf-8-sig: a byte-order mark (CSV from Excel) is not part of the first column's name.
    # surrogateescape keeps undecodable bytes visible per row instead of failing the whole file.
    lines = (
        TOO_LONG if line is None else line.removeprefix(BOM if number == 0 else b"").decode("utf-8", "surrogateescape")
        for number, line in enumerate(_capped_lines(fh, cfg.max_line_bytes))
    )
    csv.field_size_limit(max(cfg.max_line_bytes, csv.field_size_limit()))  # a field can be as long as a line
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        raise ValueError("empty CSV file (no header row)")
    _require_columns(shard, cfg, header)
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:  # the reader goes on with the next line
            yield None, reader.line_num, "malformed_csv_row", str(err)
            continue
        line = reader.line_num
        if fields == [TOO_LONG.strip()]:
            yield None, line, "line_too_long", f"more than input.max_line_bytes ({cfg.max_line_bytes}) bytes"
            continue
        if not fields:
            continue
        if len(fields) != len(header):
            yield None, line, "malformed_csv_row", f"{len(fields)} fields, header has {len(header)}"
            continue
        if any(_has_surrogates(f) for f in fields):
            yield None, line, "undecodable_bytes", "not UTF-8"
            continue
        yield dict(zip(header, fields)), line, None, None


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
