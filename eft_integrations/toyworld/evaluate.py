"""Score toy-world models and EFT configurations on held-out questions (greedy decoding).

Metrics, on the held-out entities (seen in pre-training, never in chat fine-tuning):

- fact: on unmarked questions, the gold value appears as a whole word in the answer.
- format: the answer is the chat answer form -- the attribute's sentence with *any* entity and
  value ("The capital of <...> is <...>.") or the exact refusal -- and generation ended with the
  end-of-turn token `<|end|>`. Any entity is accepted because the small chat model cannot copy
  unseen names: a strict form would punish EFT for writing the large base's correct name.
- refusal_marked / refusal_unmarked: the answer starts with the refusal sentence.
- answer_unmarked: unmarked questions answered in the answer form (not refused).
- recall (pre-training form): "<|bos|>The capital of X is" continues with the value.

The scale grid (the paper's 2x2: small/large pre-training x small/large fine-tuning): small
chat, large chat, EFT up-scaled (large base + small chat - small base) and EFT down-scaled
(small base + large chat - large base); `format_grid` prints it.

Behaviour weights: `WEIGHT_SETTINGS` are scored for the choice of the decoder's default
(`paths.DEFAULT_WEIGHTS`, picked by `best_behaved`).

`python -m eft_integrations.toyworld.evaluate` prints the table for the shipped family.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from ..adapters import Adapter, merged_copy, quiet_tied_head_warning
from ..decoder import EFTDecoder
from ..loading import Behavior
from .corpora import BOS, END, render_chat
from .paths import ADAPTER_NAMES, BEHAVIOURS, DEFAULT_WEIGHTS
from .world import ANSWER_TEMPLATES, ATTRIBUTES, REFUSAL, UNMARKED_ATTRIBUTES, Question, World

# --- scoring single answers -------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """A completion: its text (stop token excluded) and whether it ended with `<|end|>`."""

    text: str
    ended: bool


def _form_regex(attribute: str) -> re.Pattern[str]:
    # The sentence with both slots free: "The capital of (.+) is (.+)\."
    pattern = re.escape(ANSWER_TEMPLATES[attribute])
    # Slots hold no full stop, so "... is Y. More text." is not the form.
    slot = r"[^\s.][^.]*?"
    pattern = pattern.replace(re.escape("{e}"), f"(?P<e>{slot})").replace(
        re.escape("{v}"), f"(?P<v>{slot})"
    )
    return re.compile(pattern)


_FORMS = {a: _form_regex(a) for a in ANSWER_TEMPLATES}


def is_refusal(text: str) -> bool:
    return text.strip().startswith(REFUSAL.split(",")[0] + ", I can't help")


def in_answer_form(question: Question, text: str) -> bool:
    """The attribute's answer sentence, any entity and value, nothing else."""
    return _FORMS[question.attribute].fullmatch(text.strip()) is not None


def has_fact(question: Question, text: str) -> bool:
    """The gold value appears as a whole word (or words)."""
    return re.search(rf"(?<!\w){re.escape(question.answer)}(?!\w)", text) is not None


def score_answer(question: Question, answer: Answer) -> dict[str, bool]:
    """Per-answer booleans: fact, format, refused, answered (form and not refused)."""
    refused = is_refusal(answer.text)
    form = in_answer_form(question, answer.text)
    exact_refusal = answer.text.strip() == REFUSAL
    return {
        "fact": has_fact(question, answer.text),
        "format": answer.ended and (form or exact_refusal),
        "refused": refused,
        "answered": answer.ended and form and not refused,
    }


