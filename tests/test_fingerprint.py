"""The fingerprint decides whether outputs may be mixed: resolved precision, weights, tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.config import EncoderConfig
from pipeline.encode.fingerprint import Fingerprint, fingerprint


def test_auto_dtype_is_fingerprinted_as_what_the_encoders_compute_in(splade_tiny: Path) -> None:
    """An output encoded in bf16 on GPU encoders and resumed on CPU encoders (fp32) must differ."""
    config = EncoderConfig(model=str(splade_tiny))  # dtype: auto
    on_gpus, on_cpus = fingerprint(config, splade_tiny, 1.0), fingerprint(config, splade_tiny, 0.0)
    assert (on_gpus.dtype, on_cpus.dtype) == ("bfloat16", "float32")
    assert on_gpus.differences(on_cpus) == ["encoder dtype: 'bfloat16' -> 'float32'"]
    assert fingerprint(config.model_copy(update={"dtype": "float16"}), splade_tiny, 1.0).dtype == "float16"


def test_a_changed_tokenizer_changes_the_fingerprint(splade_tiny: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(splade_tiny, copy)
    before = fingerprint(EncoderConfig(model=str(copy)), copy)
    tokenizer = json.loads((copy / "tokenizer.json").read_text())
    tokenizer["normalizer"] = None  # no lowercasing: other tokens, other vectors, same weights
    (copy / "tokenizer.json").write_text(json.dumps(tokenizer))
    after = fingerprint(EncoderConfig(model=str(copy)), copy)
    assert before.weights_sha256 == after.weights_sha256
    assert [d.split(":")[0] for d in before.differences(after)] == ["encoder tokenizer_sha256"]
    assert before.id != after.id


def test_names_never_decide(splade_tiny: Path) -> None:
    fp = fingerprint(EncoderConfig(model=str(splade_tiny)), splade_tiny)
    renamed = Fingerprint.from_dict(fp.to_dict() | {"model": "elsewhere/same-weights", "package_version": "9"})
    assert fp.differences(renamed) == [] and fp.id == renamed.id


def test_an_encoder_that_resolves_another_precision_refuses_to_start(splade_tiny: Path) -> None:
    from pipeline.job.stages import EncodeBlocks

    config = EncoderConfig(model=str(splade_tiny), device="cpu")
    planned_for_gpus = fingerprint(config, splade_tiny, 1.0)  # device cpu: float32, whatever the GPUs
    assert planned_for_gpus.dtype == "float32"
    auto = EncoderConfig(model=str(splade_tiny))
    with pytest.raises(RuntimeError, match="computes in float32 \\(cpu\\), the output is bfloat16"):
        EncodeBlocks(auto, fingerprint(auto, splade_tiny, 1.0), threads=1)


def test_records_from_before_the_long_document_settings_keep_their_id(splade_tiny: Path) -> None:
    import hashlib

    now = fingerprint(EncoderConfig(model=str(splade_tiny)))
    old = {k: v for k, v in now.to_dict().items() if k not in ("long_documents", "stride")}  # an older record
    old_id = hashlib.sha256(
        json.dumps(
            {k: v for k, v in old.items() if k not in ("model", "revision", "package_version")}, sort_keys=True
        ).encode()
    ).hexdigest()[:16]  # how the id was computed before the fields existed
    assert Fingerprint.from_dict(old).id == now.id == old_id  # unit keys and store records stay valid
    assert not Fingerprint.from_dict(old).differences(now)
    pooled = fingerprint(EncoderConfig(model=str(splade_tiny), long_documents="max", stride=8))
    assert pooled.id != now.id and any("long_documents" in d for d in pooled.differences(now))
    # the stride changes nothing while documents are truncated, so it is not part of what decides
    assert fingerprint(EncoderConfig(model=str(splade_tiny), stride=8)).id == now.id
