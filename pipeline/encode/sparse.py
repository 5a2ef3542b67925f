"""The Arrow shape of a sparse vector: one place for the type every stage reads and writes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SPARSE_TYPE = pa.struct([pa.field("indices", pa.list_(pa.int32())), pa.field("values", pa.list_(pa.float32()))])


def sparse_array(offsets: np.ndarray, indices: np.ndarray, values: np.ndarray) -> pa.StructArray:
    """CSR arrays to ``struct<indices: list<int32>, values: list<float32>>``, one row per document."""
    arrow_offsets = pa.array(offsets, pa.int32())
    return pa.StructArray.from_arrays(
        [
            pa.ListArray.from_arrays(arrow_offsets, pa.array(indices, pa.int32())),
            pa.ListArray.from_arrays(arrow_offsets, pa.array(values, pa.float32())),
        ],
        fields=list(SPARSE_TYPE),
    )


def sparse_rows(vectors: pa.StructArray | pa.ChunkedArray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(indices, values)`` numpy pairs per row, for inspection and tests."""
    if isinstance(vectors, pa.ChunkedArray):
        vectors = vectors.combine_chunks()
    idx, val = vectors.flatten()  # flatten() honours a sliced struct's offset; field() does not
    return [
        (idx[i].values.to_numpy(zero_copy_only=False), val[i].values.to_numpy(zero_copy_only=False))
        for i in range(len(vectors))
    ]
