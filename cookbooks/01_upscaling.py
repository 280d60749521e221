# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1. Up-scaling, and the paper's scale grid, on the toy world
#
# Emulated fine-tuning (EFT, Mitchell et al., ICLR 2024) decodes every token from
#
#     log p(y) = log p_base(y) + w * (log p_chat(y) - log p_ref(y))      (renormalised)
#
# so the *pre-training* scale (the base) and the *fine-tuning* scale (the chat model and its
# reference) can be chosen independently. The paper crosses them in a 2x2 grid and finds that
# **scaling pre-training mostly improves factuality, scaling fine-tuning mostly improves
# helpfulness**.
#
# This notebook runs that grid on the toy world that ships with the package: a seeded world of
# fictional kingdoms and five tiny Llama models sharing one tokenizer. Every question is about a
# *held-out* kingdom: its facts were in pre-training, never in chat fine-tuning. "Fact" = the
# gold value appears in the answer; "format" = the answer is the chat sentence
# ("Sure. The capital of X is Y.") ended by the end-of-turn token (see
# `eft_integrations.toyworld.evaluate`). Greedy decoding, offline, about a minute on one CPU
# thread.

# %%
import json
import os
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to files, then shown
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm inside a notebook
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars (model loading) in the outputs

import matplotlib.pyplot as plt
from IPython.display import Image, display

from eft_integrations.toyworld import evaluate
from eft_integrations.toyworld.paths import MODEL_NAMES, load_decoder, model_dir, weights_dir
from eft_integrations.toyworld.world import World

FIGURES = Path("figures")
FIGURES.mkdir(exist_ok=True)

# %% [markdown]
# ## The family
#
# All four cells of the grid can be built from the shipped models, so nothing is trained here:
# the small chat model (`small-helpful`) and the large one (`large-helpful`) are fine-tuned on
# the same dialogues, each from its own base.

# %%
for name in MODEL_NAMES:
    config = json.loads((model_dir(name) / "config.json").read_text())
    log = json.loads((model_dir(name) / "train_log.json").read_text())
    print(
        f"{name:15s} hidden {config['hidden_size']:3d} x {config['num_hidden_layers']} layers, "
        f"{log['parameters']:>9,} parameters, {log['kind']}"
    )
assert set(MODEL_NAMES) == {
    "small-base",
    "small-helpful",
    "small-harmless",
    "large-base",
    "large-helpful",
}

# %% [markdown]
# ## The grid: four decoders (and the two bases without fine-tuning)
#
# | pre-training \ fine-tuning | small | large |
# |---|---|---|
# | **small** | small chat | EFT down-scaled = small base + (large chat - large base) |
# | **large** | EFT up-scaled = large base + (small chat - small base) | large chat |
#
# `load_decoder` builds each one through the same `EFTDecoder`; a model alone is a decoder with
# no behaviours. The models are tiny, so each engine may decode 240 rows at once (its default,
# 32, suits real models).

# %%
ROWS = 240
decoders = {
    "small base": load_decoder(base="small-base", behaviors=(), max_batch_size=ROWS),
    "large base": load_decoder(base="large-base", behaviors=(), max_batch_size=ROWS),
    "small chat": load_decoder(base="small-helpful", behaviors=(), max_batch_size=ROWS),
    "large chat": load_decoder(base="large-helpful", behaviors=(), max_batch_size=ROWS),
    "EFT up-scaled": load_decoder(behaviors=("helpful",), max_batch_size=ROWS),
    "EFT down-scaled": load_decoder(
        base="small-base", behaviors=("helpful",), scale="large", max_batch_size=ROWS
    ),
}
for label, decoder in decoders.items():
    print(f"{label:16s} {decoder.model_name}")
GRID = {  # (pre-training scale, fine-tuning scale) -> system
    ("small", "small"): "small chat",
    ("small", "large"): "EFT down-scaled",
    ("large", "small"): "EFT up-scaled",
    ("large", "large"): "large chat",
}

