"""What committing a table version costs at many files, against writing those files.

    python -m benchmarks.commit_bench --files 10000 [--s3]

Writes ``--files`` small Parquet files (one row each: the commit's cost depends on the number of
files, not their size) into a fresh folder (local disk, or moto's S3 server with ``--s3``), then
commits them as version 0 with :func:`pipeline.output.state.commit_state` (entries file, add
actions with statistics, the conditional commit), reads the latest snapshot back (what every
run's plan does), and commits a second version that replaces 1% of the files (a reindex). Prints
seconds and the ratio of each to writing the files, measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--s3", action="store_true", help="on moto's S3 server (in its own process)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    from pipeline.encode.fingerprint import Fingerprint
    from pipeline.output.layout import data_stats, delta_stats
    from pipeline.output.location import OutputLocation
    from pipeline.output.records import ENTRY_SCHEMA
    from pipeline.output.state import commit_state, read_committed
    from tests.support.tables import one_row_table

    server = None
    if args.s3:
        import s3fs

        from benchmarks.harness import start_s3

        server = start_s3()
        s3fs.S3FileSystem().mkdir("bench")
        url = "s3://bench/table"
    else:
        url = tempfile.mkdtemp(prefix="commit-bench-")
    loc = OutputLocation(url)
    fp = Fingerprint("m", None, "w" * 64, "t" * 64, 30522, 64, None, 0.0, "float32", "0").to_dict()
    record = {"kind": "encode", "fingerprint": fp, "fingerprint_id": Fingerprint.from_dict(fp).id}

    def write(names: list[str]) -> list[dict]:
        out = []
        for i, name in enumerate(names):
            table = one_row_table(f"d{i}")
            size = loc.write_parquet(name, table)
            out.append(
                {"unit": name, "block": 0, "block_rows": 1, "last": True, "rows": 1, "rejected": "{}"}
                | {"data_file": name, "data_size": size, "data_stats": delta_stats(table), **data_stats(table)}
            )
        return out

    start = time.perf_counter()
    entries = write([f"data/part-{i:016x}-000000-bench.parquet" for i in range(args.files)])
    t_write = time.perf_counter() - start
    schema = one_row_table("x").schema

    start = time.perf_counter()
    commit_state(loc, {}, None, pa.Table.from_pylist(entries, schema=ENTRY_SCHEMA), record, "bench-0", schema)
    t_commit = time.perf_counter() - start

    start = time.perf_counter()
    base = read_committed(loc, {})
    t_read = time.perf_counter() - start
    assert base is not None and len(base.snapshot.files) == args.files

    replaced = max(1, args.files // 100)
    fresh = write([f"data/part-{i:016x}-000000-bench2.parquet" for i in range(replaced)])
    start = time.perf_counter()
    state = pa.Table.from_pylist(entries[replaced:] + fresh, schema=ENTRY_SCHEMA)
    version = commit_state(loc, {}, base, state, record | {"kind": "reindex"}, "bench-1", schema)
    t_reindex = time.perf_counter() - start
    assert version == 1

    result = {
        "files": args.files,
        "where": "moto S3" if args.s3 else "local disk",
        "write_files_s": round(t_write, 2),
        "commit_s": round(t_commit, 2),
        "read_snapshot_s": round(t_read, 2),
        "reindex_commit_s": round(t_reindex, 2),
        "commit_vs_write": round(t_commit / t_write, 3),
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result))
    if server is not None:
        server.stop()


if __name__ == "__main__":
    main()
