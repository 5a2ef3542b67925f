"""The encoding fingerprint: everything that decides the vectors, in one comparable record.

Outputs (and, later, reindex states) made under different fingerprints must not be mixed.
The weights are identified by the sha256 of the model's weight files, so a re-uploaded model
under the same name is noticed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.bundled import resolve_model
from pipeline.config import EncoderConfig

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def model_folder(config: EncoderConfig) -> Path:
    """Local folder of the model: bundled and local models as they are, hub ids from the HF cache."""
    resolved = resolve_model(config.model)
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(resolved, revision=config.revision))


def weights_sha256(folder: Path) -> str:
    """sha256 over the weight files' names and bytes, in name order."""
    for pattern in WEIGHT_PATTERNS:
        files = sorted(p for p in folder.glob(pattern) if p.is_file())
        if files:
            break
    else:
        raise ValueError(f"model folder {folder}: no weight files ({', '.join(WEIGHT_PATTERNS)})")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def fingerprint(config: EncoderConfig, folder: Path | None = None) -> dict[str, Any]:
    """The fingerprint of ``config``'s model (``folder``: its already resolved local folder)."""
    from transformers import AutoConfig

    from pipeline import __version__

    folder = folder or model_folder(config)
    return {
        "model": config.model,
        "revision": config.revision,
        "weights_sha256": weights_sha256(folder),
        "vocab_size": int(AutoConfig.from_pretrained(folder).vocab_size),
        "max_length": config.max_length,
        "top_k": config.top_k,
        "min_weight": config.min_weight,
        "dtype": config.dtype,
        "package_version": __version__,
    }


def fingerprint_id(fp: dict[str, Any]) -> str:
    """A short stable id of what decides the vectors: weights and settings, not names or versions."""
    core = {k: v for k, v in fp.items() if k not in ("model", "revision", "package_version")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]
