"""Behaviors as LoRA adapters against the same behaviors as full fine-tuned models.

Two behaviors (helpful, harmless) on one small reference, in three forms, side by side in
one run on the same prompts:
- merged: each adapter merged into a full copy of the reference (three small models, one
  forward each per step), the brute-force form;
- adapters, one forward per view: one backbone holding both adapters, each view running its
  own forward (what the engine does when it cannot group views);
- adapters, mixed batch: the same backbone, one decode forward over every view's rows (PEFT's
  `adapter_names` per row), as the engine runs them.

Resident memory of the small side is the bytes of the distinct parameter tensors (the
backbone once, plus the adapters); step time is greedy decoding of a batch, medians of
interleaved repetitions. Families: the realistic-shape random family (a ~134M base, a ~20M
small reference, 32k vocabulary), with random LoRA weights (r=16 on every projection), since
only the shapes matter for memory and time; and the toy world with its trained LoRA deltas
(r=8, every projection and the output head) on its small base, answering its questions.

Run: `python benchmarks/adapters.py [--batch 8 --tokens 32 --repeats 5]`.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import peft
import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (
    PLAIN_TEMPLATE,
    machine,
    median,
    random_llama,
    random_prompt,
    time_it,
    word_level_tokenizer,
    write_section,
)
from eft_integrations import Adapter, Behavior, EFTDecoder
from eft_integrations.adapters import merged_copy, small_side_bytes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BEHAVIORS = ("helpful", "harmless")


def save_forms(root: Path, base, reference, tokenizer) -> dict[str, Path]:
    """The base, the reference, each behavior as a LoRA adapter and as a merged model."""
    paths = {"base": root / "base", "ref": root / "ref"}
    for name, model in (("base", base), ("ref", reference)):
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    for seed, name in enumerate(BEHAVIORS, start=40):
        torch.manual_seed(seed)
        config = peft.LoraConfig(
            r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False
        )
        adapted = peft.get_peft_model(copy.deepcopy(reference), config)
        adapted.save_pretrained(root / f"{name}-lora")
        merged_copy(adapted, "default").save_pretrained(root / f"{name}-merged")
        tokenizer.save_pretrained(root / f"{name}-merged")
        paths[f"{name}-lora"], paths[f"{name}-merged"] = (
            root / f"{name}-lora",
            root / f"{name}-merged",
        )
    return paths


def toy_forms(root: Path) -> dict[str, Path]:
    """The toy world's shipped LoRA deltas on its small base, and the same merged."""
    from eft_integrations.toyworld.evaluate import load_adapters
    from eft_integrations.toyworld.paths import adapter_dir, model_dir, weights_dir

    paths = {"base": model_dir("large-base"), "ref": model_dir("small-base")}
    backbone = load_adapters(weights_dir())  # small-base holding both, named by behavior
    for name in BEHAVIORS:
        paths[f"{name}-lora"] = adapter_dir(f"small-{name}-lora")
        paths[f"{name}-merged"] = root / f"{name}-merged"
        merged_copy(backbone, name).save_pretrained(paths[f"{name}-merged"])
        AutoTokenizer.from_pretrained(paths["ref"]).save_pretrained(paths[f"{name}-merged"])
    return paths


def decoders(paths: dict[str, Path], **kwargs) -> dict[str, EFTDecoder]:
    common = {"dtype": torch.float32, "max_batch_size": 64, **kwargs}
    merged = EFTDecoder.from_pretrained(
        base=paths["base"],
        behaviors={n: (paths[f"{n}-merged"], paths["ref"]) for n in BEHAVIORS},
        **common,
    )
    as_adapters = {
        n: Behavior(Adapter(paths[f"{n}-lora"], name=n), paths["ref"]) for n in BEHAVIORS
    }
    grouped = EFTDecoder.from_pretrained(base=paths["base"], behaviors=as_adapters, **common)
    per_view = EFTDecoder.from_pretrained(base=paths["base"], behaviors=as_adapters, **common)
    per_view._ensemble.view_groups = []  # each view runs its own forward
    return {"merged": merged, "per view": per_view, "mixed batch": grouped}


