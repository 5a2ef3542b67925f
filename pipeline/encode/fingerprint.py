"""The encoding fingerprint: everything that decides the vectors, in one comparable record.

Outputs and reindex states made under different fingerprints must not be mixed. The weights
are identified by the sha256 of the model's weight files, so a re-uploaded model under the same
name is noticed; the model's name, revision and the package version are recorded but do not
decide (:data:`NAMES`): the same weights under another name give the same vectors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import EncoderConfig
from pipeline.encode.bundled import model_errors_named, resolve_model
from pipeline.errors import SettingError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)
NAMES = ("model", "revision", "package_version")
ADDED_LATER = {
    "long_documents": "truncate",
    "stride": 0,
}  # fields added later, and what earlier records mean  # recorded, but names, not weights: they never decide


@dataclass(frozen=True)
class Fingerprint:
    """What decides the vectors of an output (plus the names it was made under, for people)."""

    model: str
    revision: str | None
    weights_sha256: str
    tokenizer_sha256: str
    vocab_size: int
    max_length: int
    top_k: int | None
    min_weight: float
    dtype: str  # the compute dtype the encoders resolve ("auto" never appears here)
    package_version: str
    # Added later: records written before they existed were made with these values.
    long_documents: str = "truncate"
    stride: int = 0  # 0 where long_documents is truncate (it changes nothing there)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Fingerprint:
        """The fingerprint a record (a commit, a file's metadata) carries; unknown keys are ignored,
        missing ones are None (and so differ from any real value), or the value every record had
        before the field existed."""
        return cls(
            **{
                f.name: record.get(f.name, None if f.default is dataclasses.MISSING else f.default)
                for f in dataclasses.fields(cls)
            }
        )

    def deciding(self) -> dict[str, Any]:
        """The fields that decide the vectors (names left out; a field added later is left out while
        it holds the value records had before it existed, so their ids, and the unit keys and store
        records made from them, stay what they were)."""
        return {
            k: v for k, v in self.to_dict().items() if k not in NAMES and not (k in ADDED_LATER and v == ADDED_LATER[k])
        }

    @property
    def id(self) -> str:
        """A short stable id of what decides the vectors."""
        return hashlib.sha256(json.dumps(self.deciding(), sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: Fingerprint) -> list[str]:
        """What would change the vectors from ``self`` to ``other``, as ``encoder <field>: old -> new``."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [
            f"encoder {k}: {mine[k]!r} -> {theirs[k]!r}"
            for k in sorted(mine)
            if k not in NAMES and mine[k] != theirs[k]
        ]


def model_folder(config: EncoderConfig) -> Path:
    """Local folder of the model: bundled and local models as they are, hub ids from the HF cache."""
    resolved = resolve_model(config.model)
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download

    with model_errors_named(config.model):
        return Path(snapshot_download(resolved, revision=config.revision))


def weights_sha256(folder: Path) -> str:
    """sha256 over the weight files' names and bytes, in name order."""
    for pattern in WEIGHT_PATTERNS:
        files = sorted(p for p in folder.glob(pattern) if p.is_file())
        if files:
            break
    else:
        raise SettingError(f"model folder {folder}: no weight files ({', '.join(WEIGHT_PATTERNS)})")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def tokenizer_sha256(folder: Path) -> str:
    """sha256 over the tokenizer files present (names and bytes): a changed vocabulary or
    normalisation changes the vectors as surely as changed weights."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            digest.update(name.encode())
            digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def resolved_dtype(config: EncoderConfig, gpus_per_encoder: float = 0.0) -> str:
    """The compute dtype an encoder will use: ``dtype`` as set, or for ``auto`` bfloat16 on CUDA
    (``device: cuda``, or ``auto`` with GPUs per encoder) and float32 on CPU. An encoder whose
    device resolves otherwise (a GPU without bf16) refuses to start rather than mix precisions."""
    if config.dtype != "auto":
        return config.dtype
    on_gpu = config.device == "cuda" or (config.device == "auto" and gpus_per_encoder > 0)
    return "bfloat16" if on_gpu else "float32"


def fingerprint(config: EncoderConfig, folder: Path | None = None, gpus_per_encoder: float = 0.0) -> Fingerprint:
    """The fingerprint of ``config``'s model (``folder``: its already resolved local folder), for
    encoders with ``gpus_per_encoder`` GPUs each."""
    from transformers import AutoConfig

    from pipeline.version import __version__

    folder = folder or model_folder(config)
    with model_errors_named(config.model):
        vocab_size = int(AutoConfig.from_pretrained(folder).vocab_size)
    return Fingerprint(
        model=config.model,
        revision=config.revision,
        weights_sha256=weights_sha256(folder),
        tokenizer_sha256=tokenizer_sha256(folder),
        vocab_size=vocab_size,
        max_length=config.max_length,
        top_k=config.top_k,
        min_weight=config.min_weight,
        dtype=resolved_dtype(config, gpus_per_encoder),
        package_version=__version__,
        long_documents=config.long_documents,
        stride=config.stride if config.long_documents != "truncate" else 0,
    )
