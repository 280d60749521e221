"""What a server serves and how: the models to load and the server's options, in one pydantic
model shared by `eft serve` (flags or `--config FILE.yaml`) and the Ray Serve builder (so all
read the same names).

    config = ServeConfig(base="meta-llama/Llama-2-70b-hf",
                         behaviors={"chat": ("meta-llama/Llama-2-7b-chat-hf",
                                             "meta-llama/Llama-2-7b-hf")},
                         dtype="bfloat16", device_map="auto")
    config = ServeConfig.from_file("eft.yaml", port=8080)   # the file's fields, then overrides
    app = config.build_app()           # loads the models, returns the FastAPI app

A model is a hub id or path, or `ModelOptions` (a mapping in YAML) with its own loading
options: `gguf_file`, `revision`, `dtype`, `device_map`, `trust_remote_code`, `quantization`.
A behavior is a (fine-tuned, reference) pair, or a mapping with `finetuned` and `reference`;
its fine-tuned model may be a PEFT adapter on the reference, `adapter:PATH` or
`AdapterOptions` (`{adapter: PATH, name: ..., revision: ...}` in YAML).
Behaviors and weights also read the command line's forms, `NAME=FT_PATH,REF_PATH` and
`NAME=W` (a list of them, or one string with `;` between them), as `serve run ... key=value`
passes strings.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from ..engine import DEFAULT_PREFILL_CHUNK
from .app import build_app
from .defaults import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEP_ALIVE,
    DEFAULT_LIMIT_CONCURRENCY,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_SHUTDOWN_GRACE,
)

if TYPE_CHECKING:
    from ..adapters import Adapter
    from ..loading import Behavior, ModelSpec

__all__ = [
    "AdapterOptions",
    "BehaviorModels",
    "ConfigError",
    "ModelOptions",
    "ServeConfig",
    "describe_errors",
    "parse_behavior",
    "parse_weight",
    "read_config_file",
]


class ConfigError(ValueError):
    """A server config that cannot be read or does not validate; the message says where (the
    file, the key) and what is wrong."""


def parse_behavior(text: str) -> tuple[str, tuple[str, str]]:
    """`"chat=FT_PATH,REF_PATH"` -> `("chat", ("FT_PATH", "REF_PATH"))`."""
    name, sep, paths = text.partition("=")
    finetuned, comma, reference = paths.partition(",")
    if not (sep and comma and name.strip() and finetuned.strip() and reference.strip()):
        raise ValueError(f"a behavior is NAME=FINETUNED_PATH,REFERENCE_PATH, got {text!r}")
    return name.strip(), (finetuned.strip(), reference.strip())


def parse_weight(text: str) -> tuple[str, float]:
    """`"chat=0.5"` -> `("chat", 0.5)`."""
    name, sep, value = text.partition("=")
    try:
        weight = float(value)
    except ValueError:
        weight = None
    if not sep or not name.strip() or weight is None:
        raise ValueError(f"a weight is NAME=FLOAT, got {text!r}")
    return name.strip(), weight


def _pieces(value: Any) -> list[str]:
    """A string with `;` between items, or a list of strings."""
    if isinstance(value, str):
        return [p for p in value.split(";") if p.strip()]
    return list(value)


def torch_dtype(name: str | None) -> Any:
    """A dtype name ("bfloat16", "auto") as `from_pretrained` takes it; None stays None."""
    if name is None or name == "auto":
        return name
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; e.g. float32, bfloat16, auto")
    return dtype


class ModelOptions(BaseModel):
    """One model and how to load it; the options left out take the server's `dtype` and
    `device_map` (transformers' defaults beyond them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    """Hub id or local path (a folder, or the folder holding `gguf_file`)."""
    gguf_file: str | None = None
    """A GGUF file in `path`, dequantized by transformers on load (needs `gguf`)."""
    revision: str | None = None
    """A branch, tag or commit of a hub repository."""
    dtype: str | None = None
    """torch dtype name or "auto"; None takes the server's `dtype`."""
    device_map: str | dict[str, Any] | None = None
    """accelerate device map ("auto", "cuda:1", a dict); None takes the server's."""
    trust_remote_code: bool = False
    """Run the model's own modelling code from its repository."""
    quantization: dict[str, Any] | None = None
    """Keyword arguments of transformers' `BitsAndBytesConfig` (e.g. `load_in_4bit: true`);
    loading needs `bitsandbytes`."""

    @field_validator("quantization")
    @classmethod
    def _known_quantization_options(cls, value: dict[str, Any] | None) -> Any:
        # BitsAndBytesConfig takes unknown keys silently: load_in_4bits: true would load
        # the model unquantized
        if value is None:
            return value
        from transformers import BitsAndBytesConfig

        known = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"unknown quantization option(s) {unknown}; BitsAndBytesConfig takes "
                f"{sorted(known)}"
            )
        return value

    def spec(self) -> ModelSpec:
        """The `ModelSpec` that loads this model. Only options that are set become keyword
        arguments, so a model given here by path alone is the same model (loaded once) as
        the same path given as a plain string elsewhere."""
        from ..loading import ModelSpec

        kwargs: dict[str, Any] = {}
        if self.gguf_file is not None:
            kwargs["gguf_file"] = self.gguf_file
        if self.revision is not None:
            kwargs["revision"] = self.revision
        if self.trust_remote_code:
            kwargs["trust_remote_code"] = True
        if self.quantization is not None:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(**self.quantization)
        return ModelSpec(
            self.path, dtype=torch_dtype(self.dtype), device_map=self.device_map, **kwargs
        )