def measure(family: str, contenders: dict[str, EFTDecoder], prompts, args) -> list[str]:
    weights = {"helpful": 1.0, "harmless": 0.5}

    def run(decoder: EFTDecoder) -> None:
        decoder.generate(prompts, weights=weights, max_new_tokens=args.tokens, temperature=0)

    outputs = {
        name: [r.token_ids for r in d.generate(prompts, weights=weights, temperature=0,
                                               max_new_tokens=args.tokens)]
        for name, d in contenders.items()
    }  # fmt: skip
    same = all(o == outputs["merged"] for o in outputs.values())
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, decoder in contenders.items():
            times[name].append(time_it(lambda d=decoder: run(d)))
    merged_time = median(times["merged"])
    merged_bytes = small_side_bytes(contenders["merged"])
    rows = []
    for name, decoder in contenders.items():
        forwards_before = decoder.forward_calls
        run(decoder)
        forwards = (decoder.forward_calls - forwards_before) / args.tokens
        seconds = median(times[name])
        size = small_side_bytes(decoder)
        rows.append(
            f"| {family} | {name} | {size / 2**20:.1f} MiB | {size / merged_bytes:.2f}x | "
            f"{forwards:.1f} | {args.batch * args.tokens / seconds:.0f} | "
            f"{merged_time / seconds:.2f}x |"
        )
    print(family, "same greedy tokens:", same, flush=True)
    return rows + ([] if same else [f"| {family} | (outputs differ!) | | | | | |"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = word_level_tokenizer()
    prompts = [random_prompt(args.prompt_tokens, seed=s) for s in range(args.batch)]
    families = {
        "realistic (134M base, 20M small)": ((768, 12, 12), (256, 4, 4)),
        "toy world (its trained LoRA deltas)": None,
    }
    rows = []
    for family, sizes in families.items():
        with tempfile.TemporaryDirectory() as tmp:
            if sizes is None:
                paths = toy_forms(Path(tmp))
                contenders = decoders(paths)
                toy = contenders["merged"]
                questions = [
                    f"When was {name} founded?" for name in ("Zedrai", "Kreman", "Brouni", "Puto")
                ]
                ids = [
                    toy.encode(toy.format_chat([{"role": "user", "content": q}]))
                    for q in questions * (args.batch // len(questions) + 1)
                ][: args.batch]
                rows += measure(family, contenders, ids, args)
            else:
                base = random_llama(*sizes[0], seed=0)
                reference = random_llama(*sizes[1], seed=2)
                paths = save_forms(Path(tmp), base, reference, tokenizer)
                contenders = decoders(paths, eos_token_ids=[], chat_template=PLAIN_TEMPLATE)
                rows += measure(family, contenders, prompts, args)
    write_section(
        "adapters",
        [
            "## Behaviors as LoRA adapters (one backbone) vs full fine-tuned models",
            "",
            f"`python benchmarks/adapters.py --batch {args.batch} --tokens {args.tokens} "
            f"--repeats {args.repeats} --threads {args.threads}`: two behaviors on one small "
            "reference, as two LoRA adapters (random, r=16 on every projection, on the "
            "realistic family; the toy world's trained deltas) or as the same adapters merged "
            "into full copies of the reference (the brute force, three small "
            f"models); greedy decode of {args.batch} prompts x {args.tokens} tokens, medians of "
            f"{args.repeats} interleaved repetitions; {machine(args.threads)}. Small side: the "
            "distinct parameter bytes of every model but the base. Forwards per step count "
            "every model forward (prefills included) over the generated tokens.",
            "",
            "| family | form | small side | vs merged | forwards / token | tok/s | "
            "speed vs merged |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Every form gives the same greedy tokens (checked in the run; the exact equality "
            "with merged weights is `tests/test_adapters.py`). The toy world's adapters adapt "
            "its tied output head, so their merged copies carry an untied head of their own "
            "(3.6 MiB); against its shipped full fine-tunes (2.6 MiB) the adapters take 0.44x. "
            "On models this small a forward costs little more than PEFT's per-row adapter "
            "dispatch, so the mixed batch gains less there than at the realistic shapes.",
            "",
        ],
    )


if __name__ == "__main__":
    main()
