"""Pipeline overhead: the full Ray job (S3 via moto's server in, Parquet out) against the bare encoder.

Same 10,000 synthetic MS MARCO-length passages, same model (default: the bundled SPLADE-tiny;
``--model bert-base`` builds the bert-base-shaped random MLM of encoder_bench), both on this
machine. The job's rate is given end to end (planning, actor start-up and model load included)
and from the first encoder actor being ready to the last block written (what a long job runs
at). The bare encoder gets every core as torch threads; the job runs on a local Ray cluster
of the same cores, reading Parquet shards from S3 and writing to S3.

    python -m benchmarks.pipeline_bench [--n 10000] [--shards 10] [--json out.json]
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
    p.add_argument("--model", default="bundled:splade-tiny", help="a model for SpladeEncoder, or bert-base")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    cores = os.cpu_count() or 1

    server = start_s3()
    import s3fs

    texts = passages(args.n)
    fs = s3fs.S3FileSystem()
    fs.mkdir("bench-in")
    fs.mkdir("bench-out")
    put_shards(fs, "bench-in", [f"p{i}" for i in range(args.n)], texts, args.shards)

    import tempfile

    import torch

    from pipeline import SpladeEncoder, load_config, run_job
    from pipeline.job.cluster import start_local_ray

    if args.model == "bert-base":
        from encoder_bench import build_model

        args.model = str(build_model("bert-base", Path(tempfile.mkdtemp()) / "bert-base"))

    torch.set_num_threads(cores)
    encoder = SpladeEncoder(args.model, device="cpu")
    encoder.encode(texts[:64])  # warm
    start = time.perf_counter()
    for i in range(0, len(texts), 2048):  # the job's block size
        encoder.encode(texts[i : i + 2048])
    bare_s = time.perf_counter() - start

    start_local_ray(num_cpus=cores, object_store_memory=1 << 30, log_to_driver=False)  # as the job starts one
    results = {"bare_encoder_docs_per_s": args.n / bare_s}
    variants = {
        "1 actor, all cores as torch threads": {
            "compute.num_cpus_per_actor": cores - 0.5,
            "compute.torch_threads": cores,
        },
        f"{cores} actors, 1 thread each": {
            "compute.min_actors": cores,
            "compute.max_actors": cores,
            "compute.num_cpus_per_actor": 1 - 0.25 / cores,
            "compute.io_cpus": 0.1,
        },
    }
    for name, overrides in variants.items():
        cfg = load_config(
            None,
            {
                "input.paths": ["s3://bench-in/"],
                "output.path": f"s3://bench-out/{len(results)}",
                "encoder.model": args.model,
                **overrides,
            },
        )
        summary = run_job(cfg)
        assert summary["rows_written"] == args.n
        results[name] = summary["docs_per_s"]
        results[f"{name}: once encoders were up"] = summary["pace"]["docs_per_s_encoders_up"]
        results[f"{name}: start-up s"] = summary["pace"]["encoders_up_s"]
    server.stop()
    bare = results["bare_encoder_docs_per_s"]
    print(f"\n{args.n} passages, {args.model}, {cores} cores, torch {torch.__version__}")
    print(f"bare encoder ({cores} torch threads, model already loaded): {bare:.1f} docs/s")
    for name in variants:
        up = results[f"{name}: once encoders were up"] or 0.0
        print(
            f"Ray job, {name}: end to end {results[name]:.1f} docs/s = {results[name] / bare:.0%} of the bare encoder; "
            f"start-up (planning, actor processes, model load) {results[f'{name}: start-up s']:.1f} s, "
            f"then {up:.1f} docs/s = {up / bare:.0%}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
