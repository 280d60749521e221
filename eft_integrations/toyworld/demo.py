"""`make demo` / `eft demo`: watch up-scaling work on the shipped toy-world family.

With no flags it loads the five shipped models (no training, no downloads) and prints, on a
fixed subset of held-out questions: the table (small chat, large base, up-scaled EFT, large
chat), the helpful/harmless weight sweep and a few answers side by side. With `--base`,
`--chat` and `--chat-base` it builds an EFT decoder over Hugging Face checkpoints instead and
answers a few prompts (for users with downloads and a GPU).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from collections.abc import Sequence

import torch

from .evaluate import evaluate_family, format_table
from .paths import weights_dir

DEMO_ENTITIES = 40  # held-out entities scored by the demo (4 questions each)

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "Name three prime numbers.",
)


def _print_examples(examples: list[dict], width: int = 100) -> None:
    labels = (
        ("small-helpful", "small chat"),
        ("large-base", "large base"),
        ("eft-up", "EFT up-scaled"),
        ("large-helpful", "large chat"),
    )
    for ex in examples:
        print(f"\nQ: {ex['question']}   (gold: {ex['gold']})")
        for key, label in labels:
            if key in ex:
                answer = textwrap.shorten(ex[key].strip() or "(empty)", width - 18)
                print(f"  {label:<14} | {answer}")


def toy_demo(limit_entities: int = DEMO_ENTITIES, threads: int | None = None) -> dict:
    """Score the shipped family on a subset and print the table, sweep and examples."""
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    print(f"toy world: {limit_entities} held-out entities x 4 questions, greedy decoding")
    result = evaluate_family(
        weights_dir(),
        limit_entities=limit_entities,
        singles=("small-helpful", "large-base", "large-helpful"),
        recall=False,
        settings=(),
        log=lambda _: None,
    )
    print()
    print(format_table(result))
    print("\nExample answers (held-out entities: the small chat model never saw their facts):")
    _print_examples(result["examples"][:6])
    print(f"\n(EFT through {result['eft_backend']}; {time.perf_counter() - start:.0f} s)")
    return result


def hub_demo(
    base: str,
    chat: str,
    chat_base: str,
    prompts: Sequence[str],
    max_new_tokens: int,
    dtype: str,
    device_map: str | None,
) -> None:
    """Up-scale `chat - chat_base` onto `base` and answer `prompts` (needs the checkpoints)."""
    from eft_integrations import Behavior, EFTDecoder

    decoder = EFTDecoder.from_pretrained(
        base=base,
        behaviors={"chat": Behavior(finetuned=chat, reference=chat_base)},
        dtype=dtype,
        device_map=device_map,
    )
    print(f"EFT decoder: {decoder.model_name}")
    formatted = [decoder.format_chat([{"role": "user", "content": p}]) for p in prompts]
    outs = decoder.generate(formatted, max_new_tokens=max_new_tokens, temperature=0.0)
    for prompt, out in zip(prompts, outs, strict=True):
        print(f"\nQ: {prompt}\nA: {out.text.strip()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="eft demo",
        description="Emulated fine-tuning on the shipped toy-world family, "
        "or on Hugging Face checkpoints with --base/--chat/--chat-base.",
    )
    parser.add_argument("--base", help="large base model (hub id or path)")
    parser.add_argument("--chat", help="small chat (fine-tuned) model")
    parser.add_argument("--chat-base", help="the chat model's own base (its reference)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device-map", default=None)
    parser.add_argument(
        "--entities",
        type=int,
        default=DEMO_ENTITIES,
        help="held-out entities scored in the toy demo",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    hub_flags = [args.base, args.chat, args.chat_base]
    if any(hub_flags):
        if not all(hub_flags):
            parser.error("--base, --chat and --chat-base go together")
        hub_demo(
            args.base,
            args.chat,
            args.chat_base,
            args.prompt or DEFAULT_PROMPTS,
            args.max_new_tokens,
            args.dtype,
            args.device_map,
        )
    else:
        toy_demo(args.entities, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
