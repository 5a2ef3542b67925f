"""``encode_dataframe``: a Spark DataFrame of documents in, their SPLADE vectors out (notebooks).

Rows are validated by the job's own rules (:func:`pipeline.sources.map_record`: missing or
invalid ids, null, non-string or empty text, documents over ``input.max_document_bytes``) and
never dropped: a bad row comes out with ``sparse`` null and its ``reject`` reason and ``detail``.
One encoder per Spark Python worker (and GPU), kept across batches and tasks.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import ValidationError

from pipeline.config import EncoderConfig, InputConfig, JobConfig
from pipeline.encode.sparse import SPARSE_TYPE
from pipeline.errors import SettingError
from pipeline.job.faults import forwarded, out_of_memory_point
from pipeline.sources import content_hash, map_record

_ENCODERS: dict[tuple[str, int | None], Any] = {}


def encode_dataframe(df: Any, config: JobConfig | EncoderConfig | None = None, **input_settings: Any) -> Any:
    """``df`` with its documents encoded: columns ``id``, ``content_hash``, ``sparse``
    (``struct<indices: array<int>, values: array<float>>``), ``num_tokens``, ``truncated``, the
    passthrough columns, ``reject`` and ``detail`` (null for an encoded row).

    ``config``: a job config (its ``encoder`` and ``input`` sections) or an encoder config
    (default: the bundled SPLADE-tiny); ``input_settings`` override the input section
    (``id_column``, ``text_column``, ``title_column``, ``passthrough_columns``, ...)::

        vectors = encode_dataframe(spark.read.parquet("s3a://corpus/"), load_config("job.yaml"))
    """
    from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_type

    if isinstance(config, JobConfig):
        encoder, base = config.encoder, config.input.model_dump()
    else:
        encoder, base = config or EncoderConfig(model="bundled:splade-tiny"), {}
    try:
        cfg = InputConfig.model_validate(base | input_settings)  # validated: a misspelt setting is an error
    except ValidationError as err:
        raise SettingError(f"encode_dataframe: {err}") from None
    taken = [c for c in cfg.passthrough_columns if c in ("reject", "detail")]
    if taken:
        raise SettingError(f"encode_dataframe: passthrough column {taken[0]!r} is a column it writes itself")
    if encoder.long_documents == "split":
        raise SettingError(
            "encode_dataframe gives one row per input row: encoder.long_documents 'split' (a row per window) is "
            "for run_spark_job; use 'max' or 'truncate' here"
        )
    names = [
        cfg.id_column,
        cfg.text_column,
        *([cfg.title_column] if cfg.title_column else []),
        *cfg.passthrough_columns,
    ]
    missing = [n for n in names if n not in df.columns]
    if missing:
        raise SettingError(f"encode_dataframe: the DataFrame has no column {missing[0]!r}; it has {df.columns}")
    types = {f.name: f.dataType for f in df.schema.fields}
    passthrough = [(name, to_arrow_type(types[name])) for name in cfg.passthrough_columns]
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("content_hash", pa.int64()),
            ("sparse", SPARSE_TYPE),
            ("num_tokens", pa.int32()),
            ("truncated", pa.bool_()),
            *passthrough,
            ("reject", pa.string()),
            ("detail", pa.string()),
        ]
    )
    run = partial(encode_batches, encoder=encoder, cfg=cfg, schema=schema, faults=forwarded())
    return df.select(*names).mapInArrow(run, from_arrow_schema(schema))


def encode_batches(
    batches: Iterator[pa.RecordBatch],
    encoder: EncoderConfig,
    cfg: InputConfig,
    schema: pa.Schema,
    faults: dict[str, str] | None = None,
) -> Iterator[pa.RecordBatch]:
    """``mapInArrow``: each batch of documents validated and encoded (see :func:`encode_dataframe`)."""
    from pipeline.spark.tasks import set_faults

    set_faults(faults or {})
    model = _encoder(encoder)
    for batch in batches:
        columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        texts: list[str] = []
        where: list[int | None] = []  # per row: its position among the encoded texts, None for a reject
        for record in batch.to_pylist():
            row: dict[str, Any] = {"id": None, "text": None}
            reason, detail = map_record(record, cfg, row)
            passthrough = [row.get(c) for c in cfg.passthrough_columns]
            where.append(None if reason else len(texts))
            if reason is None:
                texts.append(row["text"])
            values = {"id": row["id"], "reject": reason, "detail": detail}
            values["content_hash"] = None if reason else content_hash(row["text"], passthrough)
            for name, value in (values | dict(zip(cfg.passthrough_columns, passthrough, strict=True))).items():
                columns[name].append(value)
        arrays = _encoded(model, texts, where, columns)
        yield pa.RecordBatch.from_arrays(
            [arrays[f.name].cast(f.type) if f.name in arrays else pa.array(columns[f.name], f.type) for f in schema],
            schema=schema,
        )


def _encoded(model: Any, texts: list[str], where: list[int | None], columns: dict[str, list[Any]]) -> dict[str, Any]:
    """``sparse``, ``num_tokens`` and ``truncated`` of each row (``where``: its position in ``texts``,
    None for a rejected row); a document the encoder fails on, alone, or whose weights are not
    finite, gets its ``reject`` and ``detail`` in ``columns`` and nulls, the others their vectors."""
    from pipeline.job.stages import encode_or_isolate, non_finite_counts

    pieces: list[tuple[np.ndarray, Any]] = []
    failed: dict[int, tuple[str, str]] = {}
    encode_or_isolate(model, texts, np.arange(len(texts)), failed, lambda batch, rows: pieces.append((rows, batch)))
    if len(texts) > 1 and len(failed) == len(texts) and all(f[0] == "encoder_error" for f in failed.values()):
        # every document failing alone is the encoder's problem (a broken device), not the data's: the
        # task fails, and Spark retries it elsewhere
        raise RuntimeError(f"every document of the batch failed to encode, e.g.: {next(iter(failed.values()))[1]}")
    at: dict[int, int] = {}  # a text's position in the concatenated pieces
    for rows, batch in pieces:
        infinite, nan = non_finite_counts(batch.sparse)
        for k, i in enumerate(rows.tolist()):
            if infinite[k] + nan[k]:
                failed[i] = ("non_finite_weights", f"{infinite[k]} infinite and {nan[k]} NaN weights")
            at[i] = len(at)
    for row, i in enumerate(where):
        if i is not None and i in failed:
            columns["reject"][row], columns["detail"][row] = failed[i]
            columns["content_hash"][row] = None
    taken = pa.array([None if i is None or i in failed else at[i] for i in where], pa.int64())
    batches = [b for _, b in pieces]
    return {
        "sparse": pa.concat_arrays([pa.array([], SPARSE_TYPE)] + [b.sparse for b in batches]).take(taken),
        "num_tokens": pa.array(
            np.concatenate([np.zeros(0, np.int64), *(b.num_tokens for b in batches)]), pa.int32()
        ).take(taken),
        "truncated": pa.array(np.concatenate([np.zeros(0, bool), *(b.truncated for b in batches)]).astype(bool)).take(
            taken
        ),
    }


def _encoder(config: EncoderConfig) -> Any:
    """This worker's encoder for ``config`` on the task's device (loaded on first use, then kept)."""
    import torch

    from pipeline.encode.encoder import SpladeEncoder
    from pipeline.spark.tasks import on_task_device, task_threads

    encoder_cfg, gpu = on_task_device(config)
    key = (encoder_cfg.model_dump_json(), gpu)
    if key not in _ENCODERS:
        _ENCODERS.clear()
        torch.set_num_threads(task_threads())
        encoder = SpladeEncoder.from_config(encoder_cfg)
        encoder.before_forward = out_of_memory_point  # test-only fault injection; a no-op unless configured
        _ENCODERS[key] = encoder
    return _ENCODERS[key]