# %% [markdown]
# ## A few answers
#
# The small chat model answers in the right form but invents the value; the large base knows
# the value but does not answer like a chat model. Up-scaling gets both.

# %%
world = World.generate(seed=0)
questions = world.eval_questions()  # 240 held-out kingdoms x 4 attributes
prompts = evaluate.chat_prompts(questions)
for q, prompt in list(zip(questions, prompts, strict=True))[:3]:
    print(f"Q: {q.text}   (gold: {q.answer})")
    for label, decoder in decoders.items():
        out = decoder.generate(prompt, temperature=0.0, max_new_tokens=24)
        print(f"  {label:16s}: {out.text!r}")
    print()

# %% [markdown]
# Why it works, one token at a time: at the value's position the composed distribution takes
# the large base's knowledge of the value, while the delta (chat - base) is nearly flat there.

# %%
q = questions[0]
prefix = prompts[0] + f" Sure. The capital of {q.entity} is"
for label in ("small chat", "large base", "EFT up-scaled"):
    decoder = decoders[label]
    top = decoder.next_token_logprobs(prefix).topk(3)
    shown = ", ".join(
        f"{decoder.tokenizer.decode([int(i)])!r} {float(p.exp()):.2f}"
        for p, i in zip(top.values, top.indices, strict=True)
    )
    print(f"{label:14s} next token: {shown}")
gold_first = decoders["EFT up-scaled"].tokenizer.encode(" " + q.answer)[0]
eft_top = int(decoders["EFT up-scaled"].next_token_logprobs(prefix).argmax())
assert eft_top == gold_first, "EFT's most likely next token starts the gold capital"

# %% [markdown]
# ## Scores on all 960 held-out questions

# %%
scores, answers = {}, {}
for label, decoder in decoders.items():
    start = time.perf_counter()
    scores[label], answers[label] = evaluate.evaluate_chat(
        evaluate.decoder_generator(decoder, None, batch_size=ROWS), questions
    )
    print(f"{label:16s} scored in {time.perf_counter() - start:5.1f} s")

print(f"\n{'system':16s} {'pre-training':>12s} {'fine-tuning':>12s} {'fact':>6s} {'format':>7s}")
scale_of = {v: k for k, v in GRID.items()}
for label, s in scores.items():
    pre, ft = scale_of.get(label, (label.split()[0], "none"))
    print(f"{label:16s} {pre:>12s} {ft:>12s} {s.fact:6.3f} {s.format:7.3f}")

# %%
print("the grid (fact / format):")
print(f"{'pre-training / fine-tuning':27s} {'small':>15s} {'large':>15s}")
for pre in ("small", "large"):
    cells = [scores[GRID[pre, ft]] for ft in ("small", "large")]
    print(f"{pre:27s} " + " ".join(f"{c.fact:6.3f} / {c.format:5.3f}" for c in cells))


def change(metric, a, b):
    return getattr(scores[GRID[b]], metric) - getattr(scores[GRID[a]], metric)


print("\nscaling pre-training (small -> large):")
for ft in ("small", "large"):
    print(
        f"  with {ft} fine-tuning: fact {change('fact', ('small', ft), ('large', ft)):+.3f}, "
        f"format {change('format', ('small', ft), ('large', ft)):+.3f}"
    )
print("scaling fine-tuning (small -> large):")
for pre in ("small", "large"):
    print(
        f"  with {pre} pre-training: fact {change('fact', (pre, 'small'), (pre, 'large')):+.3f}, "
        f"format {change('format', (pre, 'small'), (pre, 'large')):+.3f}"
    )
gap = scores["large chat"].fact - scores["small chat"].fact
recovered = (scores["EFT up-scaled"].fact - scores["small chat"].fact) / gap
print(f"\nup-scaling recovers {recovered:.2f} of the fact gap between small and large chat")

