"""Session fixtures: the bundled SPLADE-tiny and tiny random masked-LMs saved to disk."""

from __future__ import annotations

import os
import tempfile

# Tests never reach a model hub: everything loads from folders on disk.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# The quiet terminal's log files (pipeline.terminal): under the tests' temp folder, not the user's cache.
os.environ.setdefault("SPLADE_PIPELINE_LOG_DIR", os.path.join(tempfile.mkdtemp(), "logs"))

import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from support.pg_server import Postgres, free_port  # noqa: E402
from support.pinecone_protocol import PINECONE_TEST_KEY  # noqa: E402
from support.s3_server import S3Server  # noqa: E402

from pipeline.encode.bundled import fetch_splade_tiny  # noqa: E402

# Tests that need a real service (a Ray cluster, moto's S3 server, PostgreSQL) or start a job
# in a subprocess: `pytest -m "not cluster"` runs the rest (math, batching, encoder, sources,
# config, CLI parsing) in a couple of minutes.
CLUSTER_FIXTURES = {"ray_cluster", "s3_endpoint", "postgres"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def splade_tiny() -> Path:
    """The real trained SPLADE-tiny, verified by sha256 (fetched once into the user cache)."""
    return fetch_splade_tiny()


def _save_tiny(model: torch.nn.Module, folder: Path, splade_tiny: Path) -> Path:
    from transformers import AutoTokenizer

    model.eval().save_pretrained(folder)
    AutoTokenizer.from_pretrained(splade_tiny).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, splade_tiny: Path) -> dict[str, Path]:
    """Random tiny masked-LMs sharing the bert-base-uncased tokenizer: one per encoder path.

    ``bert`` and ``distilbert`` take the chunked-head path, ``roberta`` the generic one.
    """
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        DistilBertConfig,
        DistilBertForMaskedLM,
        RobertaConfig,
        RobertaForMaskedLM,
    )

    torch.manual_seed(0)
    vocab = 30522
    models = {
        "bert": BertForMaskedLM(
            BertConfig(
                vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
            )
        ),
        "distilbert": DistilBertForMaskedLM(
            DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
        ),
        "roberta": RobertaForMaskedLM(
            RobertaConfig(
                vocab_size=vocab,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                pad_token_id=0,
                max_position_embeddings=514,
            )
        ),
    }
    root = tmp_path_factory.mktemp("tiny-models")
    return {name: _save_tiny(model, root / name, splade_tiny) for name, model in models.items()}


# ---- real services on 127.0.0.1: S3 (moto's HTTP server) and a Ray cluster ---------------------

EXIT_STATUS = pytest.StashKey[int]()
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1, in its own process (see support.s3_server); its URL is exported
    as AWS_ENDPOINT_URL for every client."""
    server = S3Server().start()
    os.environ.update(S3_ENV | {"AWS_ENDPOINT_URL": server.url, "PINECONE_API_KEY": PINECONE_TEST_KEY})
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint: str, splade_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local Ray head (2 CPUs) started like a real cluster, so jobs can also be submitted to it.

    Started after the S3 endpoint so its workers inherit AWS_ENDPOINT_URL; the test process and
    CLI subprocesses join it through RAY_ADDRESS.
    """
    import ray

    port, dashboard = free_port(), free_port()
    env = os.environ | {
        "RAY_AUTH_MODE": "disabled",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_num_workers_soft_limit": "8",
        "RAY_metrics_report_interval_ms": "1000",  # the encoders' metrics reach the node's endpoint within a second
    }  # idle task workers kept, as pipeline.job.encode.start_local_ray does
    # Submitted jobs run `python ...`: make that this interpreter, venv or not.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    temp = tmp_path_factory.mktemp("ray")
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable))
    cmd = [
        ray_bin,
        "start",
        "--head",
        "--num-cpus=2",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--object-store-memory={512 * 2**20}",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    # --block ties the cluster to this process: stopping it stops exactly this cluster (`ray stop`
    # would stop every Ray cluster on the machine).
    log = open(temp / "ray-start.log", "w")  # noqa: SIM115 - closed at teardown
    head = subprocess.Popen([*cmd, "--block"], env=env, stdout=log, stderr=subprocess.STDOUT)
    _wait_for_ports([port, dashboard], head, temp / "ray-start.log")
    address = f"127.0.0.1:{port}"
    os.environ.update({"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    ray.init(address=address, log_to_driver=False)
    os.environ["RAY_DASHBOARD_URL"] = f"http://127.0.0.1:{dashboard}"
    yield address
    ray.shutdown()
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
    log.close()


def _wait_for_ports(ports: list[int], process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ray head did not open ports {pending} in {timeout} s: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", pending[0])) == 0:
                pending.pop(0)
                continue
        time.sleep(0.2)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL 18 + pgvector server on 127.0.0.1 for the session."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="splade-pg-", dir="/tmp"))
    root.chmod(0o755)
    server = Postgres(root)
    yield server
    try:
        server.stop()
    except subprocess.CalledProcessError:
        pass  # already stopped by a test
    shutil.rmtree(root, ignore_errors=True)


# ---- the process's exit status is the tests' ---------------------------------------------------


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End with pytest's exit status, skipping C++ static destructors: after delta-rs has run in a
    process, Arrow's and delta-rs's thread pools can abort the interpreter at exit (status 134)
    whatever the tests did (see ``pipeline.cli.run``, which does the same for the command line)."""
    if EXIT_STATUS in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[EXIT_STATUS])
