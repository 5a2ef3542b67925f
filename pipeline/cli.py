"""``splade-pipeline`` command line: subcommands only, the work lives in the modules they call."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.bundled import SPLADE_TINY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splade-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="encode the shipped sample corpus with the bundled SPLADE-tiny (offline)")
    demo.add_argument("--output", type=Path, default=Path("out/demo"), help="output folder (default: out/demo)")
    demo.add_argument("--model", default=SPLADE_TINY, help=f"model id or folder (default: {SPLADE_TINY})")

    terms = sub.add_parser("terms", help="print the weighted terms of each text")
    terms.add_argument("texts", nargs="+", help="texts to encode")
    terms.add_argument("--model", default=SPLADE_TINY, help=f"model id or folder (default: {SPLADE_TINY})")
    terms.add_argument("--top", type=int, default=20, help="terms shown per text (default: 20)")

    sub.add_parser("fetch-model", help=f"download and verify {SPLADE_TINY} into the cache; print its folder")

    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"splade-pipeline {args.command}: error: {err}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from pipeline.demo import run_demo

        run_demo(args.output, args.model)
    elif args.command == "terms":
        from pipeline.encoder import SpladeEncoder

        encoder = SpladeEncoder(args.model)
        for text, weights in zip(args.texts, encoder.decode(encoder.encode(args.texts), top=args.top)):
            print(f"{text!r}: " + ", ".join(f"{t} {w:.2f}" for t, w in weights.items()))
    elif args.command == "fetch-model":
        from pipeline.bundled import fetch_splade_tiny

        print(fetch_splade_tiny())
    return 0


if __name__ == "__main__":
    sys.exit(main())
