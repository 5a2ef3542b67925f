"""The example notebook runs top to bottom against the local Ray cluster and the bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "jobs" / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook(ray_cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTEBOOK_OUTPUT", str(tmp_path / "out"))
    monkeypatch.chdir(tmp_path)
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 4
    namespace: dict = {"__name__": "__main__"}
    for number, cell in enumerate(cells):
        code = "".join(cell["source"])
        exec(compile(code, f"{NOTEBOOK.name}[code cell {number}]", "exec"), namespace)  # noqa: S102
    assert namespace["summary"]["rows_written"] == 32
    assert namespace["top_hits"][0][0] == "doc-000"  # the tides passage answers the tides query
    assert all(
        reject is None and nnz > 10
        for _, nnz, reject in [(r["id"], len(r["sparse"]["indices"]), r["_reject"]) for r in namespace["first"]]
    )