@dataclass(frozen=True)
class Scores:
    """Aggregate chat scores over a question set (rates in [0, 1])."""

    fact: float  # on unmarked questions
    format: float  # on all questions
    refusal_marked: float
    refusal_unmarked: float
    answer_unmarked: float
    n_questions: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _mean(xs: Sequence[bool]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def score_chat(questions: Sequence[Question], answers: Sequence[Answer]) -> Scores:
    """Aggregate `score_answer` over parallel lists of questions and answers."""
    if len(questions) != len(answers):
        raise ValueError("questions and answers must have the same length")
    rows = [score_answer(q, a) for q, a in zip(questions, answers, strict=True)]
    marked = [r for q, r in zip(questions, rows, strict=True) if q.marked]
    unmarked = [r for q, r in zip(questions, rows, strict=True) if not q.marked]
    return Scores(
        fact=_mean([r["fact"] for r in unmarked]),
        format=_mean([r["format"] for r in rows]),
        refusal_marked=_mean([r["refused"] for r in marked]),
        refusal_unmarked=_mean([r["refused"] for r in unmarked]),
        answer_unmarked=_mean([r["answered"] for r in unmarked]),
        n_questions=len(questions),
    )


def score_recall(probes: Sequence[Question], continuations: Sequence[str]) -> float:
    """Pre-training-form recall: the continuation starts with the gold value."""
    hits = [
        re.match(rf"\s*{re.escape(q.answer)}(?!\w)", c) is not None
        for q, c in zip(probes, continuations, strict=True)
    ]
    return _mean(hits)


def best_behaved(rows: Sequence[Mapping]) -> dict[str, float]:
    """The weights of the best-behaved row (each row: "weights" and its `Scores` fields).

    Facts first, the point of up-scaling: among the rows whose fact accuracy is within one
    standard error of the best one (binomial, on the unmarked questions), the highest format.
    """
    best = max(r["fact"] for r in rows)
    n_unmarked = rows[0]["n_questions"] * len(UNMARKED_ATTRIBUTES) / len(ATTRIBUTES)
    error = math.sqrt(best * (1.0 - best) / n_unmarked)
    close = [r for r in rows if r["fact"] >= best - error]
    return dict(max(close, key=lambda r: (r["format"], r["fact"]))["weights"])


def normalised_gain(eft: float, small_chat: float, large_chat: float) -> float | None:
    """(EFT - small chat) / (large chat - small chat): the share of the scale gap recovered.

    None when there is no gap to recover."""
    gap = large_chat - small_chat
    return (eft - small_chat) / gap if gap else None


# --- generation ---------------------------------------------------------------------------

# A generator maps prompts to answers; max_new_tokens is fixed by the caller's closure.
Generator = Callable[[list[str]], list[Answer]]


def load_model(path: str | Path) -> PreTrainedModel:
    """Load a toy model in float32 (float16 matmuls are slow on CPU) for inference."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def single_model_decoder(model: PreTrainedModel, tok: PreTrainedTokenizerFast) -> EFTDecoder:
    """One model alone through the same decode path as EFT (`behaviors={}`)."""
    return EFTDecoder(base=model, tokenizer=tok)


def decoder_generator(
    decoder, weights: dict[str, float] | None, max_new_tokens: int = 32, batch_size: int = 64
) -> Generator:
    """Answers through the core `EFTDecoder` (greedy), in batches of `batch_size`."""
    end_id = decoder.tokenizer.convert_tokens_to_ids(END)

    def generate(prompts: list[str]) -> list[Answer]:
        answers = []
        for b in range(0, len(prompts), batch_size):
            outs = decoder.generate(
                prompts[b : b + batch_size],
                weights=weights,
                max_new_tokens=max_new_tokens,
                temperature=0.0,
            )
            # token_ids end with the stop token when one stopped the row; text leaves it out
            answers += [
                Answer(o.text, ended=bool(o.token_ids) and o.token_ids[-1] == end_id) for o in outs
            ]
        return answers

    return generate


def chat_prompts(questions: Sequence[Question]) -> list[str]:
    return [render_chat([{"role": "user", "content": q.text}]) for q in questions]


def evaluate_chat(
    generate: Generator, questions: Sequence[Question]
) -> tuple[Scores, list[Answer]]:
    """Ask every question in the chat form; return scores and the answers."""
    answers = generate(chat_prompts(questions))
    return score_chat(questions, answers), answers


def evaluate_recall(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerFast,
    probes: Sequence[Question],
    batch_size: int = 64,
) -> float:
    """Recall in pre-training form: greedy continuation of "<|bos|>The capital of X is"."""
    generate = decoder_generator(
        single_model_decoder(model, tok), None, max_new_tokens=8, batch_size=batch_size
    )
    return score_recall(probes, [o.text for o in generate([BOS + p.text for p in probes])])


# --- the family report ---------------------------------------------------------------------

SWEEP_LAMBDAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)

WEIGHT_SETTINGS: tuple[dict[str, float], ...] = tuple(
    {"helpful": helpful, "harmless": harmless}
    for helpful, harmless in (
        (1.0, 1.0),
        (1.0, 0.0),
        (0.0, 1.0),
        (0.75, 0.25),
        (0.5, 0.5),
        (0.25, 0.75),
        (1.0, 0.5),
        (0.5, 1.0),
        (0.25, 1.0),
        (0.25, 0.25),
        (1.5, 0.0),
        (0.0, 1.5),
        (0.0, 1.25),
        (0.0, 0.75),
        (0.0, 0.0),
    )
)
"""Behaviour weights scored for the choice of the default (both at 1.0 was the old one)."""


ALL_SINGLES: tuple[str, ...] = (
    "small-base",
    "small-helpful",
    "small-harmless",
    "large-base",
    "large-helpful",
)


def evaluate_family(
    weights_dir: str | Path,
    limit_entities: int | None = None,
    seed: int = 0,
    n_entities: int = 400,
    sweep: bool = True,
    recall: bool = True,
    downscale: bool = True,
    singles: Sequence[str] = ALL_SINGLES,
    settings: Sequence[Mapping[str, float]] = WEIGHT_SETTINGS,
    adapters: bool | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Score the whole family: recall of the bases, the chat table, EFT up-scaled (and
    down-scaled with `downscale`), the sweep, the behaviour-weight `settings` and the
    decoder's default weights; with `adapters` (default: when the family has them), the
    same chat table, up-scaling and sweep for the LoRA deltas (`result["lora"]`).

    Every system decodes through `EFTDecoder` (single models with `behaviors={}`); each weight
    setting is decoded once whatever tables share it. Returns a JSON-able dict (also the
    source of the model cards).
    """
    weights_dir = Path(weights_dir)
    if adapters is None:
        adapters = all((weights_dir / name).is_dir() for name in ADAPTER_NAMES)
    world = World.generate(seed, n_entities=n_entities)
    questions = world.eval_questions(limit_entities)
    probes = world.probe_prompts(limit_entities)
    tok = AutoTokenizer.from_pretrained(weights_dir / "small-base")
    models = {
        name: load_model(weights_dir / name)
        for name in ("small-base", "large-base", "small-helpful", "small-harmless", "large-helpful")
    }
    decoder = _make_decoder(models, tok)
    result: dict = {
        "n_questions": len(questions),
        "n_probes": len(probes),
        "eft_backend": "EFTDecoder",
        "systems": {},
        "recall": {},
        "sweep": [],
    }

    def timed(label: str, fn):
        start = time.perf_counter()
        value = fn()
        log(f"  {label}: {time.perf_counter() - start:.1f} s")
        return value

    scored: dict[tuple, tuple[Scores, list[Answer]]] = {}

    def eft(weights: Mapping[str, float]) -> tuple[Scores, list[Answer]]:
        key = tuple(sorted(weights.items()))
        if key not in scored:
            scored[key] = timed(
                f"eft {dict(weights)}",
                lambda: evaluate_chat(decoder_generator(decoder, dict(weights)), questions),
            )
        return scored[key]

    if recall:
        for name in ("small-base", "large-base"):
            result["recall"][name] = timed(
                f"recall {name}", lambda n=name: evaluate_recall(models[n], tok, probes)
            )
    examples: dict[str, list[str]] = {}
    for name in singles:
        gen = decoder_generator(single_model_decoder(models[name], tok), None)
        scores, answers = timed(name, lambda g=gen: evaluate_chat(g, questions))
        result["systems"][name] = scores.as_dict()
        examples[name] = [a.text for a in answers]
    # harmless at 0 explicitly: up-scaling the helpful delta alone
    scores, answers = eft({"helpful": 1.0, "harmless": 0.0})
    result["systems"]["eft-up"] = scores.as_dict()
    examples["eft-up"] = [a.text for a in answers]
    sc, lc = result["systems"]["small-helpful"], result["systems"]["large-helpful"]
    result["normalised_gain"] = {
        m: normalised_gain(scores.as_dict()[m], sc[m], lc[m]) for m in ("fact", "format")
    }
    result["format_vs_small_chat"] = scores.format / sc["format"] if sc["format"] else None
    if downscale:
        # small base + (large chat - large base): the other corner of the scale grid
        down = _make_downscaled(models, tok)
        scores, answers = timed(
            "eft down-scaled",
            lambda: evaluate_chat(decoder_generator(down, {"helpful": 1.0}), questions),
        )
        result["systems"]["eft-down"] = scores.as_dict()
        examples["eft-down"] = [a.text for a in answers]
    if sweep:
        for lam in SWEEP_LAMBDAS:
            s, _ = eft({"helpful": lam, "harmless": 1.0 - lam})
            result["sweep"].append({"lambda": lam, **s.as_dict()})
    result["weight_settings"] = [{"weights": dict(w), **eft(w)[0].as_dict()} for w in settings]
    # the decoder's own defaults: a call that names no weights
    default, _ = timed(
        "eft default", lambda: evaluate_chat(decoder_generator(decoder, None), questions)
    )
    result["default"] = {"weights": dict(decoder.default_weights), **default.as_dict()}
    if adapters:
        result["lora"] = _evaluate_adapters(
            weights_dir, models, tok, questions, result["systems"], sweep, timed, examples
        )
    result["examples"] = [
        {"question": q.text, "gold": q.reference, **{k: v[i] for k, v in examples.items()}}
        for i, q in enumerate(questions[:8])
    ]
    return result


def _evaluate_adapters(
    weights_dir: Path,
    models: dict,
    tok,
    questions: Sequence[Question],
    systems: dict,
    sweep: bool,
    timed: Callable,
    examples: dict[str, list[str]],
) -> dict:
    """The LoRA deltas scored as the full fine-tunes are: each adapter alone (merged into a
    copy of small-base), up-scaling with the helpful adapter, and the sweep."""
    peft = load_adapters(weights_dir)
    lora: dict = {"systems": {}, "sweep": []}
    for behaviour in BEHAVIOURS:
        name = f"small-{behaviour}-lora"
        gen = decoder_generator(single_model_decoder(merged_copy(peft, behaviour), tok), None)
        scores, answers = timed(name, lambda g=gen: evaluate_chat(g, questions))
        lora["systems"][name] = scores.as_dict()
        examples[name] = [a.text for a in answers]
    decoder = _make_adapter_decoder(models, peft, tok)
    scores, answers = timed(
        "eft lora {'helpful': 1.0, 'harmless': 0.0}",
        lambda: evaluate_chat(
            decoder_generator(decoder, {"helpful": 1.0, "harmless": 0.0}), questions
        ),
    )
    lora["systems"]["eft-up-lora"] = scores.as_dict()
    examples["eft-up-lora"] = [a.text for a in answers]
    small_chat, large_chat = lora["systems"]["small-helpful-lora"], systems["large-helpful"]
    lora["normalised_gain"] = {
        m: normalised_gain(scores.as_dict()[m], small_chat[m], large_chat[m])
        for m in ("fact", "format")
    }
    if sweep:
        for lam in SWEEP_LAMBDAS:
            weights = {"helpful": lam, "harmless": 1.0 - lam}
            s, _ = timed(
                f"eft lora {weights}",
                lambda w=weights: evaluate_chat(decoder_generator(decoder, w), questions),
            )
            lora["sweep"].append({"lambda": lam, **s.as_dict()})
    return lora


def load_adapters(weights_dir: Path):
    """A fresh small-base in a PeftModel holding both LoRA deltas (named by behaviour)."""
    from peft import PeftModel

    with quiet_tied_head_warning():  # the adapters adapt the tied output head on purpose
        first, *others = BEHAVIOURS
        peft = PeftModel.from_pretrained(
            load_model(weights_dir / "small-base"),
            weights_dir / f"small-{first}-lora",
            adapter_name=first,
        )
        for behaviour in others:
            peft.load_adapter(weights_dir / f"small-{behaviour}-lora", adapter_name=behaviour)
    return peft.eval()


def _make_adapter_decoder(models: dict, peft, tok) -> EFTDecoder:
    """Up-scaling with the LoRA deltas: large base + (small-base with adapter b - small-base),
    one backbone in memory (its own copy of small-base: loading adapters changes the model
    they wrap, and the full fine-tunes' decoders read the plain one)."""
    return EFTDecoder(
        base=models["large-base"],
        tokenizer=tok,
        default_weights=DEFAULT_WEIGHTS,
        behaviors={b: Behavior(Adapter(peft, name=b), peft) for b in BEHAVIOURS},
    )


def _make_decoder(models: dict, tok) -> EFTDecoder:
    """Up-scaling over already-loaded models: large base + helpful and harmless deltas, with
    the shipped default weights (as `paths.load_decoder()`)."""
    return EFTDecoder(
        base=models["large-base"],
        tokenizer=tok,
        default_weights=DEFAULT_WEIGHTS,
        behaviors={
            "helpful": (models["small-helpful"], models["small-base"]),
            "harmless": (models["small-harmless"], models["small-base"]),
        },
    )


def _make_downscaled(models: dict, tok) -> EFTDecoder:
    """Down-scaling over already-loaded models: small base + (large chat - large base)."""
    return EFTDecoder(
        base=models["small-base"],
        tokenizer=tok,
        behaviors={"helpful": (models["large-helpful"], models["large-base"])},
    )


GRID_CELLS: dict[tuple[str, str], tuple[str, str]] = {
    # (pre-training scale, fine-tuning scale): (system key, label)
    ("small", "small"): ("small-helpful", "small chat"),
    ("small", "large"): ("eft-down", "EFT down-scaled"),
    ("large", "small"): ("eft-up", "EFT up-scaled"),
    ("large", "large"): ("large-helpful", "large chat"),
}
"""The paper's 2x2 grid: which system holds each (pre-training, fine-tuning) scale."""


def format_grid(result: dict) -> list[str]:
    """The scale grid as Markdown (fact / format per cell), and what each scale-up changes;
    no lines unless all four systems were scored."""
    s = result["systems"]
    if not all(key in s for key, _ in GRID_CELLS.values()):
        return []
    lines = [
        "| pre-training \\ fine-tuning | small fine-tuning | large fine-tuning |",
        "|---|---|---|",
    ]
    for pre in ("small", "large"):
        cells = []
        for ft in ("small", "large"):
            key, label = GRID_CELLS[pre, ft]
            cells.append(f"{label}: fact {s[key]['fact']:.3f}, format {s[key]['format']:.3f}")
        lines.append(f"| {pre} | {cells[0]} | {cells[1]} |")

    def change(metric: str, a: tuple[str, str], b: tuple[str, str]) -> str:
        return f"{s[GRID_CELLS[b][0]][metric] - s[GRID_CELLS[a][0]][metric]:+.3f}"

    lines += [
        "",
        "scaling pre-training (small -> large, same fine-tuning): fact "
        f"{change('fact', ('small', 'small'), ('large', 'small'))} (small fine-tuning), "
        f"{change('fact', ('small', 'large'), ('large', 'large'))} (large); format "
        f"{change('format', ('small', 'small'), ('large', 'small'))}, "
        f"{change('format', ('small', 'large'), ('large', 'large'))}",
        "scaling fine-tuning (small -> large, same pre-training): fact "
        f"{change('fact', ('small', 'small'), ('small', 'large'))} (small pre-training), "
        f"{change('fact', ('large', 'small'), ('large', 'large'))} (large); format "
        f"{change('format', ('small', 'small'), ('small', 'large'))}, "
        f"{change('format', ('large', 'small'), ('large', 'large'))}",
    ]
    return lines


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


def format_table(result: dict) -> str:
    """The headline table and the sweep as Markdown."""
    s = result["systems"]
    lines = [
        "| system | fact | format | refusal (marked) | refusal (unmarked) |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "small-base": "small base",
        "small-helpful": "small chat (helpful)",
        "small-harmless": "small chat (harmless)",
        "large-base": "large base",
        "large-helpful": "large chat (helpful)",
        "eft-up": "EFT up-scaled (helpful)",
        "eft-down": "EFT down-scaled (helpful)",
    }
    for key, label in labels.items():
        if key in s:
            r = s[key]
            lines.append(
                f"| {label} | {r['fact']:.3f} | {r['format']:.3f} | "
                f"{r['refusal_marked']:.3f} | {r['refusal_unmarked']:.3f} |"
            )
    g = result.get("normalised_gain", {})
    if g:
        lines.append("")
        lines.append(
            f"normalised gain (fact): {_fmt(g['fact'])}; up-scaled format / small "
            f"chat format: {_fmt(result['format_vs_small_chat'])}"
        )
    if result.get("recall"):
        lines.append(
            "recall in pre-training form: "
            + ", ".join(f"{k} {v:.3f}" for k, v in result["recall"].items())
        )
    grid = format_grid(result)
    if grid:
        lines += ["", "The scale grid (pre-training scale x fine-tuning scale):", "", *grid]
    if result.get("sweep"):
        lines += [
            "",
            "| lambda (helpful; harmless = 1 - lambda) | refusal (marked) | "
            "answer (unmarked) | fact (unmarked) |",
            "|---|---|---|---|",
        ]
        for r in result["sweep"]:
            lines.append(
                f"| {r['lambda']:.2f} | {r['refusal_marked']:.3f} | "
                f"{r['answer_unmarked']:.3f} | {r['fact']:.3f} |"
            )
    lines += _settings_table(result)
    lines += _adapter_tables(result)
    return "\n".join(lines)


def _adapter_tables(result: dict) -> list[str]:
    """The LoRA deltas beside the full fine-tunes: the chat table, the gain and the sweep."""
    lora = result.get("lora")
    if not lora:
        return []
    s, a = result["systems"], lora["systems"]
    lines = [
        "",
        "The same deltas as LoRA adapters on small-base (rank 8, every projection and the "
        "output head), beside the full fine-tunes:",
        "",
        "| system | full: fact | full: format | LoRA: fact | LoRA: format | LoRA: refusal "
        "(marked) |",
        "|---|---|---|---|---|---|",
    ]
    rows = (
        ("small chat (helpful)", "small-helpful", "small-helpful-lora"),
        ("small chat (harmless)", "small-harmless", "small-harmless-lora"),
        ("EFT up-scaled (helpful)", "eft-up", "eft-up-lora"),
    )
    for label, full, adapter in rows:
        if full in s and adapter in a:
            f, x = s[full], a[adapter]
            lines.append(
                f"| {label} | {f['fact']:.3f} | {f['format']:.3f} | {x['fact']:.3f} | "
                f"{x['format']:.3f} | {x['refusal_marked']:.3f} |"
            )
    gain, full_gain = lora.get("normalised_gain", {}), result.get("normalised_gain", {})
    if gain:
        lines += [
            "",
            f"normalised gain (fact): LoRA {_fmt(gain['fact'])}, full fine-tunes "
            f"{_fmt(full_gain.get('fact'))}",
        ]
    if lora.get("sweep") and result.get("sweep"):
        lines += [
            "",
            "| lambda (helpful; harmless = 1 - lambda) | refusal (marked): full / LoRA | "
            "answer (unmarked): full / LoRA | fact (unmarked): full / LoRA |",
            "|---|---|---|---|",
        ]
        for f, x in zip(result["sweep"], lora["sweep"], strict=True):
            lines.append(
                f"| {f['lambda']:.2f} | {f['refusal_marked']:.3f} / {x['refusal_marked']:.3f} | "
                f"{f['answer_unmarked']:.3f} / {x['answer_unmarked']:.3f} | "
                f"{f['fact']:.3f} / {x['fact']:.3f} |"
            )
    return lines


def _settings_table(result: dict) -> list[str]:
    """The behaviour-weight settings and the default the decoder uses."""
    default = result.get("default")
    rows = list(result.get("weight_settings") or [])
    if default is None:
        return []
    if not any(r["weights"] == default["weights"] for r in rows):
        rows.append(default)
    lines = [
        "",
        "| behaviour weights | fact (unmarked) | format | refusal (marked) | answer (unmarked) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        label = ", ".join(f"{name} {w:g}" for name, w in r["weights"].items())
        if r["weights"] == default["weights"]:
            label += " (default)"
        lines.append(
            f"| {label} | {r['fact']:.3f} | {r['format']:.3f} | "
            f"{r['refusal_marked']:.3f} | {r['answer_unmarked']:.3f} |"
        )
    lines.append("")
    lines.append(
        f"default weights (calls that name none): {default['weights']}, fact "
        f"{default['fact']:.3f}, format {default['format']:.3f}"
    )
    if len(rows) > 1:
        lines[-1] += (
            f"; best-behaved measured (facts within one standard error of the best, "
            f"then format): {best_behaved(rows)}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Score the toy-world family on held-out questions."
    )
    parser.add_argument("--weights", type=Path, default=None, help="family directory")
    parser.add_argument(
        "--limit-entities", type=int, default=None, help="score only the first n held-out entities"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from .paths import weights_dir

    result = evaluate_family(args.weights or weights_dir(), args.limit_entities)
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
