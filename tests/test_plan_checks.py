"""Plan-time refusals of settings that cannot work: an output inside its input, a local output on
a cluster of several nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.cli import main


def _corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").write_text("\n".join(json.dumps({"id": f"d{i}", "text": f"text {i}"}) for i in range(5)))
    return folder


@pytest.mark.parametrize("layout", ["output inside input", "input inside output", "glob in the same folder"])
def test_output_overlapping_the_input_is_refused(
    layout: str, splade_tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    corpus = _corpus(tmp_path / "corpus")
    inputs, output = {
        "output inside input": (str(corpus), str(corpus / "vectors")),
        "input inside output": (str(corpus), str(tmp_path)),
        "glob in the same folder": (str(corpus / "*.jsonl"), str(corpus)),
    }[layout]
    code = main(["encode", "--input", inputs, "--output", output, "--model", str(splade_tiny)])
    assert code == 2
    err = capsys.readouterr().err
    assert "read back as input" in err and output in err
    assert not (Path(output) / "data").exists()  # refused before anything ran


@pytest.mark.cluster
def test_local_output_on_a_multi_node_cluster_is_refused(splade_tiny: Path, tmp_path: Path) -> None:
    """A head and a worker node (separate raylets, as on a real cluster): a local output path would
    land on whichever node each writer runs on."""
    corpus = _corpus(tmp_path / "corpus")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("someone's file")  # overwrite must not clear it: refused first
    script = textwrap.dedent(
        f"""
        import os, subprocess, sys
        from ray.cluster_utils import Cluster
        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1}})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        env = dict(os.environ, RAY_ADDRESS=cluster.address)
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "encode", "--input", {str(corpus)!r},
             "--output", {str(tmp_path / "out")!r}, "--model", {str(splade_tiny)!r}, "--min-actors", "1",
             "--max-actors", "1", "--num-cpus-per-actor", "1", "--io-cpus", "0.25", "--overwrite", "true"],
            capture_output=True, text=True, env=env, timeout=300,
        )
        cluster.shutdown()
        print("EXIT", proc.returncode)
        print(proc.stderr[-3000:])
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=500)
    assert "EXIT 2" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "is a local path, and the cluster has 2 nodes" in proc.stdout
    assert (tmp_path / "out" / "keep.txt").exists() and not (tmp_path / "out" / "data").exists()
