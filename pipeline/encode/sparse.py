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


def sparse_csr(vectors: pa.StructArray | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR arrays of ``vectors``: ``(offsets int64[n+1], indices int32, values float32)``, vectorised
    (the inverse of :func:`sparse_array`)."""
    if isinstance(vectors, pa.ChunkedArray):
        vectors = vectors.combine_chunks()
    idx, val = vectors.flatten()  # each list's own offsets (a sliced array's are not zero-based)
    offsets = idx.offsets.to_numpy().astype(np.int64)
    value_offsets = val.offsets.to_numpy().astype(np.int64)
    indices = idx.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    values = val.values.to_numpy(zero_copy_only=False)[value_offsets[0] : value_offsets[-1]]
    return offsets - offsets[0], indices, values
