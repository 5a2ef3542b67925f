"""Encoder throughput: the seed's loop vs sentence-transformers vs ours, same texts, same weights.

All methods run in one process, interleaved repetitions, median reported. Before any timing
counts, every method's vectors are compared with the fp32 seed loop (the plain definition).
Reports docs/s, real tokens/s, peak memory and achieved FLOP/s as a fraction of this
machine's dense matmul rate, measured in the same run.

    python -m benchmarks.encoder_bench --model bert-base --n 128                      # CPU, fp32
    python -m benchmarks.encoder_bench --model bert-base --n 20000 --device cuda --dtype bfloat16

``bert-base``: a BertForMaskedLM of bert-base shape (12 layers, hidden 768, vocab 30522) with
random weights and a negative decoder bias, so vectors have a realistic few hundred non-zeros
(cost is the same as a real SPLADE model's). ``splade-tiny``: the bundled real model.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.corpus import passages  # noqa: E402
from pipeline import SpladeEncoder, fetch_splade_tiny  # noqa: E402
from pipeline.encode.sparse import sparse_rows  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(name: str, folder: Path) -> Path:
    tiny = fetch_splade_tiny()
    if name == "splade-tiny":
        return tiny
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig())
    with torch.no_grad():
        model.cls.predictions.bias.fill_(-2.2)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
    return folder


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _setting(name: str, value: str) -> object:
    """An ``--ours`` value typed as EncoderConfig wants it (the config takes no coerced values):
    strings for dtype/device, booleans for packed/screen (0/1 or false/true), integers otherwise."""
    if name in ("dtype", "device"):
        return value
    if name in ("packed", "screen"):
        return value.lower() in ("1", "true", "yes", "on")
    return int(value)


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    """Dense matmul FLOP/s: the median of timed products after warm-up."""
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10 if device == "cuda" else 5):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def flops_per_token(model_dir: Path) -> float:
    """2 x (non-embedding parameters + vocab x hidden): encoder layers, MLM transform, decoder."""
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(model_dir)
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    return 2.0 * (non_embedding + model.config.vocab_size * model.config.hidden_size)


# ---- the three ways to encode ------------------------------------------------------------------


class SeedLoop:
    """The seed's loop: fixed-size batches in input order, full logits, log(1+relu), masked max."""

    def __init__(self, model_dir: Path, device: str, dtype: torch.dtype, batch_size: int = 32) -> None:
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForMaskedLM.from_pretrained(model_dir).eval().to(device)
        self.device, self.dtype, self.batch_size = device, dtype, batch_size

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tok(
                texts[i : i + self.batch_size], padding=True, truncation=True, max_length=512, return_tensors="pt"
            )
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype != torch.float32):
                logits = self.model(**enc).logits
            weights = torch.log1p(torch.relu(logits.float())) * enc["attention_mask"].unsqueeze(-1)
            vec = weights.amax(dim=1)
            for row in vec:
                nz = row.nonzero().squeeze(1)
                out.append((nz.cpu().numpy().astype(np.int32), row[nz].cpu().numpy()))
        return out

    @staticmethod
    def rows(out: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        return out


class SentenceTransformersSparse:
    """sentence-transformers ``SparseEncoder`` (MLMTransformer + SpladePooling), weights cast to dtype."""

    def __init__(self, model_dir: Path, device: str, dtype: torch.dtype, batch_size: int = 32) -> None:
        from sentence_transformers import SparseEncoder

        try:  # sentence-transformers >= 6.2 moved these
            from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling
        except ImportError:
            from sentence_transformers.sparse_encoder.models import MLMTransformer, SpladePooling

        self.model = SparseEncoder(modules=[MLMTransformer(str(model_dir)), SpladePooling("max")], device=device)
        if dtype != torch.float32:
            self.model.to(dtype)
        self.batch_size = batch_size

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Its native output: a sparse COO tensor ``[len(texts), vocab]``."""
        return self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True, show_progress_bar=False)

    @staticmethod
    def rows(coo: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
        coo = coo.coalesce().cpu()
        rows, cols = coo.indices().numpy()
        values = coo.values().float().numpy()
        bounds = np.searchsorted(rows, np.arange(coo.shape[0] + 1))
        return [(cols[a:b].astype(np.int32), values[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


class Ours:
    def __init__(self, model_dir: Path, device: str, dtype: str, **settings: object) -> None:
        self.encoder = SpladeEncoder(str(model_dir), device=device, dtype=dtype, **settings)

    def __call__(self, texts: list[str]) -> object:
        """Its native output: the Arrow struct column."""
        return self.encoder.encode(texts)

    rows = staticmethod(sparse_rows)


# ---- measurement -------------------------------------------------------------------------------


def dense(rows: list[tuple[np.ndarray, np.ndarray]], vocab: int = 30522) -> np.ndarray:
    out = np.zeros((len(rows), vocab), dtype=np.float32)
    for r, (i, v) in enumerate(rows):
        out[r, i] = v
    return out


def agreement(got: np.ndarray, ref: np.ndarray, k: int = 64) -> dict[str, float]:
    top_got = np.argsort(-got, axis=1)[:, :k]
    top_ref = np.argsort(-ref, axis=1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top_got, top_ref)])
    rows = np.arange(len(ref))[:, None]
    rel = np.abs(got[rows, top_ref] - ref[rows, top_ref]) / np.maximum(ref[rows, top_ref], 1e-6)
    return {
        "max_abs_diff": float(np.abs(got - ref).max()),
        "top64_overlap": float(overlap),
        "top64_max_rel_err": float(rel.max()),
    }


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def peak_memory(fn: Callable[[], object], device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    status = Path("/proc/self/status")
    read = lambda key: next(int(l.split()[1]) for l in status.read_text().splitlines() if l.startswith(key)) * 1024  # noqa: E731,E741
    # Hand memory the methods before freed back to the OS first; otherwise a method reusing
    # the allocator's already resident pages would show no growth at all.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base = read("VmRSS:")
    fn()
    return read("VmHWM:") - base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["bert-base", "splade-tiny"], default="bert-base")
    p.add_argument("--mix", choices=["msmarco", "long"], default="msmarco")
    p.add_argument("--n", type=int, default=128, help="passages (default 128)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--st-batch-sizes", default="16,32,64,128", help="batch sizes tried for sentence-transformers' best")
    p.add_argument(
        "--ours",
        action="append",
        default=[],
        metavar="K=V[,K=V]",
        help="extra variant of ours, e.g. dtype=float32 or max_batch_tokens=65536 (repeatable)",
    )
    p.add_argument("--skip", default="", help="comma-separated methods to leave out (seed, st)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    device = args.device
    dtype_name = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    texts = passages(args.n, args.mix)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(args.model, Path(tmp) / "model")
        fpt = flops_per_token(model_dir)
        rate = matmul_rate(device, dtype)
        rate_fp32 = rate if dtype == torch.float32 else matmul_rate(device, torch.float32)
        rates = {dtype_name: rate, "float32": rate_fp32}

        def rate_for(method: str) -> float:
            """The matmul rate of the dtype a method computes in (named in its label)."""
            named = next((d for d in DTYPES if d in method), dtype_name)
            if named not in rates:
                rates[named] = matmul_rate(device, DTYPES[named])
            return rates[named]

        ref_encoder = SeedLoop(model_dir, device, torch.float32)
        tokens = int(sum(len(ids) for ids in ref_encoder.tok(texts, truncation=True, max_length=512)["input_ids"]))
        check = texts[:256]
        reference = dense(ref_encoder(check))
        backend = ref_encoder.tok.backend_tokenizer
        tokenize_s = min(_timed(lambda: backend.encode_batch(texts)) for _ in range(3))
        del ref_encoder

        methods: dict[str, Callable] = {}
        skip = set(filter(None, args.skip.split(",")))
        if "seed" not in skip:
            methods[f"seed loop (bs 32, {dtype_name})"] = SeedLoop(model_dir, device, dtype)
        if "st" not in skip:
            st = SentenceTransformersSparse(model_dir, device, dtype)
            methods[f"sentence-transformers (bs 32, {dtype_name})"] = st
            best_bs, best_t = 32, float("inf")
            for bs in map(int, args.st_batch_sizes.split(",")):
                st.batch_size = bs
                st(texts[: min(len(texts), 2048)])  # warm
                sync(device)
                t = time.perf_counter()
                st(texts[: min(len(texts), 2048)])
                sync(device)
                if time.perf_counter() - t < best_t:
                    best_bs, best_t = bs, time.perf_counter() - t
            st.batch_size = 32
            methods[f"sentence-transformers (bs {best_bs}, {dtype_name})"] = SentenceTransformersSparse(
                model_dir, device, dtype, best_bs
            )
        methods[f"ours (defaults, {dtype_name})"] = Ours(model_dir, device, dtype_name)
        for spec in args.ours:
            settings = dict(kv.split("=", 1) for kv in spec.split(","))
            typed = {k: _setting(k, v) for k, v in settings.items()}
            typed.setdefault("dtype", dtype_name)
            methods[f"ours ({spec})"] = Ours(model_dir, device, **typed)

        results: dict[str, dict] = {}
        for name, fn in methods.items():
            got = dense(fn.rows(fn(check)))
            results[name] = agreement(got, reference) | {"times": []}
            exact_dtype = name.endswith("float32)") or "dtype=float32" in name
            if exact_dtype and results[name]["max_abs_diff"] > 1e-4:
                raise SystemExit(f"{name}: vectors differ from the fp32 reference by {results[name]['max_abs_diff']}")
        for fn in methods.values():  # warm-up pass over everything
            fn(texts)
        for _ in range(args.reps):
            for name, fn in methods.items():
                sync(device)
                t = time.perf_counter()
                fn(texts)
                sync(device)
                results[name]["times"].append(time.perf_counter() - t)
            # The machine's matmul rate, probed between the methods and the best kept: one probe
            # taken while something else held the cores read low and printed an MFU over 100%.
            for named in list(rates):
                rates[named] = max(rates[named], matmul_rate(device, DTYPES[named]))
        rate, rate_fp32 = rates[dtype_name], rates["float32"]
        for name, fn in methods.items():
            results[name]["peak_bytes"] = peak_memory(lambda fn=fn: fn(texts[: min(len(texts), 4096)]), device)

    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(
        f"\n{args.model}, {args.mix} mix, {len(texts)} passages, {tokens / len(texts):.1f} real tokens/passage, "
        f"{device} ({gpu}), {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"matmul rate: {rate / 1e12:.2f} TFLOP/s {dtype_name}"
        + (f", {rate_fp32 / 1e12:.2f} fp32" if rate_fp32 != rate else "")
    )
    print(f"tokenizing alone (fast tokenizer, one batch): {tokenize_s:.2f} s = {len(texts) / tokenize_s:.0f} docs/s")
    header = f"{'method':<58}{'docs/s':>10}{'tokens/s':>12}{'MFU':>7}{'peak MiB':>10}{'max|d|':>10}{'top64':>7}"
    print(header)
    seed_name = next((n for n in results if n.startswith("seed")), None)
    for name, r in results.items():
        t = statistics.median(r["times"])
        r |= {"docs_per_s": len(texts) / t, "tokens_per_s": tokens / t}
        r["mfu"] = fpt * tokens / t / rate_for(name)
        print(
            f"{name:<58}{r['docs_per_s']:>10.1f}{r['tokens_per_s']:>12.0f}{r['mfu']:>7.1%}"
            f"{r['peak_bytes'] / 2**20:>10.0f}"
            f"{r['max_abs_diff']:>10.1e}{r['top64_overlap']:>7.3f}"
        )
    for name, fn in methods.items():
        screen = getattr(getattr(fn, "encoder", None), "screen", None)
        if screen is not None and screen.documents:
            results[name]["screen_terms_per_doc"] = screen.kept / screen.documents
            print(
                f"{name}: bf16 screen kept {screen.kept / screen.documents:.0f} of {fn.encoder.vocab_size} terms "
                "per document for the fp32 recompute"
            )
    ours = results[next(n for n in results if n.startswith("ours (defaults"))]
    for name, r in results.items():
        if not name.startswith("ours (defaults"):
            print(f"ours (defaults) / {name}: {ours['docs_per_s'] / r['docs_per_s']:.2f}x docs/s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": gpu,
                    "model": args.model,
                    "mix": args.mix,
                    "n": len(texts),
                    "tokens": tokens,
                    "flops_per_token": fpt,
                    "matmul_rate": rate,
                    "matmul_rate_fp32": rate_fp32,
                    "tokenize_s": tokenize_s,
                    "seed": seed_name,
                    "results": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
