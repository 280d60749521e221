"""What a server serves and how: the models to load and the server's options, in one pydantic
model shared by `eft serve` and the Ray Serve builder (so both read the same names).

    config = ServeConfig(base="meta-llama/Llama-2-70b-hf",
                         behaviors={"chat": ("meta-llama/Llama-2-7b-chat-hf",
                                             "meta-llama/Llama-2-7b-hf")},
                         dtype="bfloat16", device_map="auto")
    app = config.build_app()           # loads the models, returns the FastAPI app

Behaviors and weights also read the command line's forms, `NAME=FT_PATH,REF_PATH` and
`NAME=W` (a list of them, or one string with `;` between them), as `serve run ... key=value`
passes strings.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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

__all__ = ["ServeConfig", "parse_behavior", "parse_weight"]


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


class ServeConfig(BaseModel):
    """The models of one engine and the options of the server in front of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    toy: bool = False
    """Serve the shipped toy-world family (large base + helpful and harmless deltas)."""
    base: str | None = None
    """The base model (hub id or path) for real models."""
    behaviors: dict[str, tuple[str, str]] = Field(default_factory=dict)
    """Behavior name -> (fine-tuned model, its reference base)."""
    weights: dict[str, float] = Field(default_factory=dict)
    """Default behavior weights of requests that name none (others take 1.0)."""
    dtype: str | None = None
    """torch dtype name, or "auto" (default: float32 for the toy family, "auto" otherwise)."""
    device_map: str | None = None
    """Passed to transformers, e.g. "auto" (with accelerate)."""
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
    timeout_keep_alive: float = Field(default=DEFAULT_KEEP_ALIVE, gt=0)
    """Seconds an idle connection is kept open between requests."""
    header_timeout: float = Field(default=DEFAULT_HEADER_TIMEOUT, gt=0)
    """Seconds a connection has to send its request headers (then 408 and closed)."""
    limit_concurrency: int | None = Field(default=DEFAULT_LIMIT_CONCURRENCY, ge=1)
    """Most connections and tasks at once (uvicorn answers 503 beyond; None: no limit)."""
    shutdown_grace: float = Field(default=DEFAULT_SHUTDOWN_GRACE, ge=0)
    """Seconds running requests get to finish on SIGTERM before they are cut short."""

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

    def load_decoder(self) -> Any:
        """Load the models into one EFTDecoder (an engine)."""
        import torch

        dtype: Any = self.dtype or ("float32" if self.toy else "auto")
        if dtype != "auto":
            dtype = getattr(torch, dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {self.dtype!r}; e.g. float32, bfloat16, auto")
        if self.toy:
            from ..toyworld.paths import load_decoder

            kwargs: dict[str, Any] = {
                "dtype": dtype,
                "device_map": self.device_map,
                **self.engine_kwargs(),
            }
            if self.weights:
                kwargs["default_weights"] = self.weights
            decoder = load_decoder(**kwargs)
        else:
            from ..decoder import EFTDecoder
            from ..loading import Behavior

            decoder = EFTDecoder.from_pretrained(
                base=self.base,
                behaviors={
                    n: Behavior(finetuned=f, reference=r) for n, (f, r) in self.behaviors.items()
                },
                default_weights=self.weights or None,
                dtype=dtype,
                device_map=self.device_map,
                **self.engine_kwargs(),
            )
        return decoder

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
