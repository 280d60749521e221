"""The `eft` command: `eft demo` (toy-world up-scaling, offline), `eft generate` and
`eft serve` (an OpenAI-compatible server over one EFT engine)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .engine import DEFAULT_PREFILL_CHUNK

if TYPE_CHECKING:
    from .serve.config import ServeConfig


def _generate(args: argparse.Namespace) -> None:
    from .decoder import EFTDecoder
    from .loading import Behavior

    behaviors = {}
    if args.chat:
        if not args.chat_base:
            raise SystemExit("--chat needs --chat-base (the base the chat model was tuned from)")
        behaviors["chat"] = Behavior(finetuned=args.chat, reference=args.chat_base)
    decoder = EFTDecoder.from_pretrained(
        base=args.base, behaviors=behaviors, device_map=args.device_map
    )
    prompt = args.prompt
    if args.chat_template:
        prompt = decoder.format_chat([{"role": "user", "content": prompt}])
    weights = {"chat": args.weight} if behaviors else None
    for chunk in decoder.stream(
        prompt,
        weights=weights,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    ):
        print(chunk.text, end="", flush=True)
    print()


def _serve_parser(commands: argparse._SubParsersAction) -> None:
    # Every flag defaults to "not given" (SUPPRESS), so a flag left out neither overrides the
    # config file nor ServeConfig's default; the defaults in the help are ServeConfig's.
    serve = commands.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (needs the `serve` extra)",
        description="Serve /v1/chat/completions, /v1/completions and /v1/models over one EFT "
        "engine; EFT fields (eft_weights, top_k, conservative_top_p, speculative_k) ride in "
        "the request body. Options come from --config FILE and the flags; a flag given "
        "replaces the file's value of the same name.",
        argument_default=argparse.SUPPRESS,
    )
    serve.add_argument(
        "--config",
        metavar="FILE",
        help="a YAML (or .json) file of ServeConfig fields: models with their own loading "
        "options (gguf_file, revision, dtype, ...) and any option below",
    )
    models = serve.add_argument_group("models")
    models.add_argument("--toy", action="store_true", help="the shipped toy-world family")
    models.add_argument("--base", help="base model (hub id or path)")
    models.add_argument(
        "--behavior",
        dest="behaviors",
        action="append",
        metavar="NAME=FT,REF",
        help="a behavior: fine-tuned model and its reference (repeatable); FT may be "
        "adapter:PATH, a PEFT (LoRA) adapter on REF",
    )
    models.add_argument(
        "--weights",
        action="append",
        metavar="NAME=W",
        help="default weight of a behavior (repeatable; others 1.0)",
    )
    models.add_argument("--dtype", help="torch dtype, e.g. bfloat16 (default auto; toy float32)")
    models.add_argument("--device-map", help='e.g. "auto" with accelerate')
    models.add_argument("--max-batch-size", type=int, help="most rows decoded at once")
    models.add_argument(
        "--kv-cache-tokens", type=int, help="KV budget per model in tokens (default: see README)"
    )
    models.add_argument(
        "--prefill-chunk",
        type=int,
        help="prompt tokens per model prefilled per step (0: whole prompts at once; "
        f"default {DEFAULT_PREFILL_CHUNK})",
    )
    models.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="do not reuse the cached KV of prompt prefixes across requests",
    )
    server = serve.add_argument_group("server")
    server.add_argument("--host", help="listen address (default 127.0.0.1)")
    server.add_argument("--port", type=int, help="listen port (default 8000)")
    server.add_argument("--served-model-name", help="the `model` clients send (default eft)")
    server.add_argument(
        "--api-key",
        help="require `Authorization: Bearer KEY` (default: the file's, else $EFT_API_KEY)",
    )
    server.add_argument(
        "--max-queue",
        type=int,
        help="admit at most max-batch-size + N prompts at once (503 with Retry-After beyond)",
    )
    server.add_argument(
        "--max-body-bytes", type=int, help="larger request bodies get 413 (default 4 MiB)"
    )
    server.add_argument(
        "--default-max-tokens",
        type=int,
        help="budget of chat requests naming none (default: context window)",
    )
    server.add_argument("--log-level", help="uvicorn's log level (default info)")
    _limits_parser(serve)


def _limits_parser(serve: argparse.ArgumentParser) -> None:
    """Timeouts and limits: what keeps slow or many clients from holding the server. Left
    out, they take the config file's values, else `ServeConfig`'s defaults (in the help)."""
    limits = serve.add_argument_group("timeouts and limits")
    limits.add_argument(
        "--timeout-keep-alive",
        type=float,
        metavar="SECONDS",
        help="close a connection idle between requests after this long (default 5)",
    )
    limits.add_argument(
        "--header-timeout",
        type=float,
        metavar="SECONDS",
        help="408 and close a connection whose request headers take longer (default 10)",
    )
    limits.add_argument(
        "--body-timeout",
        type=float,
        metavar="SECONDS",
        help="408 and close when a request body takes longer after its headers (default 60)",
    )
    limits.add_argument(
        "--limit-concurrency",
        type=int,
        metavar="N",
        help="answer 503 beyond this many connections and tasks at once (default 1024)",
    )
    limits.add_argument(
        "--shutdown-grace",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM, admit nothing more and let running requests finish this long, "
        "then end them with an error event (default 30)",
    )


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `ServeConfig` fields the `eft serve` flags give: only the flags on the command
    line (each flag's dest is its field's name, but for the two below)."""
    fields = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    if "no_prefix_caching" in fields:
        fields["prefix_caching"] = not fields.pop("no_prefix_caching")
    if "prefill_chunk" in fields:
        fields["prefill_chunk"] = fields["prefill_chunk"] or None  # 0: whole prompts at once
    return fields


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The config of `eft serve`: the `--config` file's fields, replaced by the flags given;
    the API key falls back to $EFT_API_KEY. ConfigError says what is wrong and where."""
    from pydantic import ValidationError

    from .serve.config import ConfigError, ServeConfig, describe_errors

    overrides = serve_overrides(args)
    path = getattr(args, "config", None)
    if path is not None:
        config = ServeConfig.from_file(path, **overrides)
    else:
        try:
            config = ServeConfig(**overrides)
        except ValidationError as error:
            raise ConfigError(describe_errors(error)) from error
    env_key = os.environ.get("EFT_API_KEY")
    if config.api_key is None and env_key:
        config = config.model_copy(update={"api_key": env_key})
    return config


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    try:
        from .serve.config import ConfigError
        from .serve.server import run_server
    except ImportError as error:
        raise SystemExit(
            f"eft serve needs the serve extra: pip install 'eft-integrations[serve]' ({error})"
        ) from error

    try:
        config = serve_config(args)
    except ConfigError as error:
        parser.error(str(error))
    app = config.build_app()
    decoder = app.state.eft.decoder
    print(
        f"serving {decoder.model_name} as {config.served_model_name!r} on "
        f"http://{config.host}:{config.port}/v1",
        flush=True,
    )
    run_server(app, config.host, config.port, log_level=config.log_level, **config.server_kwargs())


def build_parser() -> argparse.ArgumentParser:
    """The parser of `eft` and its commands (`eft demo` parses its own flags)."""
    parser = argparse.ArgumentParser(prog="eft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo",
        help="toy-world up-scaling demo (offline); `eft demo --help` lists its flags",
        add_help=False,
    )

    gen = commands.add_parser("generate", help="EFT-decode one prompt from Hugging Face models")
    gen.add_argument("prompt")
    gen.add_argument("--base", required=True, help="large pre-trained model (id or path)")
    gen.add_argument("--chat", help="small fine-tuned model")
    gen.add_argument("--chat-base", help="the small model's pre-trained base")
    gen.add_argument("--weight", type=float, default=1.0, help="behavior weight (default 1)")
    gen.add_argument(
        "--chat-template", action="store_true", help="wrap the prompt in the chat model's template"
    )
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device-map", default=None, help='e.g. "auto" with accelerate')
    _serve_parser(commands)
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of command `name` (its errors print that command's usage)."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo parses its own flags
        from .toyworld.demo import main as demo_main

        raise SystemExit(demo_main(argv[1:]))
    args = parser.parse_args(argv)
    if args.command == "serve":
        _serve(args, _subparser(parser, "serve"))
    else:
        _generate(args)


if __name__ == "__main__":
    main(sys.argv[1:])
