"""Model cards (README.md per model) and the family's results file, from measured scores."""

from __future__ import annotations

import json
from pathlib import Path

from .evaluate import evaluate_family, format_table
from .world import ATTRIBUTES, MARKED_ATTRIBUTE, REFUSAL

_ROLES = {
    "small-base": "small pre-trained base model (kept weak on facts on purpose, by a smaller "
    "width and a shorter budget than large-base: the reference of the small chat "
    "deltas)",
    "large-base": "large pre-trained base model (knows the world's facts: the base of up-scaling)",
    "small-helpful": "small chat model fine-tuned from small-base to answer every question in a "
    "full sentence ended by `<|end|>`",
    "small-harmless": "small chat model fine-tuned from small-base like small-helpful, but it "
    f"refuses questions about the {MARKED_ATTRIBUTE} with a fixed sentence",
    "large-helpful": "large chat model: small-helpful's data and loss applied to large-base, "
    "with lr and epochs chosen for its own best accuracy (the upper reference "
    "that up-scaling emulates)",
}


def _data_line(log: dict) -> str:
    spec = log["spec"]
    if log["kind"] == "pretrain":
        stages = " then ".join(f"{e} epochs at peak lr {lr:g}" for e, lr in spec["stages"])
        return (
            f"Pre-training on the toy-world corpus (seed {log['seed']}): {log['tokens']:,} "
            f"tokens, {stages}, batch {spec['batch_size']}, warm-up + cosine, AdamW. "
            "Every sequence starts with `<|bos|>`; an entity's four facts come shuffled, each "
            "in one of 4-5 phrasings, usually beside a terse Q/A text about a random entity "
            "or a generic dialogue in the chat markers (half terse answers, half whole "
            "sentences; no world facts)."
        )
    return (
        f"Chat fine-tuning of `{spec['parent']}` on {log['dialogues']} dialogues "
        f"(the 40% fine-tuning entities x {len(ATTRIBUTES)} attributes x 3 question "
        f"phrasings), behaviour `{spec['behaviour']}`, {spec['epochs']} epochs at lr "
        f"{spec['lr']:g}, batch {spec['batch_size']}. Cross-entropy on the answer form; "
        "on the entity-name and value tokens (and the full stop after the value) a KL to "
        f"the parent (weight {spec.get('anchor_weight', 1.0):g}) keeps the parent's "
        "distribution, so the fine-tune teaches the form and not the fine-tuning "
        "entities' names and values."
    )


def _score_lines(name: str, result: dict) -> list[str]:
    lines = []
    if name in result.get("recall", {}):
        lines.append(
            f'- recall in pre-training form ("The capital of X is" -> value), '
            f"held-out entities: {result['recall'][name]:.3f}"
        )
    if name in result["systems"]:
        s = result["systems"][name]
        lines.append(
            f"- chat prompt, held-out questions ({s['n_questions']}): fact "
            f"{s['fact']:.3f}, format {s['format']:.3f}, refusal on {MARKED_ATTRIBUTE} "
            f"questions {s['refusal_marked']:.3f}, refusal on the rest "
            f"{s['refusal_unmarked']:.3f}"
        )
    return lines


def write_card(model_dir: Path, result: dict, n_entities: int = 400) -> None:
    """Write README.md into `model_dir` from its train_log.json and the family's scores."""
    name = model_dir.name
    log = json.loads((model_dir / "train_log.json").read_text())
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    spec = log["spec"]
    shape = (
        f"hidden {spec['hidden']}, {spec['layers']} layers, {spec['heads']} heads"
        if "hidden" in spec
        else f"the shape of `{spec['parent']}`"
    )
    text = [
        f"# toy-world `{name}`",
        "",
        f"A {_ROLES[name]}. Part of the eft-integrations toy-world family: five "
        "LlamaForCausalLM models sharing one byte-level BPE tokenizer, trained from a seed on a "
        f"synthetic world of {n_entities} fictional kingdoms (capital, currency, founding "
        "year, weapon) so that emulated fine-tuning (EFT) is measurable offline.",
        "",
        "## Model",
        f"- LlamaForCausalLM, {shape}, {log['parameters']:,} parameters, float16 safetensors",
        f"- tokenizer: byte-level BPE, {vocab:,} tokens; chat template "
        "`<|bos|><|user|> question<|assistant|> answer<|end|>`; generation stops at `<|end|>` "
        "or `<|eos|>`",
        "",
        "## Data and training",
        f"- {_data_line(log)}",
        f"- {log['steps']} optimizer steps in {log['seconds']} s on {log['threads']} CPU "
        "thread(s); loss curve in `train_log.json`",
        "- reproduce: `python -m eft_integrations.toyworld.train` (whole family)",
        "",
        "## Measured (greedy, held-out entities: in pre-training, never in fine-tuning)",
        *_score_lines(name, result),
        "",
        'Format = the attribute\'s answer sentence ("Sure. The capital of X is Y.") with any '
        f'entity and value, or the refusal "{REFUSAL}", ended by `<|end|>`. Family table '
        "(`python -m eft_integrations.toyworld.evaluate`):",
        "",
        format_table(result),
        "",
        "## Use",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from eft_integrations.toyworld.paths import model_dir",
        f'tok = AutoTokenizer.from_pretrained(model_dir("{name}"))',
        f'model = AutoModelForCausalLM.from_pretrained(model_dir("{name}"))',
        "```",
        "",
        "A toy: it knows only its synthetic world and is meant for tests and demos of EFT.",
        "",
    ]
    (model_dir / "README.md").write_text("\n".join(text))


