"""Configuration precedence (file < environment < flag) and clear errors for bad files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from api.__main__ import build_parser, overrides_from_args
from api.server.config import Config, ConfigError, example_yaml, load_config
from tests.test_commands import ROOT
from worker.launch import ENGINE_DIR_ENV


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"port": 9000, "api_keys": ["from-file"]},
                "model": {"model_id": "file/model", "acceleration": "xformers"},
                "pipeline": {"width": 768},
            }
        )
    )
    return path


def test_defaults_without_any_source(monkeypatch):
    monkeypatch.delenv("STREAMDIFFUSION_CONFIG", raising=False)
    config = load_config()
    assert config.server.port == 8080 and config.model.model_id == "stabilityai/sd-turbo"
    assert config.server.host == "127.0.0.1" and config.relay.host == "127.0.0.1"


def test_file_then_environment_then_flags(config_file, monkeypatch):
    config = load_config(config_file)
    assert (config.server.port, config.model.model_id, config.pipeline.width) == (9000, "file/model", 768)
    monkeypatch.setenv("STREAMDIFFUSION_MODEL__MODEL_ID", "env/model")
    monkeypatch.setenv("STREAMDIFFUSION_SERVER__PORT", "9100")
    config = load_config(config_file)
    assert (config.server.port, config.model.model_id, config.model.acceleration) == (
        9100,
        "env/model",
        "xformers",
    )
    args = build_parser().parse_args(["--port", "9200", "--model", "flag/model"])
    config = load_config(config_file, overrides_from_args(args))
    assert (config.server.port, config.model.model_id, config.pipeline.width) == (9200, "flag/model", 768)
    assert config.server.api_keys == ["from-file"]


def test_config_path_from_environment(config_file, monkeypatch):
    monkeypatch.setenv("STREAMDIFFUSION_CONFIG", str(config_file))
    assert load_config().server.port == 9000


def test_settings_carry_defaults_for_streams(config_file):
    config = load_config(config_file)
    assert config.default_stream_params()["model_id"] == "file/model"
    assert config.default_stream_params()["width"] == 768
    assert config.server.api_keys == ["from-file"] and config.server.port == 9000


def test_the_relay_section_is_the_embedded_relays_config():
    config = load_config(
        None,
        {"relay": {"port": 0, "tokens": ["a"], "hello_timeout_s": 3, "idle_release_s": 0, "origins": []}},
    )
    relay = config.relay_config()
    assert (relay.port, relay.tokens, relay.hello_timeout, relay.idle_release_s) == (
        0,
        frozenset({"a"}),
        3,
        0,
    )
    for name in type(config.relay).model_fields:  # every option reaches the relay, none by hand
        assert hasattr(relay, name.removesuffix("_s") if name == "hello_timeout_s" else name), name


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("server: {port: 'eighty'}\n", "server.port"),
        ("server: {prot: 80}\n", "unknown option 'server.prot'"),
        ("pipeline: {width: 500}\n", "pipeline.width"),
        ("model: [1, 2\n", "not valid YAML"),
        ("- just\n- a list\n", "mapping of sections"),
        ("colours: {a: 1}\n", "unknown option 'colours'"),
    ],
)
def test_invalid_file_names_the_file_and_field(tmp_path, content, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert needle in str(exc.value) and str(path) in str(exc.value)


def test_invalid_environment_value_is_named(monkeypatch):
    monkeypatch.setenv("STREAMDIFFUSION_RELAY__MAX_CHANNELS", "0")
    with pytest.raises(ConfigError, match=r"relay\.max_channels"):
        load_config()


def test_a_list_option_given_a_plain_value_names_the_variable_and_the_json_it_needs(monkeypatch):
    monkeypatch.setenv("STREAMDIFFUSION_RELAY__TOKENS", "s3cret")  # the usual slip: not a JSON list
    with pytest.raises(ConfigError) as exc:
        load_config()
    assert "STREAMDIFFUSION_RELAY__TOKENS" in str(exc.value) and "JSON" in str(exc.value)
    monkeypatch.setenv("STREAMDIFFUSION_RELAY__TOKENS", '["s3cret"]')
    assert load_config().relay.tokens == ["s3cret"]


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")


def test_command_line_reports_a_bad_file_and_prints_config(tmp_path, config_file):
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {port: -1}\n")
    result = subprocess.run(
        [sys.executable, "-m", "api", "--config", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "server.port" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "api", "--config", str(config_file), "--port", "1234", "--print-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    printed = yaml.safe_load(result.stdout)
    assert printed["server"]["port"] == 1234 and printed["model"]["model_id"] == "file/model"


def test_example_file_documents_every_option_and_loads(tmp_path):
    text = example_yaml()
    for section, field in Config.model_fields.items():
        for option in type(field.default_factory()).model_fields:
            assert f"  {option}:" in text, f"{section}.{option} undocumented"
    path = tmp_path / "example.yaml"
    path.write_text(text)
    assert load_config(path).model_dump() == Config().model_dump()
    with open(f"{ROOT}/config.example.yaml") as committed:
        assert committed.read().strip() == text.strip(), "regenerate: python -m api --example-config"


# Seed 001's "配置说明" blocks, as its README prints them (one file), and its TensorRT block.
SEED001_CONFIG = """\
model:
  model_id: "stabilityai/sd-turbo"  # Hugging Face 模型 ID
  acceleration: "xformers"  # 加速方式
  engine_dir: "engines"  # TensorRT 引擎缓存目录
  use_cuda_graph: false  # CUDA Graph 优化

