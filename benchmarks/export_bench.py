"""Export throughput per format, against the least any JSON-lines export of the same table costs.

    python -m benchmarks.export_bench --docs 200000 --reps 3

Commits a synthetic output (``--docs`` documents in files of 20,000, ~120 random terms each with
SPLADE-like weights, the bundled model's fingerprint so token strings come from its vocabulary)
on local disk, then exports it in each format with :func:`pipeline.export.export_output` and
times a baseline in the same process on the same files: read each file's batches and write
``json.dumps([id, indices, values])`` per document (no token strings, no quantisation, no
escaping). Prints docs/s per format (median of ``--reps``) and its ratio to the baseline's. The
tokenizer is loaded once before timing: its load is a fixed cost per export, not throughput.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def synthetic_output(folder: Path, docs: int, per_file: int = 20_000, seed: int = 0) -> None:
    from pipeline.encode.bundled import SPLADE_TINY
    from pipeline.encode.fingerprint import Fingerprint
    from pipeline.encode.sparse import sparse_array
    from tests.support.tables import commit_files

    rng = np.random.default_rng(seed)
    files = {}
    for start in range(0, docs, per_file):
        n = min(per_file, docs - start)
        counts = rng.integers(60, 180, n)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        indices = np.concatenate([np.sort(rng.choice(30522, c, replace=False)) for c in counts])
        values = rng.lognormal(-0.5, 0.7, int(offsets[-1])).astype(np.float32)
        table = pa.table(
            {
                "id": pa.array([f"doc-{i:09d}" for i in range(start, start + n)]),
                "content_hash": pa.array(rng.integers(0, 2**62, n), pa.int64()),
                "sparse": sparse_array(offsets, indices, values),
                "num_tokens": pa.array(rng.integers(20, 256, n), pa.int32()),
                "truncated": pa.array(np.zeros(n, bool)),
            }
        )
        name = f"data/part-{start:012d}.parquet"
        (folder / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / name, compression="zstd")
        files[name] = table
    fingerprint = Fingerprint(SPLADE_TINY, None, "w" * 64, "t" * 64, 30522, 256, None, 0.0, "float32", "0").to_dict()
    commit_files(folder, files, fingerprint)


def baseline(folder: Path, to: Path) -> int:
    from pipeline.encode.sparse import sparse_rows

    docs = 0
    to.mkdir(parents=True)
    with open(to / "all.jsonl", "w") as out:
        for path in sorted((folder / "data").glob("*.parquet")):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=["id", "sparse"]):
                table = pa.Table.from_batches([batch])
                ids = table["id"].to_pylist()
                for doc, (idx, val) in zip(ids, sparse_rows(table["sparse"]), strict=True):
                    out.write(json.dumps([doc, idx.tolist(), val.tolist()]) + "\n")
                    docs += 1
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    from pipeline.encode.bundled import SPLADE_TINY
    from pipeline.export import FORMATS, ExportSettings, export_output, vocabulary
    from pipeline.output.location import OutputLocation

    work = Path(tempfile.mkdtemp(prefix="export-bench-"))
    try:
        synthetic_output(work / "out", args.docs)
        source = OutputLocation(str(work / "out"))
        vocabulary(SPLADE_TINY)  # the tokenizer's load (seconds, once per export) is not the throughput measured
        rates: dict[str, list[float]] = {"baseline": [], **{f: [] for f in FORMATS}}
        for rep in range(args.reps):
            start = time.perf_counter()
            assert baseline(work / "out", work / f"base-{rep}") == args.docs
            rates["baseline"].append(args.docs / (time.perf_counter() - start))
            for fmt in FORMATS:
                to = work / f"{fmt}-{rep}"
                start = time.perf_counter()
                header = export_output(source, ExportSettings(fmt, str(to)), say=lambda _: None)
                assert header["documents"] == args.docs
                rates[fmt].append(args.docs / (time.perf_counter() - start))
            for path in work.glob(f"*-{rep}"):
                shutil.rmtree(path)
        base = statistics.median(rates["baseline"])
        result = {
            "docs": args.docs,
            "reps": args.reps,
            "docs_per_s": {k: round(statistics.median(v), 1) for k, v in rates.items()},
            "vs_baseline": {k: round(statistics.median(v) / base, 3) for k, v in rates.items() if k != "baseline"},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
