"""Exports of a committed output for search engines: streamed file by file, batch by batch (never
the whole output in memory), written as sharded files under a local or fsspec location, with a
header file (``_EXPORT.json``) naming the table version, the fingerprint and the rules applied.

Formats (one JSON object per line):

- ``anserini``: Anserini/Pyserini's JsonVectorCollection, ``{"id", "contents", "vector": {token:
  int}}``, weights quantised as naver/splade's indexing does: ``round(w * quantize)``, terms that
  round to 0 dropped (an impact index takes positive integers).
- ``opensearch`` / ``elasticsearch``: bulk NDJSON, an action line ``{"index": {"_index", "_id"}}``
  then ``{field: {feature: weight}}`` for a ``rank_features`` (both) or ``sparse_vector``
  (Elasticsearch 8.11+) field. Both engines reject a feature name holding a dot ("[sparse_vector]
  fields do not support dots in feature names") and any weight that is not strictly positive, and
  keep 9 significant bits of each weight (relative error about 0.4%): dots are escaped (see
  :func:`feature_name`), zero weights never occur (the output holds none).
- ``jsonl``: ``{"id", "terms": {token: weight}}``, weights as float32 values, for anything else.

Tokens are the model's own vocabulary strings (its tokenizer), so a query encoded with the same
model (and, for the search engines, the same escape) meets them.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.encode.sparse import sparse_rows
from pipeline.errors import SettingError
from pipeline.output.location import OutputLocation
from pipeline.output.reading import batches

FORMATS = ("anserini", "opensearch", "elasticsearch", "jsonl")
HEADER = "_EXPORT.json"
PROGRESS_EVERY_S = 10.0


def feature_name(token: str) -> str:
    """A vocabulary token as a search engine's feature name: ``%`` becomes ``%25`` and ``.`` becomes
    ``%2E`` (percent-encoding, reversible: :func:`token_of`). Every other character is kept."""
    return token.replace("%", "%25").replace(".", "%2E")


def token_of(feature: str) -> str:
    """The vocabulary token of an escaped feature name (the inverse of :func:`feature_name`)."""
    return feature.replace("%2E", ".").replace("%25", "%")


@dataclass(frozen=True)
class ExportSettings:
    """What ``splade-pipeline export`` writes (its command-line flags)."""

    format: str
    to: str
    quantize: int = 100  # anserini: weights times this, rounded to integers
    index: str = "splade"  # opensearch / elasticsearch: the index named in each action line
    field: str = "splade"  # opensearch / elasticsearch: the rank_features / sparse_vector field
    contents_column: str | None = None  # anserini: a passthrough column for "contents" (default: empty)
    shard_docs: int = 100_000  # documents per file

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise SettingError(f"export --format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.quantize < 1:
            raise SettingError(f"export --quantize: {self.quantize} must be a positive integer")
        if self.shard_docs < 1:
            raise SettingError(f"export --shard-docs: {self.shard_docs} must be at least 1")
        if not self.field or "." in self.field:
            raise SettingError(f"export --field: {self.field!r} must be a non-empty name without dots")


@functools.lru_cache(maxsize=4)
def vocabulary(model: str) -> list[str]:
    """The model's vocabulary, id -> token string, from its tokenizer (no weights loaded; kept for
    the process's next export of the same model)."""
    from transformers import AutoTokenizer

    from pipeline.encode.bundled import model_errors_named, resolve_model

    with model_errors_named(model):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    size = len(tokenizer)
    return [str(t) for t in tokenizer.convert_ids_to_tokens(list(range(size)))]


def lines(settings: ExportSettings, batch: pa.Table, vocab: list[str]) -> Iterator[str]:
    """The export's lines for one batch of output rows (``id``, ``sparse``, and the contents column)."""
    ids = batch["id"].to_pylist()
    contents = batch[settings.contents_column].to_pylist() if settings.contents_column else None
    dumps = json.dumps
    for row, (indices, values) in enumerate(sparse_rows(batch["sparse"])):
        doc_id = ids[row]
        if settings.format == "anserini":
            weights = np.rint(values.astype(np.float64) * settings.quantize).astype(np.int64)
            keep = weights > 0
            vector = dict(zip([vocab[i] for i in indices[keep]], weights[keep].tolist(), strict=True))
            text = "" if contents is None or contents[row] is None else str(contents[row])
            yield dumps({"id": doc_id, "contents": text, "vector": vector}, ensure_ascii=False)
        elif settings.format == "jsonl":
            terms = dict(zip([vocab[i] for i in indices], values.tolist(), strict=True))
            yield dumps({"id": doc_id, "terms": terms}, ensure_ascii=False)
        else:
            features = dict(zip([feature_name(vocab[i]) for i in indices], values.tolist(), strict=True))
            yield dumps({"index": {"_index": settings.index, "_id": doc_id}}, ensure_ascii=False)
            yield dumps({settings.field: features}, ensure_ascii=False)


