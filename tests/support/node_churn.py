"""A simulated multi-node Ray cluster on this machine, a job run on it, and nodes lost or added
on cue: the node-loss tests and the soak benchmark drive it.

``python tests/support/node_churn.py '<spec as JSON>'`` prints one JSON line: per phase the
job's exit status, the tail of its output, and what was done when. A phase runs the CLI
(``job``: its arguments) against the cluster, as ``ray job submit`` would run the driver on the
head, and performs ``actions`` in order, each once its cue is met:

- cues: ``{"files": n}`` (n data files under the output), ``{"stderr": text}`` (a line of the
  job's output holds it), ``{"after": s}`` (seconds after the previous action), ``{"every": s}``
  (a repeating action, until the job ends);
- actions: ``remove_worker`` (the oldest worker node killed as a preemption kills it: SIGKILL, no
  draining), ``add_worker``, ``remove_all_workers``, ``churn`` (remove the oldest worker and add
  one back), ``kill_head`` (the driver and the whole cluster killed: the head node lost).

A phase with ``fresh_cluster`` starts a new cluster first (after ``kill_head``); ``expect``: texts
looked for in the job's whole output (``seen`` in the result); ``nodes``: the ids of the head
and of every worker node started. Nodes: a head
with ``head`` settings, ``workers`` worker nodes with ``worker`` settings (Ray's node arguments:
num_cpus, resources, object_store_memory).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import s3fs

ROOT = Path(__file__).resolve().parents[2]


class Churn:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.cluster: Any = None
        self.workers: list[Any] = []
        self.log: list[tuple[float, str]] = []
        self.nodes: dict[str, Any] = {"head": [], "workers": []}  # every node's id, by role
        self.start = time.monotonic()

    def say(self, what: str) -> None:
        self.log.append((round(time.monotonic() - self.start, 1), what))

    def up(self) -> None:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args=dict(self.spec.get("head", {"num_cpus": 1})))
        self.workers = []
        self.nodes["head"].append(self.cluster.head_node.node_id)
        for _ in range(self.spec.get("workers", 2)):
            self.add_worker()
        self.cluster.wait_for_nodes()
        self.say(f"cluster up: head + {len(self.workers)} workers at {self.cluster.address}")

    def add_worker(self) -> None:
        self.workers.append(self.cluster.add_node(**self.spec.get("worker", {"num_cpus": 1})))
        self.nodes["workers"].append(self.workers[-1].node_id)
        self.say(f"worker added ({len(self.workers)} now)")

    def remove_worker(self) -> None:
        if self.workers:
            node = self.workers.pop(0)
            self.cluster.remove_node(node, allow_graceful=False)
            self.say(f"worker removed ({len(self.workers)} left)")

    def down(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None

    def run_phase(self, phase: dict[str, Any]) -> dict[str, Any]:
        if phase.get("fresh_cluster") or self.cluster is None:
            self.down()
            self.up()
        env = os.environ | {"RAY_ADDRESS": self.cluster.address, **phase.get("env", {})}
        cmd = [sys.executable, "-m", "pipeline.cli", *phase["job"]]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        actions = list(phase.get("actions", []))
        last, deadline, killed = time.monotonic(), time.monotonic() + phase.get("timeout", 600), False
        while proc.poll() is None and time.monotonic() < deadline:
            if actions and self._cued(actions[0]["when"], lines, last, phase):
                action = actions[0]
                if "every" not in action["when"]:
                    actions.pop(0)
                self.say(f"cue {action['when']} met: {action['do']}")
                killed = self._do(action["do"], proc) or killed
                last = time.monotonic()
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
            self.say("job timed out: killed")
        proc.wait()
        reader.join(timeout=10)
        self.say(f"job ended: exit {proc.returncode}")
        output = "".join(lines)
        seen = {text: text in output for text in phase.get("expect", [])}
        return {"exit": proc.returncode, "output": output[-6000:], "seen": seen, "killed": killed}

    def _cued(self, when: dict[str, Any], lines: list[str], last: float, phase: dict[str, Any]) -> bool:
        if "files" in when:
            return _data_files(phase["output"]) >= when["files"]
        if "stderr" in when:
            return any(when["stderr"] in line for line in list(lines))
        if "after" in when:
            return time.monotonic() - last >= when["after"]
        if "every" in when:
            return time.monotonic() - last >= when["every"]
        raise ValueError(f"unknown cue {when}")

    def _do(self, action: str, proc: subprocess.Popen) -> bool:
        if action == "remove_worker":
            self.remove_worker()
        elif action == "add_worker":
            self.add_worker()
        elif action == "remove_all_workers":
            while self.workers:
                self.remove_worker()
        elif action == "churn":
            self.remove_worker()
            self.add_worker()
        elif action == "kill_head":  # the driver runs on the head: both go
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            self.down()
            self.say("head node lost (driver killed, cluster gone)")
            return True
        else:
            raise ValueError(f"unknown action {action}")
        return False


def run_spec(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run this script on ``spec`` in a fresh process (its own Ray cluster, never the caller's);
    return its result."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    return dict(json.loads(lines[-1].removeprefix("RESULT ")))


def _data_files(output: str) -> int:
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    root = output.removeprefix("s3://") + "/data"
    try:
        return len([p for p in fs.find(root) if p.endswith(".parquet")])
    except FileNotFoundError:
        return 0


def main() -> None:
    spec = json.loads(sys.argv[1])
    churn = Churn(spec)
    results = []
    try:
        for phase in spec["phases"]:
            started = time.monotonic()
            result = churn.run_phase(phase)
            result["seconds"] = round(time.monotonic() - started, 1)
            results.append(result)
    finally:
        churn.down()
    print("RESULT " + json.dumps({"phases": results, "log": churn.log, "nodes": churn.nodes}))


if __name__ == "__main__":
    main()
