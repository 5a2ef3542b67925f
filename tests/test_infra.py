"""Manifests in infra/ and jobs/ parse, and what they name exists in the repository."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import yaml

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "ghcr.io/example/splade-pipeline"


def _entrypoint_paths(entrypoint: str) -> tuple[Path, Path]:
    words = shlex.split(entrypoint)
    assert words[0] == "python"
    return ROOT / words[1], ROOT / words[words.index("--config") + 1]


def _version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_rayjob() -> None:
    job = yaml.safe_load((ROOT / "infra/kuberay/rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    script, config = _entrypoint_paths(job["spec"]["entrypoint"])
    assert script.is_file() and config.is_file()
    load_config(config)  # the config it runs validates
    spec = job["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert head["image"] == workers["image"] == f"{IMAGE}:{_version()}"
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == "1"
    gpu_config = load_config(config)
    assert gpu_config.compute.num_gpus_per_actor == 1


def test_cluster_launcher_and_runtime_env() -> None:
    cluster = yaml.safe_load((ROOT / "infra/cluster.yaml").read_text())
    assert cluster["docker"]["image"] == f"{IMAGE}:{_version()}"
    assert cluster["head_node_type"] in cluster["available_node_types"]
    runtime_env = yaml.safe_load((ROOT / "infra/runtime_env.yaml").read_text())
    assert (ROOT / runtime_env["working_dir"]).is_dir()
    assert ".venv" in runtime_env["excludes"] and ".git" in runtime_env["excludes"]


def test_dockerfile_copies_what_exists() -> None:
    text = (ROOT / "infra/Dockerfile").read_text()
    for line in re.findall(r"^COPY .*$", text, flags=re.M):
        sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
        assert sources and all((ROOT / s).exists() for s in sources), line
    assert f'org.opencontainers.image.version="{_version()}"' in text
    assert f"{IMAGE}:{_version()}" in text


def test_every_job_config_validates() -> None:
    configs = sorted((ROOT / "jobs/configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_reindex_schedules() -> None:
    cron = yaml.safe_load((ROOT / "infra/kuberay/reindex-cronjob.yaml").read_text())
    assert cron["kind"] == "CronJob" and cron["apiVersion"] == "batch/v1"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and len(cron["spec"]["schedule"].split()) == 5
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"{IMAGE}:{_version()}"
    command = container["command"]
    assert command[:3] == ["ray", "job", "submit"]
    script, config = _entrypoint_paths(" ".join(command[command.index("--") + 1 :]))
    assert script == ROOT / "jobs/reindex.py" and config.is_file()
    load_config(config)
    # The cluster it submits to: the head service KubeRay names after the RayCluster.
    cluster = yaml.safe_load((ROOT / "infra/kuberay/raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster"
    assert f"--address=http://{cluster['metadata']['name']}-head-svc:8265" in command

    lines = [
        ln for ln in (ROOT / "infra/cron/splade-reindex.cron").read_text().splitlines() if ln and not ln.startswith("#")
    ]
    assert len(lines) == 1
    fields = lines[0].split(maxsplit=6)
    assert (
        len(fields) == 7
        and "flock -n" in fields[6]
        and "jobs/reindex.py --config jobs/configs/s3-gpu.yaml" in fields[6]
    )


def _secret_env(container: dict) -> dict[str, dict]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if "valueFrom" in e}


def test_the_store_key_reaches_the_ray_processes_not_just_the_submitter() -> None:
    """A submitted job's driver runs on the head and its upsert workers on the workers: the key
    must be in their environment (from a Secret), not only in the shell that runs `ray job submit`."""
    cluster = yaml.safe_load((ROOT / "infra/kuberay/raycluster.yaml").read_text())
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = [g["template"]["spec"]["containers"][0] for g in cluster["spec"]["workerGroupSpecs"]]
    for container in [head, *workers]:
        assert _secret_env(container).get("QDRANT_API_KEY", {}).get("name") == "splade-vector-store"
    cron = yaml.safe_load((ROOT / "infra/kuberay/reindex-cronjob.yaml").read_text())
    submitter = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert not _secret_env(submitter)  # it would not reach the job
    line = next(ln for ln in (ROOT / "infra/cron/splade-reindex.cron").read_text().splitlines() if ln[:1].isdigit())
    assert "splade-pipeline.env" not in line  # sourcing it in the submitting shell reaches no Ray process
    unit = (ROOT / "infra/cron/ray-head.service").read_text()
    assert "EnvironmentFile=/etc/splade-pipeline.env" in unit and "ray start --head" in unit
    runtime_env = yaml.safe_load((ROOT / "infra/runtime_env.yaml").read_text())
    assert not any("KEY" in k or "TOKEN" in k for k in runtime_env.get("env_vars", {}))  # the dashboard shows these


def _spark_args(args: list[str]) -> tuple[dict[str, str], Path, Path]:
    """The --conf settings, the script and the --config of a spark-submit argument list."""
    confs = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--conf")
    script = next(a for a in args if a.endswith(".py"))
    return confs, ROOT / script, ROOT / args[args.index("--config") + 1]


def _one_gpu_per_task(confs: dict[str, str]) -> None:
    """Each executor has one GPU and each task takes it: one encoder per GPU, one task per executor;
    a store key the executors hold is redacted from the Spark UI and event logs."""
    assert confs["spark.executor.resource.gpu.amount"] == confs["spark.task.resource.gpu.amount"] == "1"
    assert confs["spark.python.worker.reuse"] == "true"  # the model loads once per worker, not per task
    redact = re.compile(confs["spark.redaction.regex"])
    for name in ("QDRANT_API_KEY", "PINECONE_API_KEY", "MILVUS_TOKEN", "PGPASSWORD", "AWS_SECRET_ACCESS_KEY"):
        assert redact.search(f"spark.executorEnv.{name}"), name
    assert not [k for k in confs if k.startswith("spark.executorEnv.") and redact.search(k)]  # no key on argv


def test_spark_manifests_submit_the_spark_entrypoint_with_one_gpu_per_task() -> None:
    text = (ROOT / "infra/spark/spark-submit.sh").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("spark-submit"))
    words = shlex.split(line.replace('"$@"', "").replace('${SECRETS[@]+"${SECRETS[@]}"}', ""))
    confs, script, config = _spark_args(words)
    _one_gpu_per_task(confs)
    assert script == ROOT / "jobs/spark_encode.py" and script.is_file()
    load_config(config)
    # on Kubernetes the store key comes from a Secret, to the driver and the executors alike
    refs = re.findall(r"spark\.kubernetes\.(driver|executor)\.secretKeyRef\.QDRANT_API_KEY=\S+", text)
    assert sorted(refs) == ["driver", "executor"]

    job = json.loads((ROOT / "infra/spark/databricks-job.json").read_text())
    cluster = job["job_clusters"][0]["new_cluster"]
    _one_gpu_per_task(cluster["spark_conf"])
    task = job["tasks"][0]
    assert task["job_cluster_key"] == job["job_clusters"][0]["job_cluster_key"]
    python = task["spark_python_task"]
    assert (ROOT / python["python_file"]).is_file()
    load_config(ROOT / python["parameters"][python["parameters"].index("--config") + 1])
    # the dependencies; the code itself the script ships from the checkout (the runtime brings pyspark)
    assert task["libraries"][0]["pypi"]["package"] == f"splade-pipeline=={_version()}"
    assert all(v.startswith("{{secrets/") for k, v in cluster["spark_env_vars"].items() if "KEY" in k)

    steps = json.loads((ROOT / "infra/spark/emr-step.json").read_text())
    args = steps[0]["Args"]
    assert args[0] == "spark-submit"
    confs, script, config = _spark_args(args)
    _one_gpu_per_task(confs)
    assert script == ROOT / "jobs/spark_encode.py"
    load_config(config)
