"""`eft serve --config FILE.yaml` and per-model loading options: the file, the flags over it,
the `ModelSpec`s the models become, the errors that name the key and the file, the Ray Serve
builder reading the same file, and one server built from a file over the tiny family."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from eft_integrations import cli
from eft_integrations.chat import chat
from eft_integrations.loading import ModelSpec
from eft_integrations.serve import ConfigError, ModelOptions, ServeConfig

EVERY_FIELD = {
    "toy": False,
    "base": {
        "path": "org/base",
        "gguf_file": "base.Q4_K_M.gguf",
        "revision": "v2",
        "dtype": "bfloat16",
        "device_map": "cpu",
        "trust_remote_code": True,
        "quantization": {"load_in_4bit": True},
    },
    "behaviors": {
        "chat": {"finetuned": {"path": "org/chat", "revision": "main"}, "reference": "org/small"},
        "safe": ["org/safe", "org/small"],
        "terse": "org/terse,org/small",
    },
    "weights": {"chat": 1.5, "safe": -0.5},
    "dtype": "float16",
    "device_map": "auto",
    "max_batch_size": 4,
    "kv_cache_tokens": 2048,
    "prefill_chunk": 64,
    "prefix_caching": False,
    "served_model_name": "tiny",
    "api_key": "secret",
    "max_queue": 3,
    "max_body_bytes": 1000,
    "default_max_tokens": 32,
    "body_timeout": 7.5,
    "host": "0.0.0.0",
    "port": 9001,
    "log_level": "debug",
    "timeout_keep_alive": 2.0,
    "header_timeout": 3.0,
    "limit_concurrency": 16,
    "shutdown_grace": 4.0,
}
"""A value other than the default for every `ServeConfig` field (but `toy`, which a base
model excludes)."""


def _write(folder: Path, fields: dict[str, Any], name: str = "eft.yaml") -> Path:
    path = folder / name
    text = json.dumps(fields) if name.endswith(".json") else yaml.safe_dump(fields)
    path.write_text(text, encoding="utf-8")
    return path


def _parse(*argv: str) -> ServeConfig:
    return cli.serve_config(cli.build_parser().parse_args(["serve", *argv]))


# ------------------------------------------------------------------------------ the file


def test_every_field_is_read_from_yaml_and_round_trips(tmp_path):
    assert set(EVERY_FIELD) == set(ServeConfig.model_fields), "a new field: add it above"
    config = ServeConfig.from_file(_write(tmp_path, EVERY_FIELD))
    for name, value in EVERY_FIELD.items():
        if name not in ("base", "behaviors"):
            assert getattr(config, name) == value, name
        if name != "toy":  # toy and base exclude each other: toy stays at its default
            assert getattr(config, name) != ServeConfig.model_fields[name].default, name
    assert config.base == ModelOptions(**EVERY_FIELD["base"])
    assert config.behaviors == {
        "chat": (ModelOptions(path="org/chat", revision="main"), "org/small"),
        "safe": ("org/safe", "org/small"),
        "terse": ("org/terse", "org/small"),
    }
    dumped = _write(tmp_path, config.model_dump(mode="json"), "dumped.yaml")
    assert ServeConfig.from_file(dumped) == config
    as_json = _write(tmp_path, EVERY_FIELD, "eft.json")
    assert ServeConfig.from_file(as_json) == config


def test_overrides_replace_the_file_values(tmp_path):
    path = _write(tmp_path, {"toy": True, "port": 9001, "weights": {"helpful": 2.0}})
    config = ServeConfig.from_file(path, port=9002, max_batch_size="5")
    assert (config.port, config.max_batch_size, config.weights) == (9002, 5, {"helpful": 2.0})
    assert config.toy and config.host == "127.0.0.1" and config.log_level == "info"


def test_the_command_line_forms_of_behaviors_still_work():
    config = ServeConfig(base="b", behaviors="chat=FT,REF;x=A,B", weights="chat=0.5;x=2")
    assert config.behaviors == {"chat": ("FT", "REF"), "x": ("A", "B")}
    assert config.weights == {"chat": 0.5, "x": 2.0}
    listed = ServeConfig(base="b", behaviors=["chat=FT,REF", "x=A,B"], weights=["chat=0.5"])
    assert listed.behaviors == config.behaviors
    assert ServeConfig(base="b", behaviors={"chat": "FT, REF"}).behaviors == {"chat": ("FT", "REF")}


# ------------------------------------------------------------------------------ model specs


def test_model_options_become_model_specs_without_loading():
    config = ServeConfig.model_validate(EVERY_FIELD)
    base = config.base_spec()
    assert base.name_or_path == "org/base"
    assert (base.dtype, base.device_map) == (torch.bfloat16, "cpu")
    assert {k: v for k, v in base.kwargs.items() if k != "quantization_config"} == {
        "gguf_file": "base.Q4_K_M.gguf",
        "revision": "v2",
        "trust_remote_code": True,
    }
    quantization = base.kwargs["quantization_config"]
    assert type(quantization).__name__ == "BitsAndBytesConfig" and quantization.load_in_4bit
    behaviors = config.behavior_specs()
    assert behaviors["chat"].finetuned == ModelSpec("org/chat", revision="main")
    # options left out take the decoder-wide dtype and device_map at load time (None here)
    assert (
        behaviors["chat"].finetuned.dtype is None and behaviors["chat"].finetuned.device_map is None
    )
    assert behaviors["safe"].finetuned == ModelSpec("org/safe")
    # a reference named by a plain path and by a path-only mapping is one model, loaded once
    by_mapping = ModelOptions(path="org/small").spec()
    assert {behaviors[n].reference.key() for n in behaviors} == {by_mapping.key()}


def test_the_toy_family_has_no_model_specs():
    config = ServeConfig(toy=True)
    assert config.base_spec() is None and config.behavior_specs() == {}


def test_a_bad_dtype_is_an_error_before_loading():
    config = ServeConfig(base={"path": "b", "dtype": "float33"})
    with pytest.raises(ValueError, match="unknown dtype 'float33'"):
        config.base_spec()


# ------------------------------------------------------------------------------ errors


def test_an_unknown_key_names_the_key_and_the_file(tmp_path):
    path = _write(tmp_path, {"toy": True, "max_batch": 4})
    with pytest.raises(ConfigError) as error:
        ServeConfig.from_file(path)
    assert str(path) in str(error.value) and "unknown key 'max_batch'" in str(error.value)

    nested = {"base": "b", "behaviors": {"chat": {"finetuned": {"path": "f", "gguf_fil": "x"}}}}
    with pytest.raises(ConfigError) as error:
        ServeConfig.from_file(_write(tmp_path, nested))
    message = str(error.value)
    assert "behaviors.chat.finetuned: unknown key 'gguf_fil'" in message
    assert "behaviors.chat.reference: Field required" in message and str(tmp_path) in message


def test_an_adapter_is_a_mapping_too_and_only_as_a_finetuned_model(tmp_path):
    """`finetuned: {adapter: PATH, name, revision}` is the mapping form of `adapter:PATH`; its
    unknown keys are named, and a reference cannot be an adapter."""
    from eft_integrations import Adapter

    behaviors = {
        "helpful": {"finetuned": {"adapter": "org/helpful-lora", "name": "h"}, "reference": "r"},
        "harmless": {"finetuned": "adapter:org/harmless-lora", "reference": "r"},
    }
    config = ServeConfig.from_file(_write(tmp_path, {"base": "b", "behaviors": behaviors}))
    specs = config.behavior_specs()
    assert specs["helpful"].finetuned == Adapter("org/helpful-lora", name="h")
    assert specs["harmless"].finetuned == Adapter("org/harmless-lora")
    assert specs["harmless"].finetuned.adapter_name == "harmless-lora"
    bad = {"chat": {"finetuned": {"adapter": "a", "nmae": "x"}, "reference": "r"}}
    with pytest.raises(ConfigError, match="behaviors.chat.finetuned: unknown key 'nmae'"):
        ServeConfig.from_file(_write(tmp_path, {"base": "b", "behaviors": bad}))
    backwards = {"chat": {"finetuned": "f", "reference": {"adapter": "a"}}}
    with pytest.raises(ConfigError, match="behaviors.chat.reference: unknown key 'adapter'"):
        ServeConfig.from_file(_write(tmp_path, {"base": "b", "behaviors": backwards}))


def test_a_model_that_is_neither_path_nor_mapping_says_what_a_model_is(tmp_path):
    with pytest.raises(ConfigError, match="base: a model is a hub id or path, or a mapping"):
        ServeConfig.from_file(_write(tmp_path, {"base": 3}))


def test_an_override_error_does_not_blame_the_file(tmp_path):
    path = _write(tmp_path, {"toy": True, "log_level": "loud"})
    with pytest.raises(ConfigError) as error:
        ServeConfig.from_file(path, port=-1)
    first, second = str(error.value).split("; ")
    assert first.startswith("port: ") and second.startswith(f"{path}: log_level: ")


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("missing.yaml", None, "cannot read config file"),
        ("list.yaml", "- toy\n- base\n", "must be a mapping of ServeConfig fields"),
        ("broken.yaml", "toy: [true\n", "is not valid"),
        ("broken.json", "{'toy': true}", "is not valid"),
    ],
)
def test_a_bad_file_is_a_clear_error(tmp_path, name, text, expected):
    path = tmp_path / name
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=expected) as error:
        ServeConfig.from_file(path)
    assert str(path) in str(error.value)


# ------------------------------------------------------------------------------ command line


def test_flags_given_override_the_file_and_flags_left_out_do_not(tmp_path):
    path = _write(tmp_path, EVERY_FIELD)
    from_file = ServeConfig.from_file(path)
    assert _parse("--config", str(path)) == from_file
    config = _parse(
        "--config",
        str(path),
        "--port",
        "9100",
        "--prefill-chunk",
        "0",
        "--behavior",
        "only=F,R",
        "--weights",
        "only=3",
    )
    assert config.port == 9100 and config.prefill_chunk is None
    assert config.behaviors == {"only": ("F", "R")} and config.weights == {"only": 3.0}
    unchanged = {"port", "prefill_chunk", "behaviors", "weights"}
    assert config.model_dump(exclude=unchanged) == from_file.model_dump(exclude=unchanged)


def test_without_a_file_the_config_defaults_apply(monkeypatch):
    monkeypatch.delenv("EFT_API_KEY", raising=False)
    assert _parse("--toy") == ServeConfig(toy=True)
    assert _parse("--base", "b", "--no-prefix-caching").prefix_caching is False
    assert _parse("--base", "b", "--behavior", "c=F,R").behaviors == {"c": ("F", "R")}


def test_the_api_key_flag_then_the_file_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EFT_API_KEY", "from-env")
    with_key = _write(tmp_path, {"toy": True, "api_key": "from-file"}, "key.yaml")
    without = _write(tmp_path, {"toy": True}, "nokey.yaml")
    assert _parse("--config", str(with_key), "--api-key", "flag").api_key == "flag"
    assert _parse("--config", str(with_key)).api_key == "from-file"
    assert _parse("--config", str(without)).api_key == "from-env"
    assert _parse("--toy").api_key == "from-env"


def test_eft_serve_runs_the_server_the_file_and_flags_describe(tmp_path, monkeypatch, capsys):
    from eft_integrations.serve import server as server_module

    path = _write(tmp_path, {"toy": True, "host": "0.0.0.0", "port": 9001, "log_level": "debug"})
    built: list[ServeConfig] = []

    def build_app(self: ServeConfig, decoder: Any = None) -> Any:
        built.append(self)
        loaded = SimpleNamespace(model_name="toy")  # no model loads here
        return SimpleNamespace(state=SimpleNamespace(eft=SimpleNamespace(decoder=loaded)))

    served: dict[str, Any] = {}
    monkeypatch.setattr(ServeConfig, "build_app", build_app)
    monkeypatch.setattr(
        server_module,
        "run_server",
        lambda app, host, port, log_level, **limits: served.update(
            host=host, port=port, log_level=log_level, **limits
        ),
    )
    cli.main(["serve", "--config", str(path), "--port", "9100", "--shutdown-grace", "2"])
    assert served["host"] == "0.0.0.0" and served["port"] == 9100
    assert served["log_level"] == "debug" and served["shutdown_grace"] == 2
    assert built[0].toy and "http://0.0.0.0:9100/v1" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--toy", "--port", "-1"], "port: Input should be greater than or equal to 0"),
        (["--config", "{file}"], "unknown key 'max_batch'"),
        (["--config", "{missing}"], "cannot read config file"),
    ],
)
def test_eft_serve_reports_config_errors_through_the_parser(tmp_path, capsys, argv, expected):
    path = _write(tmp_path, {"toy": True, "max_batch": 4})
    names = {"file": str(path), "missing": str(tmp_path / "missing.yaml")}
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", *(a.format(**names) for a in argv)])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and "eft serve: error:" in error
    assert expected.format(**names) in error


# ------------------------------------------------------------------------------ ray


def test_the_ray_builder_reads_the_config_file_and_its_overrides(tmp_path):
    pytest.importorskip("ray.serve")
    from eft_integrations.serve.ray import app_builder

    path = _write(tmp_path, EVERY_FIELD)
    (config,) = app_builder({"config": str(path)})._bound_deployment.init_args
    assert config == ServeConfig.from_file(path)
    # `serve run ... key=value` gives strings; Ray's `args:` mapping may nest model options
    args = {"config": str(path), "port": "9100", "base": {"path": "org/other", "dtype": "auto"}}
    (config,) = app_builder(args)._bound_deployment.init_args
    assert config.port == 9100 and config.base == ModelOptions(path="org/other", dtype="auto")
    with pytest.raises(ConfigError, match=f"{path}: unknown key 'replicas'"):
        app_builder({"config": str(_write(tmp_path, {**EVERY_FIELD, "replicas": 2}))})


# ------------------------------------------------------------------------------ end to end


def test_a_server_built_from_a_yaml_file_answers_as_the_core(tmp_path, tiny_paths):
    from fastapi.testclient import TestClient

    paths = {name: json.dumps(str(p)) for name, p in tiny_paths.items()}  # quoted YAML scalars
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"""\
base: {{path: {paths["base"]}, dtype: bfloat16}}
behaviors:
  chat:
    finetuned: {{path: {paths["chat"]}}}
    reference: {paths["ref"]}
  safe: [{paths["safe"]}, {paths["ref"]}]