pipeline:
  name: "img2img"  # Pipeline 类型
  mode: "image"  # 输入模式
  width: 512  # 图像宽度（必须是 8 的倍数）
  height: 512  # 图像高度（必须是 8 的倍数）
  use_tiny_vae: true  # 使用 Tiny VAE
  use_lcm_lora: true  # 使用 LCM LoRA
  warmup: 10  # Warmup 步骤数

performance:
  enable_similar_image_filter: false  # 相似图像过滤
  similar_image_filter_threshold: 0.98  # 相似度阈值
  similar_image_filter_max_skip_frame: 10  # 最大跳帧数
  jpeg_quality: 85  # 图像流 JPEG 质量
"""  # noqa: RUF001 - the seed's own full-width punctuation

SEED001_TENSORRT = """\
model:
  acceleration: "tensorrt"
  engine_dir: "engines"
  use_cuda_graph: true  # 可选，进一步优化
"""  # noqa: RUF001 - the seed's own full-width punctuation


def test_seed001_config_blocks_load_as_the_seed_prints_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "seed001_config.yaml"
    path.write_text(SEED001_CONFIG, encoding="utf-8")
    config = load_config(path)
    model, pipeline = config.model, config.pipeline
    assert (model.engine_dir, model.use_cuda_graph, pipeline.warmup) == ("engines", False, 10)
    assert [note.split(" ")[0] for note in config.inert_options()] == ["pipeline.warmup"]
    path.write_text(SEED001_TENSORRT, encoding="utf-8")
    config = load_config(path)
    assert config.model.acceleration == "tensorrt" and config.model.use_cuda_graph
    assert [note.split(" ")[0] for note in config.inert_options()] == ["model.use_cuda_graph"]
    # the engine cache reaches local workers as the directory the TensorRT engine reads
    env = config.launch_options("ws://127.0.0.1:9").environment()
    assert env[ENGINE_DIR_ENV] == str(tmp_path / "engines")
    assert ENGINE_DIR_ENV not in Config().launch_options("ws://127.0.0.1:9").environment()


def test_seed001_config_prints_with_the_server_command(tmp_path):
    path = tmp_path / "seed001_config.yaml"
    path.write_text(SEED001_CONFIG, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "api", "--config", str(path), "--print-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["engine_dir"] == "engines" and printed["pipeline"]["warmup"] == 10


def test_dotenv_in_the_working_directory_under_the_environment(tmp_path, monkeypatch, config_file):
    """Seeds 000 and 001 say ``cp .env.example .env``; its values beat the file, the environment beats
    them, and variables that are not ours (docker compose's) are left alone."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STREAMDIFFUSION_PIPELINE__WIDTH", raising=False)
    (tmp_path / ".env").write_text(
        "STREAMDIFFUSION_PIPELINE__WIDTH=640\nSTREAMDIFFUSION_MODEL__MODEL_ID=dotenv/model\n"
        "STREAMDIFFUSION_API_KEY=compose-only\nRELAY_TOKEN=elsewhere\n"
    )
    config = load_config(config_file)  # the file says width 768, model file/model
    assert (config.pipeline.width, config.model.model_id, config.server.port) == (640, "dotenv/model", 9000)
    monkeypatch.setenv("STREAMDIFFUSION_PIPELINE__WIDTH", "896")
    assert load_config(config_file).pipeline.width == 896


def test_env_example_names_real_options(tmp_path, monkeypatch):
    """Every variable ``.env.example`` shows, uncommented, loads as the option it names."""
    monkeypatch.chdir(tmp_path)
    lines = (Path(ROOT) / ".env.example").read_text().splitlines()
    variables = [line.removeprefix("# ") for line in lines if line.startswith("# STREAMDIFFUSION_")]
    assert "# STREAMDIFFUSION_PIPELINE__WIDTH=512" in lines and len(variables) > 10
    (tmp_path / ".env").write_text("\n".join(variables) + "\n")
    config = load_config()
    for variable in variables:
        name, value = variable.split("=", 1)
        section, option = name.removeprefix("STREAMDIFFUSION_").lower().split("__")
        assert getattr(getattr(config, section), option) == yaml.safe_load(value.strip("'"))
