"""The OpenAI-compatible app as a Ray Serve deployment: one replica holds one engine (one
`EFTDecoder`); replicas, autoscaling and resources come from Ray Serve's own config.

    serve run eft_integrations.serve.ray:app_builder toy=true
    serve run eft_integrations.serve.ray:app_builder base=meta-llama/Llama-2-70b-hf \\
        behaviors="chat=meta-llama/Llama-2-7b-chat-hf,meta-llama/Llama-2-7b-hf"
    serve run eft_integrations.serve.ray:app_builder config=eft.yaml max_batch_size=32
    serve deploy config.yaml          # import_path: eft_integrations.serve.ray:app_builder

or from Python: `serve.run(app_builder({"toy": True}))`. The builder's arguments are the fields
of `ServeConfig` (models with their own loading options included), or `config`, the path of an
`eft serve --config` file, whose fields the other arguments replace. Each replica loads its
models in its constructor, then builds the same FastAPI app `eft serve` runs (Ray Serve's
late-bound ingress, `__serve_build_asgi_app__`), so routes, errors and streaming are the
single-machine server's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from .config import ServeConfig

__all__ = ["EFTDeployment", "app_builder", "builder_config"]


@serve.deployment(name="EFTDeployment", max_ongoing_requests=256)
@serve.ingress()
class EFTDeployment:
    """One replica: one engine and the OpenAI-compatible app in front of it."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.decoder = config.load_decoder()

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The app over this replica's engine (Ray Serve calls this after `__init__`)."""
        return self.config.build_app(self.decoder)


def app_builder(args: dict[str, Any]) -> Application:
    """A Ray Serve application from `ServeConfig` fields (strings from `serve run key=value`
    are read as the command line reads them); `config: FILE` reads the fields of an
    `eft serve --config` file first, and the other arguments replace its values."""
    return EFTDeployment.bind(builder_config(args))


def builder_config(args: Mapping[str, Any]) -> ServeConfig:
    """The `ServeConfig` of `app_builder`'s arguments (validated here, before any replica
    starts, so a bad argument fails `serve run` / `serve deploy` with the field's name)."""
    fields = dict(args)
    path = fields.pop("config", None)
    if path is None:
        return ServeConfig.model_validate(fields)
    return ServeConfig.from_file(path, **fields)
