"""Peak extra memory and time of SPLADE pooling: full logits vs our two heads.

``naive``: full logits, ``log1p(relu) * mask``, max (the usual snippet; sentence-transformers'
SpladePooling holds the same full logits). ``chunked``: the padded path's running masked max
over a few positions at a time. ``packed``: the padding-free path's head on packed rows in
vocabulary slices (the CPU default). Same hidden states, same bert-base-shaped MLM head
(hidden 768, vocab 30522, random weights), batch 64 x 512 real tokens by default. Each method
runs in its own child process; on CPU the peak is the process's high-water RSS (reset through
/proc/self/clear_refs just before the
pooling starts) minus its RSS at that moment; on CUDA it is torch's peak allocation above the
allocation before pooling. The two results are compared before any number is printed.

    python -m benchmarks.pooling_memory [--batch 64] [--seq 512] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _pool(
    method: str, head: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor, lengths: list[int], chunk: int
) -> torch.Tensor:
    from pipeline.encode import splade

    if method == "naive":
        weights = torch.log1p(torch.relu(head(hidden))) * mask.unsqueeze(-1)
        return weights.amax(dim=1)
    if method == "packed":
        rows = hidden.reshape(-1, hidden.shape[-1])  # every position is real here
        pred = head.predictions
        return splade.splade_activation_(splade.packed_max_logits(rows, lengths, pred.transform, pred.decoder, chunk))
    return splade.splade_activation_(splade.pooled_max_logits(hidden, mask, lengths, head, 30522, chunk))


def _child(method: str, batch: int, seq: int, chunk: int, device: str, out: str) -> None:
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertOnlyMLMHead

    torch.manual_seed(0)
    head = BertOnlyMLMHead(BertConfig()).eval().to(device)
    hidden = torch.randn(batch, seq, 768, device=device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    lengths = [seq] * batch
    with torch.inference_mode():
        # Warm up kernels (CUDA loads them lazily) on a slice, outside the measurement.
        _pool(method, head, hidden[:2, :64], mask[:2, :64], [64, 64], chunk)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            base = _rss_kib("VmRSS") * 1024
        start = time.perf_counter()
        result = _pool(method, head, hidden, mask, lengths, chunk)
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = _rss_kib("VmHWM") * 1024 - base
        seconds = time.perf_counter() - start
    np.save(out, result.float().cpu().numpy())
    print(json.dumps({"method": method, "peak_extra_bytes": peak, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="head_chunk_tokens (default: the encoder's: 512 chunked and 2048 packed on CPU, 4096 CUDA)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--child", choices=["naive", "chunked", "packed"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.batch, args.seq, args.chunk, args.device, args.out)
        return
    chunks = {
        "naive": 0,
        "chunked": args.chunk or (4096 if args.device == "cuda" else 512),
        "packed": args.chunk or (4096 if args.device == "cuda" else 2048),
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method, chunk in chunks.items():
            out = f"{tmp}/{method}.npy"
            cmd = [
                sys.executable,
                __file__,
                "--child",
                method,
                "--out",
                out,
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--chunk",
                str(chunk),
                "--device",
                args.device,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1]) | {
                "vectors": np.load(out),
                "chunk": chunk,
            }
    naive = results["naive"]
    diffs = {m: float(np.abs(naive["vectors"] - results[m]["vectors"]).max()) for m in ("chunked", "packed")}
    for method, diff in diffs.items():
        assert diff <= 1e-5, f"{method} pooling differs from full logits by {diff}"
    print(f"pooling {args.batch} x {args.seq} tokens, vocab 30522, hidden 768, {args.device}")
    print(f"{'method':<22}{'peak extra MiB':>16}{'seconds':>10}{'memory vs naive':>17}{'speed vs naive':>16}")
    for method, r in results.items():
        label = method if method == "naive" else f"{method} (chunk {r['chunk']})"
        print(
            f"{label:<22}{r['peak_extra_bytes'] / 2**20:>16.1f}{r['seconds']:>10.2f}"
            f"{naive['peak_extra_bytes'] / max(r['peak_extra_bytes'], 1):>16.1f}x"
            f"{naive['seconds'] / r['seconds']:>15.2f}x"
        )
    print("max |diff| vs naive: " + ", ".join(f"{m} {d:.2e}" for m, d in diffs.items()))
    if args.json:
        summary = {k: {kk: vv for kk, vv in v.items() if kk != "vectors"} for k, v in results.items()}
        args.json.write_text(json.dumps(summary | {"max_abs_diff": diffs, "device": args.device}, indent=2))


if __name__ == "__main__":
    main()