# %% [markdown]
# What the grid shows, and where the toy world departs from the paper:
#
# - **Scaling pre-training brings the facts**, in both columns: small-pre-trained systems
#   answer almost no held-out fact, large-pre-trained ones most of them. Up-scaling recovers
#   most of the gap between the small and the large chat model without training the large one.
# - **Scaling fine-tuning adds few facts**: none on the small base (the fine-tunes keep their
#   parent's distribution on entity and value tokens, by design of the trainer); on the large
#   base, large chat (fine-tuned from that very base: the target EFT emulates) knows 0.13 more
#   than up-scaling. It helps the format only on the large base, by a few points.
# - **Down-scaling loses format**, unlike the paper's down-scaled models, which were nearly as
#   helpful as the large chat model. The toy world's "helpfulness" is one fixed sentence that
#   the small chat model already learns well (0.94); the large delta, applied to the small base,
#   asks it to copy unseen kingdom names it cannot copy, and about a fifth of its answers break
#   the sentence. So in this world the fine-tuning scale does not carry helpfulness the way the
#   paper measured it with GPT-4 judgements on open-ended prompts; only the factuality half of
#   the claim is reproduced.
#
# The cells below check each of these statements on the numbers above.

# %%
for ft in ("small", "large"):
    assert change("fact", ("small", ft), ("large", ft)) > 0.5  # pre-training brings facts
for pre in ("small", "large"):
    assert abs(change("fact", (pre, "small"), (pre, "large"))) < 0.2  # fine-tuning does not
assert recovered > 0.75
assert scores["large chat"].format >= scores["EFT up-scaled"].format
assert scores["EFT down-scaled"].format < scores["small chat"].format - 0.05
assert scores["small base"].format == scores["large base"].format == 0.0  # no fine-tuning

# %% [markdown]
# The same figures are in the family's model cards (`eft_integrations/toyworld/weights/`,
# written by `python -m eft_integrations.toyworld.evaluate`'s scorer from `results.json`):

# %%
card = json.loads((weights_dir() / "results.json").read_text())["systems"]
keys = {
    "small chat": "small-helpful",
    "large chat": "large-helpful",
    "EFT up-scaled": "eft-up",
    "EFT down-scaled": "eft-down",
}
for label, key in keys.items():
    print(f"{label:16s} card: fact {card[key]['fact']:.3f}, format {card[key]['format']:.3f}")
    # greedy decoding is deterministic; other CPUs may differ in a few float ties
    assert abs(card[key]["fact"] - scores[label].fact) < 0.02
    assert abs(card[key]["format"] - scores[label].format) < 0.02

# %% [markdown]
# ## The figure

# %%
ticks = {  # the bars, left to right, and their scales
    "small base": "no FT",
    "large base": "no FT",
    "small chat": "small PT, small FT",
    "EFT down-scaled": "small PT, large FT",
    "EFT up-scaled": "large PT, small FT",
    "large chat": "large PT, large FT",
}
labels = list(ticks)
fig, ax = plt.subplots(figsize=(9, 4))
xs = range(len(labels))
width = 0.38
fact = [scores[label].fact for label in labels]
form = [scores[label].format for label in labels]
ax.bar([x - width / 2 for x in xs], fact, width, label="fact accuracy", color="#1f77b4")
ax.bar([x + width / 2 for x in xs], form, width, label="chat format", color="#ff7f0e")
for x, f, g in zip(xs, fact, form, strict=True):
    ax.text(x - width / 2, f + 0.01, f"{f:.2f}", ha="center", fontsize=8)
    ax.text(x + width / 2, g + 0.01, f"{g:.2f}", ha="center", fontsize=8)
ax.set_xticks(list(xs))
ax.set_xticklabels([f"{label}\n{ticks[label]}" for label in labels], fontsize=8)
ax.set_ylim(0, 1.1)
ax.set_ylabel("rate on 960 held-out questions")
ax.set_title("Toy world: pre-training scale (PT) brings the facts; any fine-tuning (FT) the format")
ax.legend(loc="upper left")
fig.tight_layout()
fig.savefig(FIGURES / "upscaling_grid.png", dpi=110)
plt.close(fig)
display(Image(filename=str(FIGURES / "upscaling_grid.png")))