def _model_kind(value: Any) -> str | None:
    """Which form a model is written in: a path, or a mapping of `ModelOptions`."""
    if isinstance(value, str):
        return "str"
    if isinstance(value, (Mapping, ModelOptions)):
        return "ModelOptions"
    return None


# Tagged by the value's own type, so a wrong mapping reports only ModelOptions' errors (not
# also "should be a valid string"), and a number or list one line saying what a model is.
ModelSource = Annotated[
    Annotated[str, Tag("str")] | Annotated[ModelOptions, Tag("ModelOptions")],
    Discriminator(
        _model_kind,
        custom_error_type="model_source",
        custom_error_message="a model is a hub id or path, or a mapping with path and its "
        "loading options (gguf_file, revision, dtype, device_map, trust_remote_code, "
        "quantization)",
    ),
]
"""A model: its hub id or path, or `ModelOptions`."""
_UNION_TAGS = ("str", "ModelOptions", "AdapterOptions")


class AdapterOptions(BaseModel):
    """A behavior's fine-tuned model as a PEFT adapter on the behavior's reference: the
    mapping form of `adapter:PATH` (`finetuned: {adapter: PATH, name: helpful}` in YAML)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter: str
    """The adapter's folder or hub id (with `adapter_config.json`)."""
    name: str | None = None
    """Its name on the backbone; None takes the folder's last part."""
    revision: str | None = None
    """A branch, tag or commit of a hub repository."""

    def spec(self) -> Adapter:
        """The `Adapter` this mapping names."""
        from ..adapters import Adapter

        kwargs = {"revision": self.revision} if self.revision is not None else {}
        return Adapter(self.adapter, name=self.name, **kwargs)


def _finetuned_kind(value: Any) -> str | None:
    """Which form a fine-tuned model is written in: a model's, or an adapter mapping."""
    if isinstance(value, AdapterOptions) or (isinstance(value, Mapping) and "adapter" in value):
        return "AdapterOptions"
    return _model_kind(value)


FinetunedSource = Annotated[
    Annotated[str, Tag("str")]
    | Annotated[ModelOptions, Tag("ModelOptions")]
    | Annotated[AdapterOptions, Tag("AdapterOptions")],
    Discriminator(
        _finetuned_kind,
        custom_error_type="model_source",
        custom_error_message="a fine-tuned model is a hub id or path (adapter:PATH for a PEFT "
        "adapter on the reference), a mapping with path and its loading options, or a "
        "mapping with adapter (and name, revision)",
    ),
]
"""A behavior's fine-tuned model: a model (`ModelSource`) or an adapter on its reference."""


class BehaviorModels(NamedTuple):
    """A behavior's two models; validated from a pair or a `{finetuned, reference}` mapping,
    and equal to the plain `(finetuned, reference)` tuple."""

    finetuned: FinetunedSource
    reference: ModelSource


ADAPTER_PREFIX = "adapter:"
"""A fine-tuned model written `adapter:PATH` is a PEFT adapter on its behavior's reference."""


def _spec(model: str | ModelOptions) -> ModelSpec:
    from ..loading import ModelSpec

    return model.spec() if isinstance(model, ModelOptions) else ModelSpec(model)


def _finetuned(model: str | ModelOptions | AdapterOptions) -> ModelSpec | Adapter:
    """A behavior's fine-tuned model: `adapter:PATH` or `{adapter: PATH}` is an adapter,
    anything else a model."""
    if isinstance(model, AdapterOptions):
        return model.spec()
    if isinstance(model, str) and model.startswith(ADAPTER_PREFIX):
        from ..adapters import Adapter

        path = model.removeprefix(ADAPTER_PREFIX).strip()
        if not path:
            raise ValueError("an adapter is adapter:PATH (a folder or hub id), got no path")
        return Adapter(path)
    return _spec(model)


