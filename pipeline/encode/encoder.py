"""SpladeEncoder: texts in, SPLADE sparse vectors (Arrow) out. The one encoding path.

Loads the tokenizer and masked-LM once; per call it tokenizes in one batch, sorts by length,
cuts micro-batches by a padded-token budget, runs the encoder (padding-free on CPU, see
:mod:`pipeline.encode.packed`), then the MLM head a piece at a time with a running per-document max
(see :mod:`pipeline.encode.splade`; on CPU in fp32 behind a certified bf16 screen, see
:mod:`pipeline.encode.screen`), and restores input order.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import EncoderConfig, validated
from pipeline.encode import splade
from pipeline.encode.batching import padded_length, plan_micro_batches
from pipeline.encode.bundled import model_errors_named, resolve_model
from pipeline.encode.heads import MaskedLMParts, split_masked_lm
from pipeline.encode.packed import Layout
from pipeline.encode.screen import MAX_HIDDEN, ScreenedDecoder, bf16_products_accumulate_in_fp32, bf16_products_pay
from pipeline.encode.sparse import sparse_array, sparse_rows
from pipeline.errors import SettingError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EncodedBatch:
    """Vectors plus what the pipeline counts: real tokens per text and whether it was truncated."""

    sparse: pa.StructArray
    num_tokens: np.ndarray  # int32, [CLS]/[SEP] included, after truncation (max: summed over the windows)
    truncated: np.ndarray  # bool
    oom_splits: int = 0  # micro-batches halved after running out of memory
    windows: np.ndarray | None = None  # int32: windows pooled into each vector (None: one each)
    # long_documents split: one row per window of each text, in order of text, then window
    parent: np.ndarray | None = None  # int64: the position of the row's text in the input
    window: np.ndarray | None = None  # int32: the window's number within its text (0, 1, ...)
    spans: np.ndarray | None = None  # int64 [rows, 2]: the window's characters in its text, [start, end)


class SpladeEncoder:
    """SPLADE document/query encoder over any Hugging Face masked-LM.

    For each text, ``w_j = max_i log(1 + relu(logit_ij))`` over its real tokens ``i``
    ([CLS] and [SEP] included, padding never), for every vocabulary term ``j``; then weights
    below ``min_weight`` are dropped and only the ``top_k`` largest kept. Settings are the
    fields of :class:`pipeline.config.EncoderConfig` (``device``, ``dtype``, ``max_length``,
    ``top_k``, ``min_weight``, ``max_batch_tokens``, ...)::

        enc = SpladeEncoder("naver/splade-cocondenser-ensembledistil", top_k=256)
        vectors = enc.encode(["some text"])  # struct<indices: list<int32>, values: list<float32>>
    """

    def __init__(self, model: str | None = None, /, **settings: Any) -> None:
        if model is not None:
            settings["model"] = str(model)
        self.config = validated(EncoderConfig, settings, "encoder")
        self.device = _resolve_device(self.config.device)
        self.compute_dtype = _resolve_dtype(self.config.dtype, self.device)
        self.model_path = resolve_model(self.config.model)
        with model_errors_named(self.config.model):
            self.tokenizer, self._backend = _load_tokenizer(self.model_path, self.config)
            self.model = _load_model(self.model_path, self.config.revision).to(self.device)
        self.parts: MaskedLMParts = split_masked_lm(self.model)
        self.vocab_size = int(self.model.get_output_embeddings().out_features)
        self.max_length = _check_max_length(self.config.max_length, self.tokenizer, self.model)
        self.windowed = self.config.long_documents != "truncate"
        self._backend.enable_truncation(self.max_length, stride=self._stride() if self.windowed else 0)
        self._backend.no_padding()
        self._pad_id = int(self.tokenizer.pad_token_id or 0)
        on_gpu = self.device.type == "cuda"
        if self.config.packed and self.parts.packed is None:
            raise SettingError(
                f"encoder.packed: true cannot be used with this model ({type(self.model).__name__}): the padding-free "
                "forward covers BERT and DistilBERT encoders (no decoder, cross-attention or chunked feed-forward)"
            )
        use_packed = self.config.packed if self.config.packed is not None else not on_gpu
        self.packed = self.parts.packed if use_packed else None
        self.head_chunk_tokens = self.config.head_chunk_tokens or (4096 if on_gpu else 2048 if self.packed else 512)
        self.screen = self._screened_decoder(on_gpu)
        # Measured with `python -m benchmarks.encoder_bench`: on an H200 (bert-base shape, bf16)
        # 32768 tokens per pass was 14% faster than 16384; on a 2-core x86_64 Xeon VM with AMX
        # (fp32) bert-base ran 17.9 docs/s at 1024 tokens against 9.4 at 16384 (large batches
        # thrash the caches), SPLADE-tiny 185 vs 162.
        self.max_batch_tokens = self.config.max_batch_tokens or (32768 if on_gpu else 1024)
        self._side_stream = torch.cuda.Stream(self.device) if on_gpu else None
        # Called with each micro-batch's padded token count before its forward pass. The job's
        # test-only fault injection sets it (pipeline.job.faults); nothing here knows of faults.
        self.before_forward: Callable[[int], None] | None = None
        self._queries: Callable[[list[str]], pa.StructArray] | None = None  # loaded on first use

    @classmethod
    def from_config(cls, config: EncoderConfig) -> SpladeEncoder:
        return cls(**config.model_dump())

    def encode(self, texts: Sequence[str]) -> pa.StructArray:
        """One sparse vector per text, in input order."""
        if self.config.long_documents == "split":
            raise SettingError(
                "encode() gives one vector per text, and long_documents 'split' one per window: use encode_batch(), "
                "whose rows carry their text (parent), window and characters"
            )
        return self.encode_batch(texts).sparse

    def encode_queries(self, queries: Sequence[str]) -> pa.StructArray:
        """One query vector per text, in input order, for scoring documents by dot product: by
        ``query_model`` where one is set (SPLADE families with a query encoder of their own), else by
        the document model; with an ``idf.json`` in that model's folder (an inference-free model),
        the IDF weight of each distinct word piece, without a forward pass. Queries are truncated
        at ``max_length`` and never pruned (``top_k`` and ``min_weight`` are for documents)."""
        _check_texts(queries)
        if self._queries is None:
            self._queries = self._query_side()
        return self._queries(list(queries))

    def _query_side(self) -> Callable[[list[str]], pa.StructArray]:
        from pipeline.encode.queries import IdfQueries, idf_file, load_idf

        name = self.config.query_model
        path = resolve_model(name) if name else self.model_path
        with model_errors_named(name or self.config.model):
            idf = idf_file(path, None if name else self.config.revision)
            if idf is not None:
                config = self.config.model_copy(update={"model": name, "revision": None}) if name else self.config
                tokenizer, backend = _load_tokenizer(path, config)  # its own copy: truncated, never windowed
                if name and tokenizer.get_vocab() != self.tokenizer.get_vocab():
                    raise SettingError(
                        f"encoder.query_model {name!r}: its tokenizer's vocabulary is not encoder.model "
                        f"{self.config.model!r}'s: query and document vectors must share a vocabulary"
                    )
                backend.enable_truncation(self.max_length)
                backend.no_padding()
                return IdfQueries(tokenizer, backend, load_idf(idf, tokenizer, self.vocab_size)).encode
        if not name:
            return self._encode_unpruned
        settings = self.config.model_dump() | {"model": name, "revision": None, "query_model": None}
        other = SpladeEncoder(**settings | {"long_documents": "truncate", "stride": 0})
        if other.vocab_size != self.vocab_size:
            raise SettingError(
                f"encoder.query_model {name!r} has {other.vocab_size} vocabulary terms and encoder.model "
                f"{self.config.model!r} {self.vocab_size}: query and document vectors must share a vocabulary"
            )
        return other._encode_unpruned

    @torch.inference_mode()
    def _encode_unpruned(self, texts: list[str]) -> pa.StructArray:
        encodings = self._backend.encode_batch(texts, add_special_tokens=True)  # a text's first window only
        lengths = np.fromiter((len(e) for e in encodings), dtype=np.int32, count=len(encodings))
        offsets, indices, values, _ = self._encode_units(encodings, lengths, None, 0.0)
        return sparse_array(offsets, indices, values)

    @torch.inference_mode()
    def encode_batch(self, texts: Sequence[str]) -> EncodedBatch:
        """Vectors plus per-text token counts and truncation flags (``long_documents: split``: one row
        per window, with its text, number and characters)."""
        _check_texts(texts)
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=True)
        if not self.windowed:
            lengths = np.fromiter((len(e) for e in encodings), dtype=np.int32, count=len(encodings))
            truncated = np.fromiter((bool(e.overflowing) for e in encodings), dtype=bool, count=len(encodings))
            offsets, indices, values, splits = self._encode_units(
                encodings, lengths, self.config.top_k, self.config.min_weight
            )
            return EncodedBatch(sparse_array(offsets, indices, values), lengths, truncated, splits)
        # Long documents: every window of max_length tokens (the tokenizer's overflow, [CLS]/[SEP]
        # each) is a unit of its own, so a micro-batch's token budget holds whatever a text's length.
        windows = np.fromiter((1 + len(e.overflowing) for e in encodings), dtype=np.int32, count=len(encodings))
        units = [w for e in encodings for w in (e, *e.overflowing)]
        lengths = np.fromiter((len(u) for u in units), dtype=np.int32, count=len(units))
        parent = np.repeat(np.arange(len(encodings)), windows)
        if self.config.long_documents == "split":
            offsets, indices, values, splits = self._encode_units(
                units, lengths, self.config.top_k, self.config.min_weight
            )
            window = (np.arange(len(units)) - np.repeat(np.cumsum(windows) - windows, windows)).astype(np.int32)
            return EncodedBatch(
                sparse_array(offsets, indices, values),
                lengths,
                np.zeros(len(units), dtype=bool),
                splits,
                np.ones(len(units), dtype=np.int32),
                parent,
                window,
                np.array([_char_span(u) for u in units], dtype=np.int64).reshape(-1, 2),
            )
        # max: the weights below min_weight go per window (that commutes with the max), top_k after it.
        offsets, indices, values, splits = self._encode_units(units, lengths, None, self.config.min_weight)
        offsets, indices, values = splade.csr_max_by_group(offsets, indices, values, parent, len(encodings))
        offsets, indices, values = splade.csr_top_k(offsets, indices, values, self.config.top_k)
        num_tokens = np.bincount(parent, weights=lengths, minlength=len(encodings)).astype(np.int32)
        truncated = np.zeros(len(encodings), dtype=bool)
        return EncodedBatch(sparse_array(offsets, indices, values), num_tokens, truncated, splits, windows)

    def _encode_units(
        self, encodings: list, lengths: np.ndarray, top_k: int | None, min_weight: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """CSR weights of each encoding (pruned by ``min_weight`` and ``top_k``), in input order, and
        the OOM splits."""
        queue = plan_micro_batches(lengths, self.max_batch_tokens, self.config.pad_to_multiple_of, self.max_length)
        queue.reverse()  # popped from the end: in plan order
        plan, pieces, splits = [], [], 0
        pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        while queue:
            rows = queue.pop()
            try:
                weights = self._weights([encodings[r] for r in rows], lengths[rows], top_k, min_weight)
            except Exception as err:
                if not is_out_of_memory(err) or len(rows) == 1:
                    raise
                # Half the token budget for this micro-batch, and try again (down to one text).
                splits += 1
                log.warning(
                    "out of memory on %d texts x %d tokens; retrying as two halves", len(rows), int(lengths[rows].max())
                )
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                queue += [rows[len(rows) // 2 :], rows[: len(rows) // 2]]
                continue
            plan.append(rows)
            event = None
            if self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
            # Copy the previous batch to the host only now, so the GPU already has this one queued.
            if pending is not None:
                pieces.append(self._to_host(*pending))
            pending = (weights, event)
        if pending is not None:
            pieces.append(self._to_host(*pending))
        offsets, indices, values = _concat_csr(pieces)
        processed = np.concatenate(plan) if plan else np.zeros(0, dtype=np.int64)
        inverse = np.empty_like(processed)
        inverse[processed] = np.arange(len(processed))
        offsets, indices, values = splade.csr_take_rows(offsets, indices, values, inverse)
        return offsets, indices, values, splits

    def _weights(self, encodings: list, lengths: np.ndarray, top_k: int | None, min_weight: float) -> torch.Tensor:
        """Pruned ``[B, V]`` SPLADE weights of one micro-batch, left on the device (no sync)."""
        width = padded_length(int(lengths.max()), self.config.pad_to_multiple_of, self.max_length)
        total = int(lengths.sum())
        ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int64, count=total)
        if self.before_forward is not None:
            self.before_forward(len(encodings) * width)
        with self._autocast():
            if self.packed is not None:
                positions = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
                layout = Layout.of(lengths, self.device)
                hidden = self.packed(self._to_device(ids), self._to_device(positions), layout)
                if self.screen is not None:
                    max_logits = self.screen.max_logits(self.parts.transform(hidden), lengths, self.head_chunk_tokens)
                else:
                    max_logits = splade.packed_max_logits(
                        hidden, lengths, self.parts.transform, self.parts.decoder, self.head_chunk_tokens
                    )
            else:
                real = np.arange(width) < lengths[:, None]
                padded = np.full((len(encodings), width), self._pad_id, dtype=np.int64)
                padded[real] = ids  # row-major boolean assignment: one flat copy, no per-row loop
                ids_t, mask_t = self._to_device(padded), self._to_device(real.astype(np.int64))
                hidden = self.parts.hidden(ids_t, mask_t)
                max_logits = splade.pooled_max_logits(
                    hidden, mask_t, lengths, self.parts.head, self.vocab_size, self.head_chunk_tokens
                )
        weights = splade.splade_activation_(max_logits)
        return splade.prune_(weights, top_k, min_weight)

    def _stride(self) -> int:
        check_stride(self.config.stride, self.max_length, self._backend.num_special_tokens_to_add(False))
        return self.config.stride

    def _screened_decoder(self, on_gpu: bool) -> ScreenedDecoder | None:
        """The bf16-screened decoder where it applies (see :mod:`pipeline.encode.screen`), else None."""
        wanted = self.config.screen
        if wanted is False or (wanted is None and on_gpu):
            return None
        reasons = []
        if self.packed is None:
            reasons.append("it needs the packed path (packed: true, a BERT or DistilBERT model)")
        if self.compute_dtype != torch.float32:
            reasons.append(f"it screens fp32 logits, and dtype is {str(self.compute_dtype).removeprefix('torch.')}")
        if self.parts.decoder is not None and self.parts.decoder.in_features > MAX_HIDDEN:
            reasons.append(f"its error bound is derived for hidden sizes up to {MAX_HIDDEN}")
        if not reasons and not bf16_products_accumulate_in_fp32(self.device):
            reasons.append(f"bf16 matrix products on {self.device} exceed the error bound it relies on")
        if reasons:
            if wanted:
                raise SettingError("encoder.screen: true cannot be used: " + "; ".join(reasons))
            return None
        if wanted is None and not bf16_products_pay(self.parts.decoder, self.device):
            log.info("bf16 products on this %s are not faster than fp32 (no native bf16): not screening", self.device)
            return None
        return ScreenedDecoder(self.parts.decoder)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def _to_host(
        self, weights: torch.Tensor, event: torch.cuda.Event | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if event is None:
            return splade.to_csr(weights)
        # On a side stream, the sync inside to_csr waits for this batch only, not the one queued after it.
        with torch.cuda.stream(self._side_stream):
            self._side_stream.wait_event(event)
            weights.record_stream(self._side_stream)
            return splade.to_csr(weights)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def decode(self, vectors: pa.StructArray | pa.ChunkedArray, top: int | None = None) -> list[dict[str, float]]:
        """Readable view: ``{token: weight}`` per row, heaviest first (``top`` limits the count)."""
        return decode(self.tokenizer, vectors, top)

    def __repr__(self) -> str:
        return (
            f"SpladeEncoder(model={self.config.model!r}, device={self.device.type!r}, "
            f"dtype={str(self.compute_dtype).removeprefix('torch.')!r}, path={self.parts.kind!r}, "
            f"packed={self.packed is not None}, screen={self.screen is not None}, "
            f"max_length={self.max_length}, long_documents={self.config.long_documents!r}, "
            f"top_k={self.config.top_k}, min_weight={self.config.min_weight})"
        )


def decode(tokenizer: Any, vectors: pa.StructArray | pa.ChunkedArray, top: int | None = None) -> list[dict[str, float]]:
    """``{token: weight}`` per row of ``vectors``, heaviest first, using ``tokenizer``'s vocabulary."""
    out = []
    for indices, values in sparse_rows(vectors):
        order = np.argsort(-values, kind="stable")[:top]
        tokens = tokenizer.convert_ids_to_tokens(indices[order].tolist())
        out.append(dict(zip(tokens, values[order].tolist())))
    return out


