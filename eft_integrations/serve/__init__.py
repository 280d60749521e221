"""Serving: an OpenAI-compatible HTTP app over one EFT engine, and its Ray Serve deployment.

    from eft_integrations.serve import build_app
    app = build_app(decoder, served_model_name="eft")     # a FastAPI app; or `eft serve`

Needs the `serve` extra (FastAPI, uvicorn, sse-starlette); `eft_integrations.serve.ray` needs
the `ray` extra. Importing `eft_integrations` imports none of them.
"""

from .app import APIError, build_app
from .config import ConfigError, ModelOptions, ServeConfig
from .server import BackgroundServer, run_server

__all__ = [
    "APIError",
    "BackgroundServer",
    "ConfigError",
    "ModelOptions",
    "ServeConfig",
    "build_app",
    "run_server",
]