def describe_errors(
    error: ValidationError, source: str | None = None, overrides: Collection[str] = ()
) -> str:
    """A `ServeConfig` validation error as one line per problem, `; ` between them:
    `SOURCE: KEY.PATH: what is wrong`. `source` (a file name) prefixes the problems of the
    keys it gave, not those of `overrides`."""
    lines = []
    for problem in error.errors():
        loc = [str(part) for part in problem["loc"] if part not in _UNION_TAGS]
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden" and loc:
            message = f"unknown key {loc.pop()!r} ({message})"
        from_file = source is not None and not (loc and loc[0] in overrides)
        where = [source] if from_file else []
        if loc:
            where.append(".".join(loc))
        lines.append(": ".join([*where, message]))
    return "; ".join(lines)


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping of a YAML (or `.json`) config file; ConfigError if it cannot be read or
    is not a mapping."""
    import yaml

    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config file {str(file)!r}: {error.strerror}") from error
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"config file {str(file)!r} is not valid: {error}") from error
    if data is None:  # an empty file sets nothing
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(file)!r} must be a mapping of ServeConfig fields "
            f"(base, behaviors, port, ...), got a {type(data).__name__}"
        )
    return data


class ServeConfig(BaseModel):
    """The models of one engine and the options of the server in front of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    toy: bool = False
    """Serve the shipped toy-world family (large base + helpful and harmless deltas)."""
    base: ModelSource | None = None
    """The base model for real models: hub id or path, or `ModelOptions`."""
    behaviors: dict[str, BehaviorModels] = Field(default_factory=dict)
    """Behavior name -> (fine-tuned model, its reference base), each a path or
    `ModelOptions`."""
    weights: dict[str, float] = Field(default_factory=dict)
    """Default behavior weights of requests that name none (others take 1.0)."""
    dtype: str | None = None
    """torch dtype name, or "auto", for models that name none (default: float32 for the toy
    family, "auto" otherwise)."""
    device_map: str | None = None
    """Passed to transformers for models that name none, e.g. "auto" (with accelerate)."""
    max_batch_size: int | None = Field(default=None, ge=1)
    """Most rows the engine decodes at once (the decoder's default otherwise)."""
    kv_cache_tokens: int | None = Field(default=None, ge=1)
    """KV budget per model in tokens (the decoder's default otherwise)."""
    prefill_chunk: int | None = Field(default=DEFAULT_PREFILL_CHUNK, ge=1)
    """Prompt tokens per model prefilled per step (None: whole prompts at once)."""
    prefix_caching: bool = True
    """Reuse the cached KV of prompt prefixes across requests."""

    served_model_name: str = "eft"
    """The name clients put in `model`."""
    api_key: str | None = None
    """When set, requests need `Authorization: Bearer <api_key>`."""
    max_queue: int | None = Field(default=None, ge=0)
    """Admit at most max_batch_size + max_queue prompts at once (503 with Retry-After
    beyond; a completions request counts each of its prompts)."""
    max_body_bytes: int | None = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1)
    """Larger request bodies get 413."""
    default_max_tokens: int | None = Field(default=None, ge=1)
    """Budget of chat requests that name none (default: the context window)."""
    body_timeout: float | None = Field(default=DEFAULT_BODY_TIMEOUT, gt=0)
    """Seconds a request body may take to arrive after its headers (408 beyond)."""

    # uvicorn's options: `eft serve` reads them; a Ray Serve deployment has its own proxy
    host: str = "127.0.0.1"
    """The address `eft serve` listens on."""
    port: int = Field(default=8000, ge=0, le=65535)
    """The port `eft serve` listens on."""
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    """uvicorn's log level."""
    timeout_keep_alive: float = Field(default=DEFAULT_KEEP_ALIVE, gt=0)
    """Seconds an idle connection is kept open between requests."""
    header_timeout: float = Field(default=DEFAULT_HEADER_TIMEOUT, gt=0)
    """Seconds a connection has to send its request headers (then 408 and closed)."""
    limit_concurrency: int | None = Field(default=DEFAULT_LIMIT_CONCURRENCY, ge=1)
    """Most connections and tasks at once (uvicorn answers 503 beyond; None: no limit)."""
    shutdown_grace: float = Field(default=DEFAULT_SHUTDOWN_GRACE, ge=0)
    """Seconds running requests get to finish on SIGTERM before they are cut short."""

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> ServeConfig:
        """The config a YAML (or `.json`) file gives, every field at its top level; each of
        `overrides` (from the command line) replaces the file's value of that field. A
        ConfigError names the file and the key when the file cannot be read or a value (or
        an unknown key) does not validate."""
        fields = {**read_config_file(path), **overrides}
        try:
            return cls.model_validate(fields)
        except ValidationError as error:
            raise ConfigError(describe_errors(error, os.fspath(path), overrides)) from error

    @field_validator("behaviors", mode="before")
    @classmethod
    def _read_behaviors(cls, value: Any) -> Any:
        if isinstance(value, (str, list, tuple)):
            return dict(parse_behavior(p) for p in _pieces(value))
        if isinstance(value, dict):
            return {
                name: tuple(p.strip() for p in pair.split(",")) if isinstance(pair, str) else pair
                for name, pair in value.items()
            }
        return value

    @field_validator("weights", mode="before")
    @classmethod
    def _read_weights(cls, value: Any) -> Any:
        if isinstance(value, (str, list, tuple)):
            return dict(parse_weight(p) for p in _pieces(value))
        return value

    @model_validator(mode="after")
    def _one_family(self) -> ServeConfig:
        if self.toy and (self.base or self.behaviors):
            raise ValueError(
                "give either the toy family (--toy, toy=true) or a base model and "
                "behaviors, not both"
            )
        if not self.toy and not self.base:
            raise ValueError(
                "give a base model (--base PATH, base=PATH) or the toy family (--toy, toy=true)"
            )
        return self

    def base_spec(self) -> ModelSpec | None:
        """How the base model loads (None for the toy family); options it leaves out take
        the config's `dtype` and `device_map` when `load_decoder` loads it."""
        return None if self.base is None else _spec(self.base)

    def behavior_specs(self) -> dict[str, Behavior]:
        """Each behavior's fine-tuned and reference models as `ModelSpec`s."""
        from ..loading import Behavior

        return {
            name: Behavior(finetuned=_finetuned(pair.finetuned), reference=_spec(pair.reference))
            for name, pair in self.behaviors.items()
        }

    def load_decoder(self) -> Any:
        """Load the models into one EFTDecoder (an engine)."""
        dtype = torch_dtype(self.dtype or ("float32" if self.toy else "auto"))
        if self.toy:
            from ..toyworld.paths import load_decoder

            kwargs: dict[str, Any] = {
                "dtype": dtype,
                "device_map": self.device_map,
                **self.engine_kwargs(),
            }
            if self.weights:
                kwargs["default_weights"] = self.weights
            return load_decoder(**kwargs)
        from ..decoder import EFTDecoder

        base, behaviors = self.base_spec(), self.behavior_specs()
        _check_quantization(
            [base, *(m for b in behaviors.values() for m in (b.finetuned, b.reference))]
        )
        return EFTDecoder.from_pretrained(
            base=base,
            behaviors=behaviors,
            default_weights=self.weights or None,
            dtype=dtype,
            device_map=self.device_map,
            **self.engine_kwargs(),
        )

    def engine_kwargs(self) -> dict[str, Any]:
        """The engine's keyword arguments of the decoder (batch size, KV memory)."""
        kwargs: dict[str, Any] = {
            "kv_cache_tokens": self.kv_cache_tokens,
            "prefill_chunk": self.prefill_chunk,
            "prefix_caching": self.prefix_caching,
        }
        if self.max_batch_size is not None:
            kwargs["max_batch_size"] = self.max_batch_size
        return kwargs

    def app_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `build_app` (all but the decoder)."""
        return {
            "served_model_name": self.served_model_name,
            "api_key": self.api_key,
            "max_queue": self.max_queue,
            "max_body_bytes": self.max_body_bytes,
            "default_max_tokens": self.default_max_tokens,
            "body_timeout": self.body_timeout,
        }

    def server_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `run_server` beyond the app, host, port and log level."""
        return {
            "timeout_keep_alive": self.timeout_keep_alive,
            "header_timeout": self.header_timeout,
            "limit_concurrency": self.limit_concurrency,
            "shutdown_grace": self.shutdown_grace,
        }

    def build_app(self, decoder: Any = None) -> Any:
        """The FastAPI app over `decoder` (loaded from this config when not given)."""
        return build_app(
            decoder if decoder is not None else self.load_decoder(), **self.app_kwargs()
        )


def _check_quantization(specs: list[Any]) -> None:
    """Fail before any model loads when one asks for quantization without bitsandbytes (else
    transformers fails later, after the models before it have loaded)."""
    import importlib.util

    wanting = [s.name_or_path for s in specs if "quantization_config" in getattr(s, "kwargs", {})]
    if wanting and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            f"quantization of {', '.join(sorted(set(wanting)))} needs bitsandbytes: "
            "pip install bitsandbytes"
        )
