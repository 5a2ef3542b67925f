"""The Spark runner against the Ray job: the same corpus (S3 on moto's server), the same model,
the same machine, in one process; the median of ``--reps`` runs of each.

Ray runs one encoder actor per core (1 torch thread each, as ``pipeline_bench``'s fastest
variant); Spark runs ``local[<cores>]`` (one task per core, 1 torch thread each). Both rates are
end to end (planning, encoding, writing, the commit). Spark reuses its Python workers between
runs, so from the second run on its encoders are already loaded, while each Ray run starts its
actors: the Ray rate once its encoders were up is printed beside it for that reason.

    python -m benchmarks.spark_bench [--n 2000] [--shards 4] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from benchmarks.corpus import passages
from benchmarks.harness import put_shards, start_s3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--model", default="bundled:splade-tiny")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    server = start_s3()
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("bench-in")
    fs.mkdir("bench-out")
    put_shards(fs, "bench-in", [f"p{i}" for i in range(args.n)], passages(args.n), args.shards)

    from pyspark.sql import SparkSession

    from pipeline import load_config, run_job
    from pipeline.job.cluster import start_local_ray
    from pipeline.spark import run_spark_job

    os.environ["PYSPARK_PYTHON"] = sys.executable
    spark = SparkSession.builder.master(f"local[{cores}]").config("spark.ui.enabled", "false").getOrCreate()
    start_local_ray(num_cpus=cores, object_store_memory=1 << 30, log_to_driver=False)
    ray_compute = {
        "compute.min_actors": cores,
        "compute.max_actors": cores,
        "compute.num_cpus_per_actor": 1 - 0.25 / cores,
        "compute.io_cpus": 0.1,
    }
    rates: dict[str, list[float]] = {"ray": [], "ray once encoders were up": [], "spark": []}
    for rep in range(args.reps):
        for engine in ("ray", "spark"):
            overrides = {"input.paths": ["s3://bench-in/"], "output.path": f"s3://bench-out/{engine}-{rep}"}
            config = load_config(None, {**overrides, "encoder.model": args.model, **ray_compute})
            summary = run_job(config) if engine == "ray" else run_spark_job(config, spark)
            assert summary["rows_written"] == args.n
            rates[engine].append(summary["docs_per_s"])
            if engine == "ray":
                rates["ray once encoders were up"].append(summary["pace"]["docs_per_s_encoders_up"] or 0.0)
    spark.stop()
    server.stop()
    medians = {k: statistics.median(v) for k, v in rates.items()}
    print(
        f"\n{args.n} passages in {args.shards} shards on S3 (moto), {args.model}, {cores} cores, {args.reps} runs each"
    )
    for name, values in rates.items():
        print(f"  {name}: median {medians[name]:.1f} docs/s (runs: {', '.join(f'{v:.1f}' for v in values)})")
    print(f"  spark / ray, end to end: {medians['spark'] / medians['ray']:.2f}x")
    print(f"  spark / ray once its encoders were up: {medians['spark'] / medians['ray once encoders were up']:.2f}x")


if __name__ == "__main__":
    main()
