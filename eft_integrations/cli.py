"""The `eft` command: `eft demo` (toy-world up-scaling, offline) and `eft generate`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _generate(args: argparse.Namespace) -> None:
    from .decoder import EFTDecoder
    from .loading import Behavior

    behaviors = {}
    if args.chat:
        if not args.chat_base:
            raise SystemExit("--chat needs --chat-base (the base the chat model was tuned from)")
        behaviors["chat"] = Behavior(finetuned=args.chat, reference=args.chat_base)
    decoder = EFTDecoder.from_pretrained(base=args.base, behaviors=behaviors,
                                         device_map=args.device_map)
    prompt = args.prompt
    if args.chat_template:
        prompt = decoder.format_chat([{"role": "user", "content": prompt}])
    weights = {"chat": args.weight} if behaviors else None
    for chunk in decoder.stream(prompt, weights=weights, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, seed=args.seed):
        print(chunk.text, end="", flush=True)
    print()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="eft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="toy-world up-scaling demo (offline); `eft demo --help` "
                        "lists its flags", add_help=False)

    gen = commands.add_parser("generate", help="EFT-decode one prompt from Hugging Face models")
    gen.add_argument("prompt")
    gen.add_argument("--base", required=True, help="large pre-trained model (id or path)")
    gen.add_argument("--chat", help="small fine-tuned model")
    gen.add_argument("--chat-base", help="the small model's pre-trained base")
    gen.add_argument("--weight", type=float, default=1.0, help="behavior weight (default 1)")
    gen.add_argument("--chat-template", action="store_true",
                     help="wrap the prompt in the chat model's template")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device-map", default=None, help='e.g. "auto" with accelerate')

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo parses its own flags
        from .toyworld.demo import main as demo_main

        raise SystemExit(demo_main(argv[1:]))
    _generate(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
