"""Configuration: precedence CLI > env > file > defaults, clear errors, redacted secrets."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from agent_runtime.config import EngineConfig, add_arguments, load_config, markdown_table, redacted
from agent_runtime.errors import ConfigError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_bind_to_loopback() -> None:
    cfg = load_config(parse(), env={})
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8765
    assert cfg.store.redis_url == ""  # embedded Redis by default


def test_precedence_cli_over_env_over_file_over_default(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        '[server]\nport = 1111\nmax_sessions = 7\n[memory]\ncapacity = 500\neviction = "importance"\n'
    )
    env = {"AGENT_RUNTIME_PORT": "2222", "AGENT_RUNTIME_MEMORY_CAPACITY": "600"}
    cfg = load_config(parse("--config", str(f), "--port", "3333"), env=env)
    assert cfg.server.port == 3333  # CLI
    assert cfg.memory.capacity == 600  # env beats file
    assert cfg.server.max_sessions == 7  # file beats default
    assert cfg.memory.eviction == "importance"
    assert cfg.server.max_frame_bytes == 1_048_576  # default
    cfg = load_config(parse(), env={"AGENT_RUNTIME_CONFIG": str(f)})
    assert cfg.server.port == 1111


@pytest.mark.parametrize(
    ("argv", "env", "setting", "value"),
    [
        (["--port", "70000"], {}, "server.port", 70000),
        (["--port", "eighty"], {}, "server.port", "eighty"),
        ([], {"AGENT_RUNTIME_MEMORY_EVICTION": "random"}, "memory.eviction", "random"),
        ([], {"AGENT_RUNTIME_GENERATION_TOP_P": "0"}, "generation.top_p", 0.0),
        ([], {"AGENT_RUNTIME_REDIS_URL": "http://x"}, "store.redis_url", "http://x"),
        (["--engine-device", "tpu"], {}, "engine.device", "tpu"),
        (["--privacy-accountant", "gdp"], {}, "privacy.accountant", "gdp"),
        (["--engine-vector-dtype", "int8"], {}, "engine.vector_dtype", "int8"),
        (
            ["--engine-device", "cuda", "--engine-vector-dtype", "float16"],
            {},
            "engine.vector_dtype",
            "float16",
        ),
    ],
)
def test_invalid_values_name_the_setting_and_the_value(
    argv: list[str], env: dict[str, str], setting: str, value: object
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(parse(*argv), env=env)
    assert info.value.setting == setting
    assert info.value.value == value
    assert setting in str(info.value) and repr(value) in str(info.value)


def test_unknown_file_keys_and_bad_toml_are_errors(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[server]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"server\.prot.*unknown setting"):
        load_config(parse("--config", str(f)), env={})
    f.write_text("[servr]\n")
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(parse("--config", str(f)), env={})
    f.write_text("[server\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(parse("--config", str(f)), env={})
    with pytest.raises(ConfigError, match="no such file"):
        load_config(parse("--config", str(tmp_path / "missing.toml")), env={})


def test_secrets_are_redacted_in_the_effective_config() -> None:
    cfg = load_config(parse("--redis-url", "redis://user:hunter2@db.example:6380/1"), env={})
    shown = redacted(cfg)
    assert "hunter2" not in str(shown)
    assert shown["store"]["redis_url"] == "redis://user:***@db.example:6380/1"
    assert cfg.store.redis_url.endswith("hunter2@db.example:6380/1")
    url = "redis+sentinel://:hunter2@s1:26379,s2:26379/agents/2?sentinel_password=swordfish"
    shown = redacted(load_config(parse("--redis-url", url), env={}))
    assert "hunter2" not in str(shown) and "swordfish" not in str(shown)
    assert shown["store"]["redis_url"] == (
        "redis+sentinel://:***@s1:26379,s2:26379/agents/2?sentinel_password=***"
    )


def test_redis_urls_name_the_deployment() -> None:
    from agent_runtime.config import parse_redis_url

    single = parse_redis_url("rediss://u:p@db:6380/1")
    assert single.kind == "single" and single.url == "rediss://u:p@db:6380/1"
    sentinel = parse_redis_url(
        "rediss+sentinel://u:p@s1:26379,[::1]:26380/agents/3?sentinel_password=sp"
    )
    assert sentinel.kind == "sentinel" and sentinel.tls
    assert sentinel.hosts == (("s1", 26379), ("::1", 26380))
    assert (sentinel.service, sentinel.db, sentinel.username, sentinel.password) == (
        "agents",
        3,
        "u",
        "p",
    )
    assert sentinel.sentinel_password == "sp"
    cluster = parse_redis_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7001")
    assert cluster.kind == "cluster" and not cluster.tls and cluster.password is None
    assert cluster.hosts == (("10.0.0.1", 7000), ("10.0.0.2", 7001))


def test_every_setting_is_documented_in_the_reference_table() -> None:
    table = markdown_table()
    for line in table.splitlines()[2:]:
        assert line.rstrip().endswith("|") and not line.rstrip().endswith("|  |"), line
    assert "`--memory-capacity`" in table and "`AGENT_RUNTIME_REDIS_URL`" in table


def test_readme_configuration_table_is_current() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    start = readme.index("<!-- config-table")
    block = readme[readme.index("\n", start) + 1 : readme.index("<!-- /config-table -->")].strip()
    assert block == markdown_table(), "regenerate with: agent-runtime config --markdown"


def test_vector_weights_default_to_float16_only_for_a_float32_model_on_a_cpu() -> None:
    from agent_runtime.config import EngineConfig

    assert EngineConfig().vector_weights() == "float16"  # serving's default on a CPU
    assert EngineConfig(device="cuda").vector_weights() is None
    assert EngineConfig(dtype="float16").vector_weights() is None
    assert EngineConfig(vector_dtype="none").vector_weights() is None
    assert EngineConfig(vector_dtype="bfloat16").vector_weights() == "bfloat16"
    assert EngineConfig(dtype="bfloat16", vector_dtype="bfloat16").vector_weights() is None
    EngineConfig(device="cuda", vector_dtype="auto").validate()  # auto and none stay valid
    EngineConfig(device="cuda:1", vector_dtype="none").validate()


@pytest.mark.parametrize(
    ("model", "checkpoint", "served"),
    [
        ("", "", "smollm2-135m-recall"),  # the default: the pretrained chat model
        ("", "ckpt.pt", ""),  # a byte-model checkpoint alone serves that byte model
        ("bundled", "", ""),  # the bundled byte model
        ("Bundled ", "ckpt.pt", ""),  # the byte model's checkpoint, named either way
        ("smollm2-135m-instruct", "", "smollm2-135m-instruct"),
        ("./model.gguf", "", "./model.gguf"),
    ],
)
def test_which_model_serve_serves(tmp_path: Path, model: str, checkpoint: str, served: str) -> None:
    """``engine.pretrained()``: the pretrained decoder ``serve`` loads, or "" for a byte model."""
    if checkpoint:
        checkpoint = str(tmp_path / checkpoint)
        Path(checkpoint).write_bytes(b"x")
    engine = EngineConfig(model=model, checkpoint=checkpoint)
    engine.validate()
    assert engine.pretrained() == served


def test_a_checkpoint_with_a_pretrained_model_is_refused_by_name(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"engine\.model.*--model bundled or no model"):
        EngineConfig(model="smollm2-135m-recall", checkpoint=str(checkpoint)).validate()
