"""``splade-pipeline`` command line: subcommands only, the work lives in the modules they call."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline.bundled import SPLADE_TINY
from pipeline.config import JobConfig, load_config, redacted

SECTIONS = ("input", "encoder", "output", "compute", "sink", "reindex")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splade-pipeline", description="SPLADE sparse vectors for large corpora, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    encode = sub.add_parser(
        "encode",
        help="run the encoding job (Ray Data): input files -> SPLADE vectors in Parquet + _SUMMARY.json",
        description="Run the encoding job. Every config field is also a flag; flags override the YAML file.",
    )
    encode.add_argument("--config", type=Path, help="YAML job config (sections: input, encoder, output, compute)")
    encode.add_argument("--show-config", action="store_true", help="print the resolved config (secrets masked) and exit")
    flags = _add_config_flags(encode)

    reindex = sub.add_parser(
        "reindex",
        help="update an output (and its store) to the corpus now: encode new and changed documents, delete removed ones",
        description="Incremental reindex against the output's last commit (per document: id + content hash + encoding "
        "fingerprint). Takes the same flags as encode.",
    )
    reindex.add_argument("--config", type=Path, help="YAML job config (the same as the encoding job's)")
    reindex.add_argument("--dry-run", action="store_true", help="print new / changed / unchanged / deleted counts; encode and change nothing")
    reindex.add_argument("--allow-mass-delete", action="store_true", help="allow deleting more than reindex.max_delete_percent of the indexed documents")
    reindex_flags = _add_config_flags(reindex)

    upsert = sub.add_parser(
        "upsert", help="load an encoded output into the configured vector store (no re-encoding)",
        description="Upsert the vectors of an encoded output (its data/ folder) into sink.*; takes the same flags as encode.",
    )
    upsert.add_argument("--from", dest="source", required=True, help="the encoded output folder/prefix (the job's output.path)")
    upsert.add_argument("--config", type=Path, help="YAML job config (its sink section says where to load)")
    upsert_flags = _add_config_flags(upsert)

    search = sub.add_parser("search", help="encode queries with the job's model and print the store's top hits")
    search.add_argument("queries", nargs="+", help="query texts")
    search.add_argument("--k", type=int, default=10, help="hits per query (default: 10)")
    search.add_argument("--config", type=Path, help="YAML job config (encoder and sink sections are used)")
    search_flags = _add_config_flags(search)

    demo = sub.add_parser("demo", help="the built-in default: encode the shipped sample corpus with the bundled SPLADE-tiny")
    demo.add_argument("--output", default="out/demo", help="output folder (default: out/demo)")

    terms = sub.add_parser("terms", help="print the weighted terms of each text")
    terms.add_argument("texts", nargs="+", help="texts to encode")
    terms.add_argument("--model", default=SPLADE_TINY, help=f"model id or folder (default: {SPLADE_TINY})")
    terms.add_argument("--top", type=int, default=20, help="terms shown per text (default: 20)")

    sub.add_parser("fetch-model", help=f"download and verify {SPLADE_TINY} into the cache; print its folder")

    args = parser.parse_args(argv)
    flags = {"encode": flags, "reindex": reindex_flags, "upsert": upsert_flags, "search": search_flags}.get(args.command, {})
    from pipeline import run

    run.STOP_ON_SIGTERM = True  # a command-line run stops on SIGTERM as on Ctrl-C (see ensure_ray)
    run.stop_on_sigterm()
    try:
        return _dispatch(args, flags)
    except KeyboardInterrupt:
        print(f"splade-pipeline {args.command}: interrupted. Work already recorded is kept (the output's last commit "
              "and its progress records); run the same command again to resume.", file=sys.stderr, flush=True)
        return 130
    except Exception as err:  # noqa: BLE001 - users get one clear line, not a traceback
        message, user_error = explain(err)
        print(f"splade-pipeline {args.command}: error: {message}", file=sys.stderr)
        if not user_error:
            raise
        return 2


def _dispatch(args: argparse.Namespace, flags: dict[str, str]) -> int:
    overrides = {dotted: getattr(args, dest) for dest, dotted in flags.items() if getattr(args, dest) is not None}
    config = load_config(args.config, overrides) if flags else None
    if args.command in ("upsert", "search") and not config.sink.type:
        raise ValueError("sink.type: no vector store configured; set sink.type (e.g. --sink-type qdrant) or a sink section in --config")
    if args.command == "upsert":
        from pipeline.upsert import upsert_output

        result = upsert_output(config, args.source)
        print(f"upserted {result['upserted']} vectors into {result['store']} in {result['seconds']} s "
              f"({result['vectors_per_s']} vectors/s); it holds {result['store_count']}; empty vectors rejected: "
              f"{result['rejected_empty_vectors']}")
    elif args.command == "search":
        from pipeline.search import search

        for query, hits in zip(args.queries, search(config, args.queries, args.k)):
            print(f"{query!r}:")
            for rank, (doc_id, score) in enumerate(hits, 1):
                print(f"  {rank:>2}. {doc_id}  {score:.4f}")
    elif args.command == "encode":
        if args.show_config:
            print(json.dumps(redacted(config), indent=2))
            return 0
        from pipeline.run import run_job

        run_job(config)
    elif args.command == "reindex":
        from pipeline.reindex import run_reindex

        run_reindex(config, dry_run=args.dry_run, allow_mass_delete=args.allow_mass_delete)
    elif args.command == "demo":
        from pipeline.demo import run_demo

        run_demo(args.output)
    elif args.command == "terms":
        from pipeline.encoder import SpladeEncoder

        encoder = SpladeEncoder(args.model)
        for text, weights in zip(args.texts, encoder.decode(encoder.encode(args.texts), top=args.top)):
            print(f"{text!r}: " + ", ".join(f"{t} {w:.2f}" for t, w in weights.items()))
    elif args.command == "fetch-model":
        from pipeline.bundled import fetch_splade_tiny

        print(fetch_splade_tiny())
    return 0


def _add_config_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """One flag per config field (``--top-k``, ``--input``...), documented from the model; returns dest -> dotted path."""
    leaves: list[tuple[str, str, Any]] = []
    for section in SECTIONS:
        model: type[BaseModel] = JobConfig.model_fields[section].default_factory().__class__
        leaves += [(section, name, field) for name, field in model.model_fields.items()]
    names = [((f.json_schema_extra or {}).get("flag") or n) for _, n, f in leaves]
    flags = {}
    groups = {section: parser.add_argument_group(f"{section} settings") for section in SECTIONS}
    for (section, name, field), flag in zip(leaves, names):
        if names.count(flag) > 1 or (section in ("sink", "reindex") and not flag.startswith(section)):
            flag = f"{section}_{flag}"
        dest = f"cfg_{section}_{name}"
        default = field.get_default(call_default_factory=True)
        group, kind, metavar = groups[section], _kind(field.annotation), name.upper()
        help_text = f"{field.description} [{section}.{name}; default: {default!r}]"
        if kind == "list":
            group.add_argument(
                f"--{flag.replace('_', '-')}", dest=dest, action="extend", type=_split, metavar=metavar,
                help=help_text + " (repeat or comma-separate)",
            )
        else:
            parse = str if kind == "str" else _yaml_value
            group.add_argument(f"--{flag.replace('_', '-')}", dest=dest, type=parse, metavar=metavar, help=help_text)
        flags[dest] = f"{section}.{name}"
    return flags


def _kind(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list:
        return "list"
    if annotation is str or (args and set(args) <= {str, type(None)}):
        return "str"
    return "value"


def _split(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def _yaml_value(value: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def explain(err: BaseException) -> tuple[str, bool]:
    """The message a user should see, and whether the error is theirs (bad input or settings) or the store's."""
    from pipeline.config import ConfigError
    from pipeline.errors import find_cause
    from pipeline.lock import LockedError
    from pipeline.output import OutputError
    from pipeline.sinks import SinkError

    known = find_cause(err, (ConfigError, SinkError, LockedError, ValueError, TypeError, OSError))  # type: ignore[arg-type]
    if known is None:
        return str(err).strip().splitlines()[0], False
    whole = (ConfigError, SinkError, LockedError, OutputError)  # messages written to be read in full
    return (str(known) if isinstance(known, whole) else str(known).strip().splitlines()[0]), True


if __name__ == "__main__":
    sys.exit(main())
