"""The typed config: values are not coerced, bounds hold, empty YAML sections are sections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ComputeConfig, ConfigError, load_config


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"encoder.top_k": "5"}, "encoder.top_k: Input should be a valid integer (got '5')"),
        ({"output.overwrite": "yes"}, "output.overwrite: Input should be a valid boolean (got 'yes')"),
        ({"encoder.max_length": 256.0}, "encoder.max_length: Input should be a valid integer (got 256.0)"),
        ({"output.retention_days": -1}, "output.retention_days: Input should be greater than or equal to 0"),
        ({"input.max_line_bytes": 10}, "input.max_line_bytes: Input should be greater than or equal to 1024"),
    ],
)
def test_wrong_types_and_bounds_are_named_not_coerced(override: dict, named: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(None, override)
    assert named in str(raised.value)


def test_numbers_keep_their_natural_types() -> None:
    config = load_config(None, {"compute.num_gpus_per_actor": 1, "encoder.top_k": 64, "output.overwrite": True})
    assert config.compute.num_gpus_per_actor == 1.0 and config.encoder.top_k == 64 and config.output.overwrite


def test_an_empty_section_takes_flags(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("sink:\nreindex:\noutput: {path: out/x}\n")
    config = load_config(job, {"sink.type": "qdrant"})
    assert config.sink.type == "qdrant" and config.output.path == "out/x"
    assert load_config(job).sink.type is None
    job.write_text("sink: 3\n")
    with pytest.raises(ConfigError, match="sink must be a mapping"):
        load_config(job, {"sink.type": "qdrant"})


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ({"input.paths": ["https://reader:hunter2@data.example.com/corpus/"]}, "input.paths[0]"),
        ({"output.path": "ftp://writer:hunter2@files.example.com/out"}, "output.path"),
        ({"sink.type": "qdrant", "sink.url": "http://admin:hunter2@qdrant:6333"}, "sink.url"),
        (
            {"output.storage_options": {"connection_string": "AccountName=a;AccountKey=hunter2hunter2=="}},
            "output.storage_options.connection_string",
        ),
        ({"input.storage_options": {"headers": {"Authorization": "Bearer hunter2hunter2"}}}, "Authorization"),
        (
            {"input.storage_options": {"client_kwargs": {"endpoint_url": "https://x.blob.example/?sv=1&sig=hunter2"}}},
            "endpoint_url",
        ),
    ],
)
def test_credentials_refused_by_name_and_by_value(override: dict, where: str, capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main

    with pytest.raises(ConfigError) as raised:
        load_config(None, override)
    assert where in str(raised.value) and "hunter2" not in str(raised.value)
    flags = {"input.paths": "--input", "output.path": "--output", "sink.url": "--sink-url"}
    dotted, value = next(iter(override.items()))
    if dotted in flags:  # the command line names the field, and never echoes the secret
        args = ["encode", flags[dotted], value[0] if isinstance(value, list) else value, "--show-config"]
        assert main(args + (["--sink-type", "qdrant"] if dotted == "sink.url" else [])) == 2
        out = capsys.readouterr()
        assert where.split("[")[0] in out.err and "hunter2" not in out.err + out.out


def test_store_key_variables_are_the_stores_own_or_prefixed() -> None:
    with pytest.raises(ConfigError, match="'AWS_SECRET_ACCESS_KEY' is not a store key variable"):
        load_config(
            None, {"sink.type": "qdrant", "sink.url": "http://q:6333", "sink.api_key_env": "AWS_SECRET_ACCESS_KEY"}
        )
    for name in ("QDRANT_API_KEY", "SPLADE_PIPELINE_QDRANT_KEY"):
        assert load_config(None, {"sink.type": "qdrant", "sink.api_key_env": name}).sink.api_key_variable == name


def test_scrub_masks_credentials_and_secret_environment_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.redaction import scrub

    monkeypatch.setenv("PINECONE_API_KEY", "pc-0123456789abcdef")
    monkeypatch.setenv("SPLADE_PIPELINE_STORE_KEY", "sk-live-abcdef")
    text = (
        "GET https://u:pw123@host/x?sig=abc&sv=1 failed; AccountKey=Zm9vYmFy==; Authorization: Bearer abcdefghijkl; "
        "key pc-0123456789abcdef and sk-live-abcdef"
    )
    clean = scrub(text)
    for secret in ("pw123", "sig=abc", "Zm9vYmFy", "abcdefghijkl", "pc-0123456789abcdef", "sk-live-abcdef"):
        assert secret not in clean
    assert "https://u:***@host/x?sig=***&sv=1" in clean


def test_the_object_store_limit_reaches_ray_data() -> None:
    """compute.object_store_memory_limit is Ray Data's resource limit (its fields are read-only:
    the limits are replaced, not assigned into)."""
    import ray.data

    from pipeline.job.plan import limit_object_store

    options = ray.data.DataContext.get_current().execution_options
    before = options.resource_limits
    try:
        limit_object_store(ComputeConfig(object_store_memory_limit=300 * 2**20))
        assert options.resource_limits.object_store_memory == 300 * 2**20
        assert options.resource_limits.cpu == before.cpu
    finally:
        options.resource_limits = before
    with pytest.raises(ValueError, match="object_store_memory_limit"):
        ComputeConfig(object_store_memory_limit=0)


def test_a_renamed_setting_says_its_new_name() -> None:
    from pipeline.config import JobConfig

    with pytest.raises(ValueError, match="wait_for_encoders_s was renamed compute.wait_for_nodes_s"):
        JobConfig.model_validate({"compute": {"wait_for_encoders_s": 60}})


@pytest.mark.parametrize(
    "flags",
    [["--passthrough-columns", "title,lang"], ["--passthrough-columns", "title", "--passthrough-columns", "lang"]]
    + [["--passthrough-columns", '["title", "lang"]'], ["--passthrough-columns", "[title, lang]"]],
)
def test_list_flags_take_commas_repeats_or_a_yaml_list(flags: list[str], capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main

    assert main(["encode", *flags, "--show-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["input"]["passthrough_columns"] == ["title", "lang"]
