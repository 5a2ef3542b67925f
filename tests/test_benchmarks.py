"""Every benchmark runs end to end at a tiny size (seconds), so none of them rots unnoticed.

These are smoke runs: they check that each script works and reports what it should, never a
timing. The numbers in the README come from the full-size runs named there. The three that run
whole jobs on clusters of their own (minutes each on 2 cores) are marked ``slow``: `.ci/run`
leaves them out, ``python -m pytest -m slow`` runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.cluster  # each benchmark starts its own Ray (and S3)


def bench(tmp_path: Path, script: str, *args: str) -> dict | list:
    out = tmp_path / f"{Path(script).stem}.json"
    # A benchmark starts its own local Ray (and S3) so that it measures one machine: not the tests' cluster.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "AWS_ENDPOINT_URL")} | {
        "HF_HUB_OFFLINE": "1"
    }
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{Path(script).stem}", *args, "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.usefixtures("splade_tiny")
def test_encoder_bench(tmp_path: Path) -> None:
    result = bench(
        tmp_path, "encoder_bench.py", "--model", "splade-tiny", "--n", "8", "--reps", "1", "--st-batch-sizes", "4"
    )
    methods = result["results"]
    assert (
        len(methods) >= 3
        and any(m.startswith("ours") for m in methods)
        and any(m.startswith("sentence-transformers") for m in methods)
    )
    assert all(
        r["max_abs_diff"] <= 1e-5 and r["docs_per_s"] > 0 for r in methods.values()
    )  # same vectors before timing counts
    assert result["matmul_rate"] > 0


def test_pooling_memory(tmp_path: Path) -> None:
    result = bench(tmp_path, "pooling_memory.py", "--batch", "2", "--seq", "64")
    assert max(result["max_abs_diff"].values()) <= 1e-5 and result["naive"]["peak_extra_bytes"] > 0
    assert set(result) >= {"naive", "chunked", "packed"}


@pytest.mark.slow
@pytest.mark.usefixtures("splade_tiny")
def test_pipeline_bench(tmp_path: Path) -> None:
    result = bench(tmp_path, "pipeline_bench.py", "--n", "200", "--shards", "2")
    assert result["bare_encoder_docs_per_s"] > 0 and len(result) == 7
    assert all(v and v > 0 for k, v in result.items() if k.endswith("start-up s") or k.endswith("encoders were up"))


@pytest.mark.slow
@pytest.mark.usefixtures("splade_tiny")
def test_reindex_bench(tmp_path: Path) -> None:
    runs = bench(tmp_path, "reindex_bench.py", "--n", "200", "--shards", "2", "--changed", "0.05")
    assert [r["encoded"] for r in runs] == [200, 10, 0]


def test_commit_bench(tmp_path: Path) -> None:
    result = bench(tmp_path, "commit_bench.py", "--files", "40", "--s3")
    assert result["files"] == 40 and result["where"] == "moto S3"
    assert result["commit_s"] > 0 and result["reindex_commit_s"] > 0 and result["read_snapshot_s"] > 0


def test_sink_bench(tmp_path: Path) -> None:
    result = bench(tmp_path, "sink_bench.py", "--n", "300")
    assert len(result) == 4 and all(rate > 0 for rate in result.values())


@pytest.mark.slow
@pytest.mark.usefixtures("splade_tiny")
@pytest.mark.timeout(600)  # two runs, each on a fresh 3-raylet cluster: over 3 minutes on a slow 2-core VM
def test_churn_bench(tmp_path: Path) -> None:
    # A worker lost every 20 s: on 2 shared cores a replacement's encoder needs about 10 s to start,
    # so churning faster than that leaves no encoder up at all (the soak churns every 30 s).
    result = bench(tmp_path, "churn_bench.py", "--n", "400", "--shards", "4", "--every", "20")
    assert len(result["runs"]["still"]) == len(result["runs"]["churn"]) == 1  # each checked exactly-once inside
    assert result["median_docs_per_s"]["still"] > 0 and result["median_docs_per_s"]["churn"] > 0
    assert result["runs"]["still"][0]["nodes_removed"] == 0


@pytest.mark.usefixtures("splade_tiny")
def test_export_bench(tmp_path: Path) -> None:
    result = bench(tmp_path, "export_bench.py", "--docs", "300", "--reps", "1")
    assert set(result["vs_baseline"]) == {"anserini", "opensearch", "elasticsearch", "jsonl"}
    assert all(rate > 0 for rate in result["docs_per_s"].values())
