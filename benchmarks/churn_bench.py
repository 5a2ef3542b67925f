"""Node churn: the encoding job on a simulated 3-node Ray cluster (a head and two worker nodes,
separate raylets with their own object stores, ``ray.cluster_utils.Cluster``), with a worker node
killed (SIGKILL, as a spot reclaim) and a new one added every ``--every`` seconds, against the
same job on the same cluster without churn. Short passages (8..24 words) on S3 (moto's server),
the bundled SPLADE-tiny, one encoder per worker node (a custom resource only workers have).

Each run is checked: every document exactly once in the committed table, rows reconciled. Runs
alternate (still, churn, still, churn, ...); the medians are compared.

    python -m benchmarks.churn_bench [--n 100000] [--every 30] [--reps 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.corpus import passages
from benchmarks.harness import put_shards, start_s3

ROOT = Path(__file__).resolve().parents[1]
NODE = {"num_cpus": 1, "object_store_memory": 200 * 2**20}


def run(output: str, n: int, every: float | None, model: str, timeout: float) -> dict[str, Any]:
    """One job on a fresh simulated cluster; its wall time, docs/s, and what it rode through."""
    job = ["encode", "--input", "s3://bench-in/", "--output", output, "--model", model, "--max-length", "64"]
    job += ["--rows-per-block", "1000", "--min-actors", "2", "--max-actors", "2", "--num-cpus-per-actor", "0.5"]
    job += ["--io-cpus", "0.1", "--encoder-resources", '{"encoder": 1}']
    actions = [{"when": {"every": every}, "do": "churn"}] if every else []
    spec = {
        "head": NODE,
        "worker": {**NODE, "resources": {"encoder": 1}},
        "workers": 2,
        "phases": [{"job": job, "output": output, "actions": actions, "timeout": timeout}],
    }
    from tests.support.node_churn import run_spec

    result = run_spec(spec, timeout + 120)
    phase = result["phases"][0]
    if phase["exit"] != 0:
        raise RuntimeError(f"the job failed (exit {phase['exit']}): {phase['output'][-3000:]}")
    summary = _check_once(output, n)
    churned = sum(1 for _, what in result["log"] if "worker removed" in what)
    return {
        "seconds": phase["seconds"],
        "docs_per_s": round(n / phase["seconds"], 1),
        "nodes_removed": churned,
        "faults": summary["faults"],
    }


def _check_once(output: str, n: int) -> dict[str, Any]:
    import s3fs

    from tests.support.jobs import read_delta

    ids = read_delta(output, columns=["id"])["id"].to_pylist()
    if len(ids) != n or len(set(ids)) != n:
        raise AssertionError(f"{output}: {len(ids)} rows, {len(set(ids))} distinct ids, {n} documents")
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    summary = json.loads(fs.cat(f"{output.removeprefix('s3://')}/_SUMMARY.json"))
    if summary["rows_read"] != summary["rows_written"] + summary["rows_rejected"]:
        raise AssertionError(f"{output}: rows do not reconcile")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--shards", type=int, default=20)
    p.add_argument("--every", type=float, default=30.0, help="seconds between churns (a worker out, another in)")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    server = start_s3()
    import s3fs

    from pipeline.encode.bundled import fetch_splade_tiny

    model = str(fetch_splade_tiny())
    fs = s3fs.S3FileSystem()
    fs.mkdir("bench-in")
    fs.mkdir("bench-out")
    texts = passages(args.n, "short")
    put_shards(fs, "bench-in", [f"p{i}" for i in range(args.n)], texts, args.shards)
    runs: dict[str, list[dict[str, Any]]] = {"still": [], "churn": []}
    try:
        for rep in range(args.reps):
            for mode in ("still", "churn"):
                started = time.perf_counter()
                out = run(
                    f"s3://bench-out/{mode}-{rep}", args.n, args.every if mode == "churn" else None, model, args.timeout
                )
                runs[mode].append(out)
                print(
                    f"{mode} #{rep + 1}: {out['docs_per_s']} docs/s, {out['seconds']} s, "
                    f"{out['nodes_removed']} nodes removed; faults {out['faults']} "
                    f"({time.perf_counter() - started:.0f} s with the cluster)",
                    flush=True,
                )
    finally:
        server.stop()
    still = statistics.median(r["docs_per_s"] for r in runs["still"])
    churn = statistics.median(r["docs_per_s"] for r in runs["churn"])
    report = {
        "n": args.n,
        "every_s": args.every,
        "runs": runs,
        "median_docs_per_s": {"still": still, "churn": churn},
        "churn_vs_still": round(churn / still, 3),
    }
    print(
        f"median docs/s: still {still}, churn {churn} ({report['churn_vs_still']:.0%} of still); every document "
        "exactly once in every run",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
