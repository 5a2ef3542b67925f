"""Reading a committed output's data files back, batch by batch (never a whole file in memory)."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import SettingError
from pipeline.output.location import OutputLocation


def batches(
    loc: OutputLocation, files: list[str], columns: list[str], *, batch_size: int = 4096, who: str = "export"
) -> Iterator[pa.Table]:
    """The ``columns`` of every row of ``files`` (relative to ``loc``), file by file, ``batch_size`` rows
    at a time; a file without one of them is an error naming the file and column (``who`` reads)."""
    for rel in files:
        with loc.open(rel) as handle:
            parquet = pq.ParquetFile(handle)
            missing = [c for c in columns if c not in parquet.schema_arrow.names]
            if missing:
                raise SettingError(f"{who}: {loc.url_of(rel)} has no column {missing[0]!r}")
            for batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
                yield pa.Table.from_batches([batch])