weights: {{chat: 2.0, safe: -1.0}}
dtype: float32
served_model_name: tiny
max_batch_size: 2
""",
        encoding="utf-8",
    )
    app = ServeConfig.from_file(path).build_app()
    decoder = app.state.eft.decoder
    dtypes = dict(zip(decoder.model_names, (m.dtype for m in decoder._models), strict=True))
    assert dtypes == {
        str(tiny_paths["base"]): torch.bfloat16,
        str(tiny_paths["chat"]): torch.float32,
        str(tiny_paths["ref"]): torch.float32,
        str(tiny_paths["safe"]): torch.float32,
    }
    messages = [{"role": "user", "content": "The capital of Veloria"}]
    with TestClient(app) as client:
        reply = client.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 8},
        )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    core = chat(decoder, messages, temperature=0.0, max_new_tokens=8)
    assert body["choices"][0]["message"]["content"] == core.content
    assert body["eft_weights"] == {"chat": 2.0, "safe": -1.0}


def test_a_models_trust_remote_code_reaches_its_tokenizer(monkeypatch):
    """Loading a tokenizer with custom code needs the flag too (transformers refuses it
    otherwise); only the keyword arguments are checked, as no such tokenizer exists here."""
    from transformers import AutoTokenizer

    from eft_integrations.loading import load_tokenizer

    seen: list[dict] = []
    monkeypatch.setattr(
        AutoTokenizer, "from_pretrained", lambda path, **kwargs: seen.append(kwargs)
    )
    load_tokenizer(ModelOptions(path="m", trust_remote_code=True, revision="v2").spec())
    load_tokenizer(ModelOptions(path="m").spec())
    assert seen[0]["trust_remote_code"] is True and seen[0]["revision"] == "v2"
    assert seen[1]["trust_remote_code"] is False


def test_an_unknown_quantization_option_is_refused_not_ignored():
    with pytest.raises(ValueError, match=r"unknown quantization option\(s\) \['load_in_4bits'\]"):
        ModelOptions(path="m", quantization={"load_in_4bits": True})
    assert ModelOptions(path="m", quantization={"load_in_4bit": True}).quantization
