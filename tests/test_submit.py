"""`ray job submit` path: jobs/encode.py submitted to a real local Ray head through the job API."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _submit(entrypoint: str) -> tuple[str, str]:
    """Submit through the job API as `ray job submit --working-dir .` does; wait; return (status, logs)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(os.environ["RAY_DASHBOARD_URL"])
    runtime_env = yaml.safe_load((ROOT / "infra/runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(ROOT)
    deadline = time.monotonic() + 240
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except RuntimeError as err:  # the head's job agent registers a little after the dashboard opens
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1)
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "job did not finish in time"
        time.sleep(1)
    return status, client.get_job_logs(job_id)


def test_submit_encode_job(ray_cluster: str, tmp_path: Path) -> None:
    out = tmp_path / "submitted"
    status, logs = _submit(f"python jobs/encode.py --config jobs/configs/sample.yaml --output {out}")
    assert status == "SUCCEEDED", logs[-3000:]
    assert "32 rows read = 32 written + 0 rejected" in logs
    summary = json.loads((out / "_SUMMARY.json").read_text())
    assert summary["rows_written"] == 32 and summary["input_files"] == 1
    assert len(list((out / "data").glob("*.parquet"))) == 1


def test_submit_reindex_job(ray_cluster: str, tmp_path: Path) -> None:
    out = tmp_path / "reindexed"
    status, logs = _submit(f"python jobs/reindex.py --config jobs/configs/sample.yaml --output {out}")
    assert status == "SUCCEEDED", logs[-3000:]
    assert "FULL RE-ENCODE: no committed output yet" in logs and "new 32, changed 0" in logs
    status, logs = _submit(f"python jobs/reindex.py --config jobs/configs/sample.yaml --output {out} --dry-run")
    assert status == "SUCCEEDED", logs[-3000:]
    assert "dry run" in logs and "new 0, changed 0, unchanged 32; deleted 0" in logs