def check_stride(stride: int, max_length: int, specials: int) -> None:
    """The overlap of consecutive windows must leave room for new text tokens in each window."""
    room = max_length - specials
    if stride >= room:
        raise SettingError(
            f"encoder.stride: {stride} must be below the text tokens a window holds "
            f"({room}: max_length {max_length} minus {specials} special tokens)"
        )


def _char_span(encoding: Any) -> tuple[int, int]:
    """The characters a window covers in its text, ``[start, end)``, from its real tokens' offsets."""
    spans = [o for o, special in zip(encoding.offsets, encoding.special_tokens_mask) if not special]
    return (spans[0][0], spans[-1][1]) if spans else (0, 0)


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure."""
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
    )


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SettingError("device: 'cuda' was asked for but torch sees no CUDA device; use device='cpu' or 'auto'")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _load_tokenizer(path: str, config: EncoderConfig) -> tuple[Any, Any]:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=config.revision)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SettingError(
            f"model {config.model!r}: needs a fast tokenizer (tokenizer.json); got {type(tokenizer).__name__}"
        )
    # Our own copy: truncation/padding settings below must not leak into the HF tokenizer.
    return tokenizer, Tokenizer.from_str(backend.to_str())


def _load_model(path: str, revision: str | None) -> torch.nn.Module:
    from transformers import AutoModelForMaskedLM

    try:
        model = AutoModelForMaskedLM.from_pretrained(
            path, revision=revision, dtype=torch.float32, attn_implementation="sdpa"
        )
    except ValueError as err:
        if "sdpa" not in str(err).lower():
            raise
        log.info("model %s has no SDPA attention; using its default attention", path)
        model = AutoModelForMaskedLM.from_pretrained(path, revision=revision, dtype=torch.float32)
    return model.eval()


def _check_max_length(max_length: int, tokenizer: Any, model: torch.nn.Module) -> int:
    limits = [
        int(x)
        for x in (getattr(tokenizer, "model_max_length", None), getattr(model.config, "max_position_embeddings", None))
        if x and int(x) < 1_000_000
    ]
    if limits and max_length > min(limits):
        raise SettingError(f"max_length: {max_length} exceeds what this model accepts ({min(limits)} tokens)")
    return max_length


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str):
        raise TypeError("encode() takes a sequence of strings, not a single string; wrap it in a list")
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{position}] is {type(text).__name__}, expected str")


def _concat_csr(pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not pieces:
        return np.zeros(1, dtype=np.int32), np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32)
    counts = np.concatenate([np.diff(off) for off, _, _ in pieces])
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return offsets, np.concatenate([p[1] for p in pieces]), np.concatenate([p[2] for p in pieces])
