"""The `eft` command: `eft demo` (toy-world up-scaling, offline), `eft generate` and
`eft serve` (an OpenAI-compatible server over one EFT engine)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .engine import DEFAULT_PREFILL_CHUNK


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
    serve = commands.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (needs the `serve` extra)",
        description="Serve /v1/chat/completions, /v1/completions and /v1/models over one EFT "
        "engine; EFT fields (eft_weights, top_k, conservative_top_p, speculative_k) ride in "
        "the request body.",
    )
    models = serve.add_argument_group("models")
    models.add_argument("--toy", action="store_true", help="the shipped toy-world family")
    models.add_argument("--base", help="base model (hub id or path)")
    models.add_argument(
        "--behavior",
        action="append",
        default=[],
        metavar="NAME=FT,REF",
        help="a behavior: fine-tuned model and its reference (repeatable)",
    )
    models.add_argument(
        "--weights",
        action="append",
        default=[],
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
        default=DEFAULT_PREFILL_CHUNK,
        help="prompt tokens per model prefilled per step (0: whole prompts at once)",
    )
    models.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="do not reuse the cached KV of prompt prefixes across requests",
    )
    server = serve.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--served-model-name", default="eft", help="the `model` clients send")
    server.add_argument(
        "--api-key",
        default=os.environ.get("EFT_API_KEY"),
        help="require `Authorization: Bearer KEY` (default: $EFT_API_KEY)",
    )
    server.add_argument(
        "--max-queue",
        type=int,
        help="admit at most max-batch-size + N prompts at once (503 with Retry-After beyond)",
    )
    server.add_argument(
        "--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger request bodies get 413"
    )
    server.add_argument(
        "--default-max-tokens",
        type=int,
        help="budget of chat requests naming none (default: context window)",
    )
    server.add_argument("--log-level", default="info")
    _limits_parser(serve)


def _limits_parser(serve: argparse.ArgumentParser) -> None:
    """Timeouts and limits: what keeps slow or many clients from holding the server. Left
    out, they take `ServeConfig`'s defaults (given in the help)."""
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


_LIMITS = (
    "timeout_keep_alive",
    "header_timeout",
    "body_timeout",
    "limit_concurrency",
    "shutdown_grace",
)
"""The `ServeConfig` fields of `_limits_parser`'s flags."""


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    try:
        from .serve.config import ServeConfig
        from .serve.server import run_server
    except ImportError as error:
        raise SystemExit(
            f"eft serve needs the serve extra: pip install 'eft-integrations[serve]' ({error})"
        ) from error
    from pydantic import ValidationError

    try:
        config = ServeConfig(
            toy=args.toy,
            base=args.base,
            behaviors=args.behavior,
            weights=args.weights,
            dtype=args.dtype,
            device_map=args.device_map,
            max_batch_size=args.max_batch_size,
            kv_cache_tokens=args.kv_cache_tokens,
            prefill_chunk=args.prefill_chunk or None,
            prefix_caching=not args.no_prefix_caching,
            served_model_name=args.served_model_name,
            api_key=args.api_key,
            max_queue=args.max_queue,
            max_body_bytes=args.max_body_bytes,
            default_max_tokens=args.default_max_tokens,
            **{name: getattr(args, name) for name in _LIMITS if getattr(args, name) is not None},
        )
    except ValidationError as error:
        parser.error("; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors()))
    app = config.build_app()
    decoder = app.state.eft.decoder
    print(
        f"serving {decoder.model_name} as {config.served_model_name!r} on "
        f"http://{args.host}:{args.port}/v1",
        flush=True,
    )
    run_server(app, args.host, args.port, log_level=args.log_level, **config.server_kwargs())


def main(argv: Sequence[str] | None = None) -> None:
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

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo parses its own flags
        from .toyworld.demo import main as demo_main

        raise SystemExit(demo_main(argv[1:]))
    args = parser.parse_args(argv)
    if args.command == "serve":
        _serve(args, commands.choices["serve"])
    else:
        _generate(args)


if __name__ == "__main__":
    main(sys.argv[1:])