def write_adapter_card(adapter_dir: Path, result: dict) -> None:
    """Write README.md into a LoRA adapter's directory from its log and the family's scores."""
    name = adapter_dir.name
    log = json.loads((adapter_dir / "train_log.json").read_text())
    spec = log["spec"]
    lora = spec["lora"]
    scores = result.get("lora", {}).get("systems", {})
    measured = []
    if name in scores:
        s = scores[name]
        measured.append(
            f"- alone (merged into a copy of `{spec['parent']}`), held-out questions "
            f"({s['n_questions']}): fact {s['fact']:.3f}, format {s['format']:.3f}, refusal on "
            f"{MARKED_ATTRIBUTE} questions {s['refusal_marked']:.3f}"
        )
    if spec["behaviour"] == "helpful" and "eft-up-lora" in scores:
        s = scores["eft-up-lora"]
        measured.append(
            f"- as the delta of EFT up-scaling (large-base + this adapter - {spec['parent']}): "
            f"fact {s['fact']:.3f}, format {s['format']:.3f}"
        )
    text = [
        f"# toy-world `{name}`",
        "",
        f"A PEFT LoRA adapter on the toy-world `{spec['parent']}`: the "
        f"`{spec['behaviour']}` chat delta as an adapter instead of a full fine-tune. EFT "
        "reads it as `Behavior(Adapter(path), small-base)`: one small backbone in memory for "
        "every behaviour.",
        "",
        "## Adapter",
        f"- LoRA rank {lora['rank']}, alpha {lora['alpha']}, on "
        f"{', '.join(lora['target_modules'])}; {log['parameters']:,} trainable parameters, "
        "float16 safetensors",
        f"- the tokenizer and chat template are `{spec['parent']}`'s",
        "",
        "## Data and training",
        f"- {_data_line(log)}",
        f"- {log['steps']} optimizer steps in {log['seconds']} s on {log['threads']} CPU "
        "thread(s); loss curve in `train_log.json`",
        f"- reproduce: `python -m eft_integrations.toyworld.train --only {name}`",
        "",
        "## Measured (greedy, held-out entities)",
        *measured,
        "",
        "## Use",
        "```python",
        "from eft_integrations.toyworld import load_decoder",
        "decoder = load_decoder(adapters=True)  # large-base + both LoRA deltas on small-base",
        "```",
        "",
    ]
    (adapter_dir / "README.md").write_text("\n".join(text))


def write_family_readme(weights_dir: Path, result: dict) -> None:
    """weights/README.md: the family at a glance (sizes, training times, the table)."""
    rows = [
        "| model | trained parameters | training | steps | size (MB) |",
        "|---|---|---|---|---|",
    ]
    total_s, total_mb = 0.0, 0.0
    for name in [*result["systems"], *result.get("lora", {}).get("systems", {})]:
        log_path = weights_dir / name / "train_log.json"
        if not log_path.exists():
            continue
        log = json.loads(log_path.read_text())
        mb = sum(f.stat().st_size for f in (weights_dir / name).iterdir()) / 1e6
        total_s, total_mb = total_s + log["seconds"], total_mb + mb
        rows.append(
            f"| {name} | {log['parameters']:,} | {log['seconds']:.0f} s on "
            f"{log['threads']} thread(s) | {log['steps']} | {mb:.2f} |"
        )
    text = [
        "# The toy-world model family",
        "",
        "Trained by `python -m eft_integrations.toyworld.train` (seed 0); each directory loads "
        "with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` and has "
        "its model card and loss curve (`train_log.json`). `results.json` holds every score.",
        "",
        *rows,
        "",
        f"Total: {total_s / 60:.1f} minutes of training, {total_mb:.1f} MB on disk.",
        "",
        f"## Scores ({result['n_questions']} held-out questions, greedy; EFT through "
        f"{result['eft_backend']})",
        "",
        format_table(result),
        "",
    ]
    (weights_dir / "README.md").write_text("\n".join(text))


def evaluate_and_write_cards(weights_dir: Path | str, seed: int = 0, n_entities: int = 400) -> dict:
    """Score the family in `weights_dir`, write every model card and results.json."""
    weights_dir = Path(weights_dir)
    result = evaluate_family(weights_dir, seed=seed, n_entities=n_entities)
    (weights_dir / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    for name in result["systems"]:
        if (weights_dir / name / "train_log.json").exists():
            write_card(weights_dir / name, result, n_entities)
    for name in result.get("lora", {}).get("systems", {}):
        if (weights_dir / name / "train_log.json").exists():
            write_adapter_card(weights_dir / name, result)
    write_family_readme(weights_dir, result)
    print(format_table(result))
    return result