class ShardedWriter:
    """Lines into ``part-00000.jsonl``, ``part-00001.jsonl``... under ``to``, ``per_shard``
    documents each (``lines_per_doc`` lines a document)."""

    def __init__(self, to: OutputLocation, per_shard: int, lines_per_doc: int) -> None:
        self.to, self.per_shard, self.lines_per_doc = to, per_shard, lines_per_doc
        self.files: list[str] = []
        self.docs = self.in_shard = 0
        self.bytes = 0
        self.handle: Any = None

    def write(self, line: str) -> None:
        if self.handle is None:
            name = f"part-{len(self.files):05d}.jsonl"
            self.files.append(name)
            self.handle = self.to.open(name, "wb")
        data = (line + "\n").encode()
        self.handle.write(data)
        self.bytes += len(data)

    def document_done(self) -> None:
        self.docs += 1
        self.in_shard += 1
        if self.in_shard >= self.per_shard:
            self.close()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle, self.in_shard = None, 0


def export_output(
    source: OutputLocation,
    settings: ExportSettings,
    *,
    table_options: dict[str, str] | None = None,
    storage_options: dict[str, Any] | None = None,
    model: str | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export the latest version of the output at ``source`` (see the module docstring); returns
    the export's header (also written as ``_EXPORT.json`` beside the files)."""
    from pipeline.job.load import committed_output

    committed, fingerprint = committed_output(source, table_options or {})
    vocab = vocabulary(model or fingerprint.model)
    if len(vocab) != fingerprint.vocab_size:
        raise SettingError(
            f"export: the tokenizer of {model or fingerprint.model!r} has {len(vocab)} tokens, the output's vectors "
            f"{fingerprint.vocab_size} dimensions; give the model the output was encoded with (--vocab-model)"
        )
    to = _empty_target(settings.to, storage_options)
    rows = "windows" if "parent_id" in committed.snapshot.schema.names else "written"  # split: a row per window
    total = int(pc.sum(committed.entries[rows]).as_py() or 0) if committed.entries is not None else None
    writer = ShardedWriter(to, settings.shard_docs, 1 if settings.format in ("anserini", "jsonl") else 2)
    started = time.monotonic()
    try:
        nonzeros = _stream(source, sorted(committed.snapshot.files), settings, vocab, writer, total, say)
    finally:
        writer.close()
    seconds = time.monotonic() - started
    header = {
        "format": settings.format,
        "source": source.url,
        "table_version": committed.version,
        "documents": writer.docs,
        "nonzeros": nonzeros,
        "files": writer.files,
        "bytes": writer.bytes,
        "seconds": round(seconds, 3),
        "docs_per_s": round(writer.docs / seconds, 1) if seconds > 0 else None,
        "settings": {k: v for k, v in asdict(settings).items() if k != "to"},
        "feature_names": (
            "vocabulary tokens, '%' as '%25' and '.' as '%2E' (these engines refuse dots in feature names)"
            if settings.format in ("opensearch", "elasticsearch")
            else "vocabulary tokens as they are"
        ),
        "fingerprint": fingerprint.to_dict(),
    }
    to.overwrite(HEADER, json.dumps(header, indent=2).encode())
    return header


def _empty_target(url: str, storage_options: dict[str, Any] | None) -> OutputLocation:
    to = OutputLocation(url, storage_options)
    to.ensure_folder()
    stale = [f for f in to.files() if f.startswith("part-") or f == HEADER]
    if stale:
        raise SettingError(
            f"export --to {url}: holds an earlier export ({len(stale)} files, e.g. {stale[0]}); use an empty location"
        )
    return to


def _stream(
    source: OutputLocation,
    files: list[str],
    settings: ExportSettings,
    vocab: list[str],
    writer: ShardedWriter,
    total: int | None,
    say: Callable[[str], None],
) -> int:
    """Write the lines of every row of ``files`` (batch by batch); returns the terms written."""
    columns = ["id", "sparse", *([settings.contents_column] if settings.contents_column else [])]
    started = last = time.monotonic()
    nonzeros = 0
    for table in batches(source, files, columns):
        for i, line in enumerate(lines(settings, table, vocab)):
            writer.write(line)
            if (i + 1) % writer.lines_per_doc == 0:
                writer.document_done()
        sparse = table["sparse"].combine_chunks()
        nonzeros += int(pc.sum(pc.list_value_length(sparse.field("indices"))).as_py() or 0)
        if time.monotonic() - last >= PROGRESS_EVERY_S:
            last = time.monotonic()
            of = f" of {total}" if total else ""
            say(f"  ... {writer.docs}{of} documents exported ({writer.docs / (last - started):.0f}/s)")
    return nonzeros
