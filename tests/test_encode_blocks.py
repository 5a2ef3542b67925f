"""The encoder stage's handling of documents that fail: isolated, rejected with the reason, the rest encoded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support.reference import densify

from pipeline import SpladeEncoder
from pipeline.config import EncoderConfig, InputConfig
from pipeline.encode.fingerprint import fingerprint
from pipeline.job.stages import EncodeBlocks
from pipeline.sources import Shard, read_shard


@pytest.fixture(scope="module")
def stage(splade_tiny: Path) -> EncodeBlocks:
    config = EncoderConfig(model=str(splade_tiny), device="cpu")
    return EncodeBlocks(config, fingerprint(config), threads=1)


def _block(tmp_path: Path, texts: list[str]):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        "\n".join(json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(texts))
        + "\n"
        + json.dumps({"id": "e", "text": " "})
    )
    cfg = InputConfig(paths=[str(path)])
    return next(read_shard(Shard(0, str(path), "jsonl", unit="u"), cfg))


def test_a_document_that_raises_is_rejected_alone(
    stage: EncodeBlocks, splade_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [f"document {i} about tides and honey" for i in range(13)]
    texts[5] = "BREAKS THE TOKENIZER"
    original = stage.encoder.encode_batch

    def fragile(batch: list[str]):
        if any(t.startswith("BREAKS") for t in batch):
            raise ValueError("cannot encode this one")
        return original(batch)

    monkeypatch.setattr(stage.encoder, "encode_batch", fragile)
    out = stage(_block(tmp_path, texts))
    assert out.num_rows == 14  # 12 encoded + 1 failed + 1 empty text: nothing dropped
    reasons = dict(zip(out["id"].to_pylist(), out["_reject"].to_pylist()))
    assert reasons["d5"] == "encoder_error" and reasons["e"] == "empty_text"
    assert "ValueError: cannot encode this one" in out["_detail"].to_pylist()[out["id"].to_pylist().index("d5")]
    good = out.filter(out["_reject"].is_null())
    want = densify(
        SpladeEncoder(str(splade_tiny), device="cpu").encode([texts[int(i[1:])] for i in good["id"].to_pylist()]), 30522
    )
    assert np.abs(densify(good["sparse"].combine_chunks(), 30522) - want).max() <= 1e-5


def test_every_document_failing_is_an_error_not_rejects(
    stage: EncodeBlocks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(batch: list[str]):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(stage.encoder, "encode_batch", broken)
    with pytest.raises(RuntimeError, match="every document of the block failed"):
        stage(_block(tmp_path, ["one text", "another text", "a third"]))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_weights_are_rejected_not_sent_to_stores(
    bad: float, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A decoder that overflows (the bias of one term +inf, or NaN) gives every document a weight no
    store takes: each row is rejected with the count in its detail, none is dropped."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(tiny_models["bert"])
    with torch.no_grad():
        model.cls.predictions.decoder.bias[1234] = bad
    folder = tmp_path / "overflowing"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_models["bert"]).save_pretrained(folder)
    config = EncoderConfig(model=str(folder), device="cpu")
    out = EncodeBlocks(config, fingerprint(config), threads=1)(_block(tmp_path, ["one text", "another text"]))
    assert out.num_rows == 3
    rejected = {
        i: (r, d) for i, r, d in zip(out["id"].to_pylist(), out["_reject"].to_pylist(), out["_detail"].to_pylist())
    }
    assert rejected["d0"][0] == rejected["d1"][0] == "non_finite_weights"
    want = "1 infinite and 0 NaN" if bad == float("inf") else "0 infinite and 1 NaN"
    assert want in rejected["d0"][1] and rejected["e"][0] == "empty_text"


def test_a_writer_that_keeps_dying_stops_the_run(ray_cluster: str, splade_tiny: Path, tmp_path: Path) -> None:
    """The writers' bounds, with the run's real attempt log: deaths recorded on this (live) node,
    while starting and on one block, then the next start or attempt stops the run with a message."""
    import ray

    from pipeline.job.attempts import start_log
    from pipeline.job.stages import WRITE_DEATHS, ActorDeathsError, WriteBlocks, block_key
    from pipeline.output.location import OutputLocation

    config = EncoderConfig(model=str(splade_tiny), device="cpu")
    block = _block(tmp_path, ["a text about tides", "another about honey"])
    log, node = start_log(), ray.get_runtime_context().get_node_id()

    def writer(max_deaths: int = 3) -> WriteBlocks:
        out = OutputLocation(str(tmp_path / "out"))
        return WriteBlocks(out, "zstd", fingerprint(config), [], "a1", attempts=log, max_deaths=max_deaths)

    for _ in range(2):  # this process is the "actor": it began starting twice and never became ready
        ray.get(log.loading.remote("", node))
    with pytest.raises(ActorDeathsError, match="the writer actor died 2 times while starting"):
        writer(max_deaths=2)
    ready = writer(max_deaths=4)  # 3 deaths so far, under a limit of 4: it starts, and its deaths are forgotten
    key = block_key(block, "write")
    for _ in range(WRITE_DEATHS):
        ray.get(log.begin.remote(key, node))  # attempts at the block that died with the node up
    with pytest.raises(ActorDeathsError, match=f"the block of u from line 1 killed its writer {WRITE_DEATHS} times"):
        ready(block)
    assert ray.get(log.loading.remote("", node)) == 0
