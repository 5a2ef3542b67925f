"""``splade-pipeline`` command line: subcommands only, the work lives in the modules they call."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import traceback
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from pydantic import BaseModel

from pipeline import terminal
from pipeline.config import JobConfig, load_config, redacted
from pipeline.encode.bundled import SPLADE_TINY
from pipeline.errors import PipelineError, SettingError, find_cause
from pipeline.redaction import scrub

SECTIONS = ("input", "encoder", "output", "compute", "sink", "reindex")
RESULTS_THREAD = "splade-pipeline-results"  # the thread that drives a run's Ray Data plan (pipeline.job.steps)


def run(argv: list[str] | None = None) -> NoReturn:
    """The process entry point (``splade-pipeline``, ``python -m pipeline.cli``, ``jobs/*.py``): main,
    then an exit that skips C++ static destructors.

    After delta-rs has run in a process, Arrow's thread pools and delta-rs's runtime can tear each
    other down at interpreter exit and abort it ("terminate called without an active exception",
    exit status 134) although the command succeeded: measured on this machine in 3 to 9 of 10
    runs of a deltalake call followed by a threaded Parquet read (delta-rs issue 2184 is the same
    crash). So the command's own exit status is kept: Ray (when this process started or joined it)
    and logging are shut down, output flushed, and the process ends with ``os._exit``.
    """
    try:
        code = main(argv, ending=True)
    except SystemExit as stop:  # argparse's usage errors and --help
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    except BaseException:  # noqa: BLE001 - a bug: its traceback, then the same exit as Python's
        print(scrub(traceback.format_exc()), file=terminal.err())  # no secret in a traceback either
        code = 1
    _exit(code)


def _exit(code: int) -> NoReturn:
    if "ray" in sys.modules:
        import ray

        # A run stopped early (Ctrl-C, SIGTERM, an error) may leave the thread that drives Ray Data
        # blocked inside Ray: shutting Ray down under it aborts the process (SIGABRT) instead of
        # exiting with the run's status. The process ends anyway, and Ray cleans up after a driver
        # that is gone (a local Ray this process started has a reaper), so it is left as it is.
        pumping = any(t.name == RESULTS_THREAD and t.is_alive() for t in threading.enumerate())
        if ray.is_initialized() and not pumping:
            # A run that stopped early leaves Ray Data's executor running in its thread: shutting
            # it down from under it makes Ray log the executor's traceback, which is no news.
            logging.getLogger("ray.data").setLevel(logging.CRITICAL)
            ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


QUIET_COMMANDS = {"encode", "reindex", "demo", "upsert", "verify", "repair", "rollback"}  # they start Ray or Spark


def main(argv: list[str] | None = None, *, ending: bool = False) -> int:
    """The command line (``ending``: the process ends after it, see :func:`run`)."""
    parser, flags = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv  # before or after the command
    args = parser.parse_args([a for a in argv if a != "--verbose"])
    quiet = args.command in QUIET_COMMANDS and not verbose and not getattr(args, "show_config", False)
    with terminal.quiet(args.command, enabled=quiet, keep=ending) as log_file:
        if log_file is not None:
            print(f"splade-pipeline {args.command}: logs in {log_file} (--verbose shows them here)", flush=True)
        return _command(args, flags)


def _command(args: argparse.Namespace, flags: dict[str, dict[str, str]]) -> int:
    from pipeline.job.cluster import stop_on_sigterm

    stop_on_sigterm()  # before Ray starts too; compute.stop_on_sigterm keeps it once Ray has started
    try:
        return _dispatch(args, flags.get(args.command, {}))
    except KeyboardInterrupt:
        print(
            f"splade-pipeline {args.command}: interrupted. Files already written are kept (each describes itself); "
            "run the same command again to resume.",
            file=terminal.err(),
            flush=True,
        )
        return 130
    except Exception as err:  # noqa: BLE001 - users get one clear message, not a traceback
        message, user_error = explain(err)
        print(f"splade-pipeline {args.command}: error: {scrub(message)}", file=terminal.err())
        if not user_error:
            raise
        return 2


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, dict[str, str]]]:
    """The parser, and per job command its config flags (argparse dest -> dotted config path)."""
    parser = argparse.ArgumentParser(
        prog="splade-pipeline", description="SPLADE sparse vectors for large corpora, on Ray."
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show Ray's and the libraries' logs here instead of in a log file"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    flags: dict[str, dict[str, str]] = {}
    _add_job_commands(sub, flags)
    _add_store_commands(sub, flags)
    _add_table_commands(sub, flags)
    _add_output_commands(sub)
    _add_reading_commands(sub)
    demo = sub.add_parser("demo", help="the built-in default: encode the shipped sample corpus with SPLADE-tiny")
    demo.add_argument("--output", default="out/demo", help="output folder (default: out/demo)")
    terms = sub.add_parser("terms", help="print the weighted terms of each text")
    terms.add_argument("texts", nargs="+", help="texts to encode")
    terms.add_argument("--model", default=SPLADE_TINY, help=f"model id or folder (default: {SPLADE_TINY})")
    terms.add_argument("--top", type=int, default=20, help="terms shown per text (default: 20)")
    sub.add_parser("fetch-model", help=f"download and verify {SPLADE_TINY} into the cache; print its folder")
    return parser, flags


def _add_job_commands(sub: Any, flags: dict[str, dict[str, str]]) -> None:
    """The commands that encode: encode, reindex."""
    encode = _job_command(
        sub,
        flags,
        "encode",
        "run the encoding job (Ray Data): input files -> SPLADE vectors in Parquet + _SUMMARY.json",
        "Run the encoding job. Every config field is also a flag; flags override the YAML file.",
        "YAML job config (sections: input, encoder, output, compute)",
    )
    encode.add_argument(
        "--show-config", action="store_true", help="print the resolved config (secrets masked) and exit"
    )
    _engine_flags(encode)

    reindex = _job_command(
        sub,
        flags,
        "reindex",
        "update an output (and its store) to the corpus now: encode new and changed documents, delete removed ones",
        "Incremental reindex against the output's last commit (per document: id + content hash + encoding "
        "fingerprint). Takes the same flags as encode.",
        "YAML job config (the same as the encoding job's)",
    )
    reindex.add_argument(
        "--dry-run", action="store_true", help="print new / changed / unchanged / deleted counts; change nothing"
    )
    _engine_flags(reindex)
    reindex.add_argument(
        "--allow-mass-delete",
        action="store_true",
        help="allow deleting more than reindex.max_delete_percent of the indexed documents",
    )


def _add_store_commands(sub: Any, flags: dict[str, dict[str, str]]) -> None:
    """The commands that load, check or search a vector store: upsert, verify, repair, search."""
    upsert = _job_command(
        sub,
        flags,
        "upsert",
        "load an encoded output into the configured vector store (no re-encoding)",
        "Upsert the vectors of an encoded output into sink.*; takes the same flags as encode.",
        "YAML job config (its sink section says where to load)",
    )
    upsert.add_argument("--from", dest="source", required=True, help="the encoded output (the job's output.path)")

    for name, short, long, after in (
        (
            "verify",
            "compare the vector store with the output's latest version: count, every id, a sample of vectors",
            "Compare sink.* with the latest version of an encoded output: counts, every id, and the vectors of a "
            "sample of documents by value. Exit status 1 when they differ.",
            "documents whose vectors are compared (1000)",
        ),
        (
            "repair",
            "make the vector store equal to the output's latest version (delete extra ids, load every vector)",
            "Delete the ids sink.* holds that the output's latest version lacks, upsert every vector of that version, "
            "record it as the store's version and verify. Exit status 1 if it still differs.",
            "documents compared afterwards (1000)",
        ),
    ):
        check = _job_command(sub, flags, name, short, long, "YAML job config (its sink section names the store)")
        check.add_argument("--from", dest="source", help="the encoded output (default: output.path)")
        check.add_argument("--sample", type=int, default=1000, help=after)
    search = _job_command(
        sub,
        flags,
        "search",
        "encode queries with the job's model and print the store's top hits",
        "Encode the queries (encoder.query_model, else the job's model) and print the store's top hits.",
        "YAML job config (encoder and sink sections are used)",
    )
    search.add_argument("queries", nargs="+", help="query texts")
    search.add_argument("--k", type=int, default=10, help="hits per query (default: 10)")
    search.add_argument(
        "--group-by-parent",
        action="store_true",
        help="a store of windows (encoder.long_documents: split): the top documents, each by its best window",
    )


def _add_table_commands(sub: Any, flags: dict[str, dict[str, str]]) -> None:
    """The commands on the table's versions: history, rollback, vacuum."""
    _job_command(
        sub,
        flags,
        "history",
        "list the output table's versions: time, operation, rows added and removed, fingerprint",
        "List the versions of the output's Delta table (output.path), newest first.",
        "YAML job config (its output section says where the table is)",
    )
    rollback = _job_command(
        sub,
        flags,
        "rollback",
        "make an earlier version of the output table the latest (and re-sync the store, when configured)",
        "Restore an earlier version of the output's Delta table as a new version; the rejects table and the "
        "configured store follow it.",
        "YAML job config (output and sink sections)",
    )
    rollback.add_argument("--to-version", type=int, required=True, help="the version to restore (see history)")
    vacuum = _job_command(
        sub,
        flags,
        "vacuum",
        "delete files no version of the last output.retention_days reads (default 7 days)",
        "Delete the files of the output table (and its rejects table) that no version within output.retention_days "
        "reads, and files never committed that are older than that.",
        "YAML job config (its output section)",
    )
    vacuum.add_argument("--dry-run", action="store_true", help="list the files that would be deleted; delete nothing")


def _add_output_commands(sub: Any) -> None:
    """Commands that tell what an output holds: status, the run report."""
    status = sub.add_parser(
        "status",
        help="what an output holds and what is happening to it: last version, documents, fingerprint, runs, stores",
        description="Read an output and say: its last committed version and time, documents and rejects, the "
        "fingerprint of its vectors, a run in progress (who, since when, how far) or one that stopped without "
        "committing, files written and not committed, and each store loaded from it (up to date, or a load that did "
        "not finish).",
    )
    status.add_argument("--output", dest="source", help="the output (default: --config's output.path)")
    status.add_argument("--config", type=Path, help="YAML job config (its output section: how to reach it)")
    status.add_argument("--json", dest="as_json", action="store_true", help="print the status as JSON")
    report = sub.add_parser(
        "report",
        help="build the run report (_REPORT.html: throughput, lengths, non-zeros, top terms, rejects) again",
        description="Build _REPORT.html beside _SUMMARY.json again from the output's summary and latest table "
        "version (every run writes it at its end).",
    )
    report.add_argument("--from", dest="source", help="the output (default: --config's output.path)")
    report.add_argument("--config", type=Path, help="YAML job config (its output section: how to reach it)")


def _add_reading_commands(sub: Any) -> None:
    """Commands that read a committed output: exports and retrieval evaluation."""
    export = sub.add_parser(
        "export",
        help="write the output's vectors for a search engine (Anserini, OpenSearch, Elasticsearch) or as JSON lines",
        description="Stream the latest version of an encoded output into sharded JSON-lines files for a search "
        "engine, with the model's token strings and a header file (_EXPORT.json) naming the version and "
        "fingerprint. Storage options and table options come from --config's output section.",
    )
    export.add_argument("--config", type=Path, help="YAML job config (its output section: where, how to reach it)")
    export.add_argument("--from", dest="source", help="the encoded output (default: output.path)")
    export.add_argument(
        "--format", dest="export_format", required=True, help="anserini, opensearch, elasticsearch or jsonl"
    )
    export.add_argument("--to", dest="export_to", required=True, help="an empty local folder or fsspec URL")
    export.add_argument("--quantize", type=int, default=100, help="anserini: integer weights = round(w * this) (100)")
    export.add_argument("--index", dest="export_index", default="splade", help="opensearch/elasticsearch: index name")
    export.add_argument("--field", dest="export_field", default="splade", help="opensearch/elasticsearch: the field")
    export.add_argument("--contents-column", help="anserini: a passthrough column for 'contents' (default: empty)")
    export.add_argument("--shard-docs", type=int, default=100_000, help="documents per file (100000)")
    export.add_argument(
        "--vocab-model", help="the model whose tokenizer names the terms (default: the one the output was encoded with)"
    )

    evaluate = sub.add_parser(
        "evaluate",
        help="retrieval quality of an output (MRR@10, nDCG@10, Recall@100) on judged queries",
        description="Encode judged queries, score every document of the output's latest version by exact dot "
        "product (in bounded memory), and report MRR@10, nDCG@10 and Recall@100 (ir-measures). A BEIR folder "
        "(queries.jsonl, qrels/test.tsv) is taken as it is. Storage and table options come from --config.",
    )
    evaluate.add_argument("--config", type=Path, help="YAML job config (its output section: how to reach outputs)")
    evaluate.add_argument("--from", dest="source", help="the encoded output (default: output.path)")
    evaluate.add_argument("--queries", required=True, help="a BEIR folder, queries.jsonl ({_id, text}) or id<TAB>text")
    evaluate.add_argument("--qrels", help="BEIR qrels TSV or TREC qrels (default: <BEIR folder>/qrels/test.tsv)")
    evaluate.add_argument("--compare", help="a second output: the same metrics side by side, per-query differences")
    evaluate.add_argument(
        "--prune-sweep", type=_top_ks, default=(), help="top_k values, e.g. 32,64,128,256: metrics and index size each"
    )
    evaluate.add_argument("--depth", type=int, default=100, help="documents retrieved per query (default: 100)")
    evaluate.add_argument(
        "--model", dest="eval_model", help="query model (default: the one the output was encoded with)"
    )
    evaluate.add_argument("--query-model", dest="eval_query_model", help="a separate query encoder or IDF model")
    evaluate.add_argument(
        "--group-by-parent",
        action="store_true",
        help="an output of windows (encoder.long_documents: split): a document scores its best window",
    )
    evaluate.add_argument(
        "--through-store",
        action="store_true",
        help="rank with the vector store of --config (sink section, loaded from this output) instead of exactly",
    )
    evaluate.add_argument(
        "--out",
        dest="eval_out",
        help="a folder for EVALUATION.json and the sweep's plot (PNG); default with --prune-sweep: ./evaluation",
    )


def _top_ks(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _job_command(
    sub: Any, flags: dict[str, dict[str, str]], name: str, help: str, description: str, config_help: str
) -> argparse.ArgumentParser:
    """A subcommand that takes ``--config`` and one flag per config field."""
    command = sub.add_parser(name, help=help, description=description)
    command.add_argument("--config", type=Path, help=config_help)
    flags[name] = _add_config_flags(command)
    return command


def _engine_flags(command: Any) -> None:
    command.add_argument(
        "--engine",
        choices=["ray", "spark"],
        default="ray",
        help="what runs the tasks: ray (default) or spark (the active SparkSession, or spark-submit's)",
    )
    command.add_argument("--spark-master", help="with --engine spark and no session yet: e.g. local[4]")


def _engine(args: argparse.Namespace) -> Any:
    from pipeline.job.engine import RAY

    if args.engine == "ray":
        return RAY
    from pipeline.spark.job import session, spark_engine

    return spark_engine(session(args.spark_master))


def _dispatch(args: argparse.Namespace, flags: dict[str, str]) -> int:
    overrides = {dotted: getattr(args, dest) for dest, dotted in flags.items() if getattr(args, dest) is not None}
    overrides.setdefault("compute.stop_on_sigterm", True)  # a command-line run stops on SIGTERM as on Ctrl-C
    config = load_config(args.config, overrides) if flags else None
    if args.command in ("upsert", "search", "verify", "repair") and not config.sink.type:
        raise SettingError(
            "sink.type: no vector store configured; set sink.type (e.g. --sink-type qdrant) or a sink section in "
            "--config"
        )
    return COMMANDS[args.command](args, config) or 0


def _encode(args: argparse.Namespace, config: JobConfig) -> int:
    if args.show_config:
        print(json.dumps(redacted(config), indent=2))
        return 0
    from pipeline.job.encode import run_job

    engine = _engine(args)
    return 1 if run_job(config, engine=engine).get("errors") else 0  # the table is committed, the store is wrong


def _reindex(args: argparse.Namespace, config: JobConfig) -> int:
    from pipeline.job.reindex import run_reindex

    options = {"dry_run": args.dry_run, "allow_mass_delete": args.allow_mass_delete, "engine": _engine(args)}
    return 1 if run_reindex(config, **options).get("errors") else 0


def _upsert(args: argparse.Namespace, config: JobConfig) -> int:
    from pipeline.job.load import upsert_output

    result = upsert_output(config, args.source)
    print(
        f"upserted {result['upserted']} vectors into {result['store']} in {result['seconds']} s "
        f"({result['vectors_per_s']} vectors/s); it holds {result['store_count']}; empty vectors rejected: "
        f"{result['rejected_empty_vectors']}"
    )
    if result["count_error"]:
        print(f"ERROR: {result['count_error']}")
        return 1
    return 0


def _verify(args: argparse.Namespace, config: JobConfig) -> int:
    from pipeline.job.verify import verify_store

    report = verify_store(config, args.source, sample=args.sample)
    print(render_check(report))
    return 0 if report["ok"] else 1


def _repair(args: argparse.Namespace, config: JobConfig) -> int:
    from pipeline.job.verify import repair_store

    result = repair_store(config, args.source, sample=args.sample)
    print("before: " + render_check(result["before"]))
    print(
        f"repair: deleted {result['deleted_extra']} ids the table lacks, upserted {result['upserted']} vectors, "
        f"recorded table version {result['table_version']} as the store's"
    )
    print("after: " + render_check(result["after"]))
    return 0 if result["after"]["ok"] else 1


def render_check(report: dict[str, Any]) -> str:
    head = "OK" if report["ok"] else "DIFFERENT"
    lines = [
        f"{head}: {report['store']} against table version {report['table_version']}: the store holds "
        f"{report['store_count']} vectors ({report['store_ids']} ids listed), the table has {report['expected']} "
        f"documents that belong in it; vectors compared by value: {report['sampled']}"
    ]
    for kind, what in (
        ("missing", "in the table, not in the store"),
        ("extra", "in the store, not in the table"),
        ("different", "with a different vector"),
        ("twice", "held by two points each"),
    ):
        if report[kind]:
            lines.append(f"  {report[kind]} ids {what}, e.g. {report[f'{kind}_ids']}")
    if report["foreign"]:
        lines.append(f"  {report['foreign']} points without a document id (not written by splade-pipeline)")
    return "\n".join(lines)


def _history(args: argparse.Namespace, config: JobConfig) -> None:
    from pipeline.job.versions import history, render_history

    print(render_history(history(config)))


def _rollback(args: argparse.Namespace, config: JobConfig) -> None:
    from pipeline.job.versions import rollback

    result = rollback(config, args.to_version)
    print(
        f"restored version {result['restored']} of {config.output.path} as version {result['version']} "
        f"(it was at {result['rolled_back_from']})"
    )
    if "sink" in result:
        sink = result["sink"]
        print(
            f"  store {sink['store']}: upserted {sink['upserted']}, deleted {sink['deleted']}; "
            f"holds {sink['store_count']}"
        )


def _vacuum(args: argparse.Namespace, config: JobConfig) -> None:
    from pipeline.job.versions import vacuum

    result = vacuum(config, args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for name, files in result["files"].items():
        print(f"{name}: {verb} {len(files)} files older than {result['retention_days']} days")
        for f in files[:20]:
            print(f"  {f}")


def _search(args: argparse.Namespace, config: JobConfig) -> None:
    from pipeline.search import search

    hits_of = search(config, args.queries, args.k, group_by_parent=args.group_by_parent)
    for query, hits in zip(args.queries, hits_of, strict=True):
        print(f"{query!r}:")
        for rank, (doc_id, score) in enumerate(hits, 1):
            print(f"  {rank:>2}. {doc_id}  {score:.4f}")


def _demo(args: argparse.Namespace, config: None) -> None:
    from pipeline.demo import run_demo

    run_demo(args.output)


def _reading(args: argparse.Namespace) -> tuple[JobConfig, Any]:
    """For commands that read an output (``--from``, else ``--config``'s output.path): the config and
    the output's location, reached with the config's storage options."""
    from pipeline.output.location import OutputLocation

    config = load_config(args.config, {})
    return config, OutputLocation(args.source or config.output.path, config.output.storage_options)


def _status(args: argparse.Namespace, config: None) -> int:
    from pipeline.status import output_status, render_status

    config, source = _reading(args)
    status = output_status(source, config.output.table_options)
    print(scrub(json.dumps(status, indent=2) if args.as_json else render_status(status)))
    return 0


def _report(args: argparse.Namespace, config: None) -> int:
    from pipeline.report import rebuild_report

    config, source = _reading(args)
    print(f"report: {rebuild_report(source, config.output.table_options)}")
    return 0


def _export(args: argparse.Namespace, config: None) -> int:
    from pipeline.export import ExportSettings, export_output

    config, source = _reading(args)
    settings = ExportSettings(
        format=args.export_format,
        to=args.export_to,
        quantize=args.quantize,
        index=args.export_index,
        field=args.export_field,
        contents_column=args.contents_column,
        shard_docs=args.shard_docs,
    )
    options = config.output.storage_options
    header = export_output(
        source, settings, table_options=config.output.table_options, storage_options=options, model=args.vocab_model
    )
    print(
        f"exported {header['documents']} documents ({header['nonzeros']} terms) of table version "
        f"{header['table_version']} as {header['format']} into {len(header['files'])} files under {args.export_to} "
        f"in {header['seconds']} s ({header['docs_per_s']} docs/s); header: {args.export_to.rstrip('/')}/_EXPORT.json"
    )
    return 0


def _evaluate(args: argparse.Namespace, config: None) -> int:
    from pipeline.evaluate import EvalSettings, evaluate

    config, source = _reading(args)
    settings = EvalSettings(
        queries=args.queries,
        qrels=args.qrels,
        compare=args.compare,
        prune_sweep=args.prune_sweep,
        depth=args.depth,
        model=args.eval_model,
        query_model=args.eval_query_model or config.encoder.query_model,
        out=args.eval_out,
        group_by_parent=args.group_by_parent,
        through_store=args.through_store,
    )
    options = config.output.storage_options
    table = config.output.table_options
    evaluate(source, settings, table_options=table, storage_options=options, sink=config.sink)
    return 0


def _terms(args: argparse.Namespace, config: None) -> None:
    from pipeline.encode.encoder import SpladeEncoder

    encoder = SpladeEncoder(args.model)
    for text, weights in zip(args.texts, encoder.decode(encoder.encode(args.texts), top=args.top)):
        print(f"{text!r}: " + ", ".join(f"{t} {w:.2f}" for t, w in weights.items()))


def _fetch_model(args: argparse.Namespace, config: None) -> None:
    from pipeline.encode.bundled import fetch_splade_tiny

    print(fetch_splade_tiny())


COMMANDS: dict[str, Callable[[argparse.Namespace, Any], int | None]] = {
    "encode": _encode,
    "status": _status,
    "report": _report,
    "reindex": _reindex,
    "upsert": _upsert,
    "verify": _verify,
    "repair": _repair,
    "history": _history,
    "rollback": _rollback,
    "vacuum": _vacuum,
    "export": _export,
    "evaluate": _evaluate,
    "search": _search,
    "demo": _demo,
    "terms": _terms,
    "fetch-model": _fetch_model,
}


def _add_config_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """One flag per config field (``--top-k``, ``--input``...), documented from the model; returns
    dest -> dotted path."""
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
                f"--{flag.replace('_', '-')}",
                dest=dest,
                action="extend",
                type=_split,
                metavar=metavar,
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
    """``a,b`` or a YAML/JSON list (``'["a", "b"]'``, as a config file would write it)."""
    if value.lstrip().startswith("["):
        parsed = _yaml_value(value)
        if isinstance(parsed, list):
            return [str(v) for v in parsed]
    return [v for v in value.split(",") if v]


def _yaml_value(value: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def explain(err: BaseException) -> tuple[str, bool]:
    """The message a user should see, and whether the error is theirs (a :class:`PipelineError`:
    bad input or settings, an unusable output, a store refusing) or a bug."""
    known = find_cause(err, PipelineError)
    if known is None:
        return str(err).strip().splitlines()[0], False
    return str(known), True


if __name__ == "__main__":
    run()
