"""Incremental reindex against the full run: 10,000 passages in 10 Parquet shards on S3 (moto's
server), the bundled SPLADE-tiny, a local Ray cluster of this machine's cores.

1. full run: `reindex` on an empty output (every document encoded; the same plan as `encode`);
2. 1% of the documents changed (their texts edited, spread over every shard), then `reindex`;
3. `reindex` again with nothing changed.
Each is timed end to end (planning, Ray work, commit); the ratios are against the full run.

    python -m benchmarks.reindex_bench [--n 10000] [--shards 10] [--changed 0.01] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.corpus import passages
from benchmarks.harness import put_shards, start_s3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--shards", type=int, default=10)
    p.add_argument("--changed", type=float, default=0.01, help="fraction of documents whose text changes")
    p.add_argument("--model", default="bundled:splade-tiny")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    server = start_s3()
    import s3fs

    from pipeline import load_config, run_reindex
    from pipeline.job.cluster import start_local_ray

    fs = s3fs.S3FileSystem()
    fs.mkdir("reindex-bench")
    ids, texts = [f"p{i}" for i in range(args.n)], passages(args.n)
    put_shards(fs, "reindex-bench/corpus", ids, texts, args.shards)
    start_local_ray(num_cpus=cores, object_store_memory=1 << 30, log_to_driver=False)  # as the job starts one
    config = load_config(
        None,
        {
            "input.paths": ["s3://reindex-bench/corpus/"],
            "output.path": "s3://reindex-bench/out",
            "encoder.model": args.model,
            "compute.min_actors": cores,
            "compute.max_actors": cores,
            "compute.num_cpus_per_actor": 1 - 0.25 / cores,
            "compute.io_cpus": 0.1,
        },
    )

    def timed(label: str) -> dict:
        start = time.perf_counter()
        summary = run_reindex(config)
        seconds = time.perf_counter() - start
        return {
            "run": label,
            "seconds": round(seconds, 2),
            "encoded": summary["reindex"]["encoded_now"],
            **{k: summary["reindex"][k] for k in ("new", "changed", "unchanged", "deleted", "rewritten_files")},
        }

    runs = [timed("full run (empty output)")]
    step = max(1, round(1 / args.changed))
    for i in range(0, args.n, step):
        texts[i] = texts[i] + " (revised)"
    fs.invalidate_cache()
    put_shards(fs, "reindex-bench/corpus", ids, texts, args.shards)
    fs.invalidate_cache()
    runs.append(timed(f"reindex, {args.changed:.0%} changed"))
    runs.append(timed("reindex, nothing changed"))
    server.stop()

    full = runs[0]["seconds"]
    print(
        f"\n{args.n} passages in {args.shards} shards, {args.model}, {cores} cores ({cores} actors x 1 thread), S3 via "
        "moto"
    )
    print(
        f"{'run':<28} {'seconds':>8} {'vs full':>8} {'encoded':>8} {'new':>5} {'changed':>8} {'unchanged':>10} "
        f"{'rewritten files':>16}"
    )
    for r in runs:
        print(
            f"{r['run']:<28} {r['seconds']:>8.1f} {r['seconds'] / full:>8.1%} {r['encoded']:>8} {r['new']:>5} "
            f"{r['changed']:>8} "
            f"{r['unchanged']:>10} {r['rewritten_files']:>16}"
        )
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
