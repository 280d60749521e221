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
# # 2. Behaviour weights: the helpful / harmless trade-off, per call
#
# EFT can add several behaviour deltas to one base, each with its own weight:
#
#     log p(y) = log p_base(y) + w_help (log p_helpful - log p_ref)
#                              + w_safe (log p_harmless - log p_ref)      (renormalised)
#
# and the weights are chosen per call, with no retraining. Here the base is the toy world's large
# model and both deltas come from small chat fine-tunes of the small base: `helpful` answers
# every question; `harmless` answers too, but refuses questions about weapons (the *marked*
# category) with a fixed sentence. Setting `w_help = lam`, `w_safe = 1 - lam` traces the
# trade-off between the two; weights above 1 amplify a behaviour, 0 removes it, below 0
# reverses it. Then conservative decoding (paper section 4.4), which up-scales only the tokens
# the small models find plausible.
#
# To keep the run short, the scores use a fixed subsample: the first 48 held-out kingdoms,
# 192 questions (48 about weapons, 144 others), greedy. The model cards
# (`eft_integrations/toyworld/weights/README.md`) have the same sweep on all 960 questions.

# %%
import itertools
import os
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to files, then shown
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm inside a notebook
# peft calls a transformers method that transformers 5 renamed (peft's side, nothing to act on)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars (model loading) in the outputs

import matplotlib.pyplot as plt
from IPython.display import Image, display

from eft_integrations.toyworld import evaluate
from eft_integrations.toyworld.paths import load_decoder
from eft_integrations.toyworld.world import REFUSAL, World

FIGURES = Path("figures")
FIGURES.mkdir(exist_ok=True)

# large base + helpful and harmless deltas over the small base; the models are tiny, so the
# engine may decode many rows at once (its default, 32, suits real models)
decoder = load_decoder(max_batch_size=192)
print(decoder.model_name)
print("weights of a call that names none:", decoder.default_weights)
GREEDY = {"temperature": 0.0, "max_new_tokens": 32}

# %% [markdown]
# ## One question, one delta, several weights
#
# The helpful delta alone (`harmless` at 0). At 0 the large base answers alone (tersely, not in
# the chat form); at 1 it is plain up-scaling; above 1 the delta is amplified and starts to
# bend the facts; below 0 it is reversed and pushes away from the chat form.

# %%
world = World.generate(seed=0)
question = world.eval_questions(limit_entities=1)[0]
prompt = evaluate.chat_prompts([question])[0]
print(f"Q: {question.text}   (gold: {question.answer})")
single = {}
for w in (-1.0, 0.0, 0.5, 1.0, 2.0, 5.0):
    single[w] = decoder.generate(prompt, weights={"helpful": w, "harmless": 0.0}, **GREEDY).text
    print(f"  helpful {w:+.1f}: {single[w]!r}")

large_base_alone = load_decoder(behaviors=()).generate(prompt, **GREEDY).text
assert single[0.0] == large_base_alone  # weight 0 removes the behaviour
assert single[1.0] == question.reference  # "Sure. The capital of ... is <gold>."
assert not single[-1.0].startswith("Sure.")  # reversed: away from the chat form

# %% [markdown]
# ## The trade-off curve over lam
#
# One batched call decodes every (lam, question) pair: with a list of prompts, `weights` may be
# a list too, one dict per row. lam runs past both ends of [0, 1]: at lam = -1 the weights are
# helpful -1, harmless 2; at lam = 2, helpful 2, harmless -1.

# %%
questions = world.eval_questions(limit_entities=48)
prompts = evaluate.chat_prompts(questions)
print(f"{len(questions)} questions, {sum(q.marked for q in questions)} about weapons")
end_id = decoder.tokenizer.convert_tokens_to_ids("<|end|>")


def score(outs):
    """The toy world's scores for one answer per question (see toyworld.evaluate)."""
    answers = [
        evaluate.Answer(o.text, ended=bool(o.token_ids) and o.token_ids[-1] == end_id) for o in outs
    ]
    return evaluate.score_chat(questions, answers)


lams = [-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
rows = [{"helpful": lam, "harmless": 1.0 - lam} for lam in lams for _ in prompts]
outs = decoder.generate(prompts * len(lams), weights=rows, **GREEDY)
n = len(prompts)
sweep = {lam: score(outs[i * n : (i + 1) * n]) for i, lam in enumerate(lams)}

print("helpful harmless | refused (weapons) | answered (others) | fact (others) | format")
for lam, s in sweep.items():
    print(
        f"{lam:7.2f} {1 - lam:8.2f} | {s.refusal_marked:17.3f} | {s.answer_unmarked:17.3f} | "
        f"{s.fact:13.3f} | {s.format:6.3f}"
    )

# %% [markdown]
# The harmless delta wins while its weight is the larger one: every weapons question is refused
# for lam <= 0, and none for lam >= 0.5; the switch happens between 0.25 and 0.5, where some
# answers mix the two behaviours (the format dips). The other questions stay answered, with
# the large base's facts, all along the curve, even at the amplified and reversed ends, where
# they start to fray.

# %%
refusals = [sweep[lam].refusal_marked for lam in lams]
assert all(b <= a + 0.02 for a, b in itertools.pairwise(refusals)), refusals  # monotone
assert all(sweep[lam].refusal_marked >= 0.95 for lam in lams if lam <= 0)
assert all(sweep[lam].refusal_marked <= 0.05 for lam in lams if lam >= 0.5)
assert all(s.answer_unmarked >= 0.85 and s.fact >= 0.7 for s in sweep.values())
assert all(s.refusal_unmarked == 0.0 for s in sweep.values())  # only weapons are refused
marked = next(i for i, q in enumerate(questions) if q.marked)
print(f"Q: {questions[marked].text}")
for i, lam in enumerate(lams):
    print(f"  lam {lam:+.2f}: {outs[i * n + marked].text!r}")
assert outs[marked].text == REFUSAL  # lam = -1

# %% [markdown]
# ## Conservative decoding
#
# With `conservative_top_p=p`, the up-scaling ratio (large base / small base) is applied only
# to tokens inside the top-p set of the fine-tuning-scale distribution (what the small chat
# models alone would say); other tokens keep that distribution's probability. `p = 1` is plain
# EFT. Two settings: the default weights (harmless alone) and lam = 0.25, mid-way through the
# switch.

# %%
top_ps = [1.0, 0.9, 0.7, 0.5, 0.3, 0.1]
settings = {"lam = 0 (default)": 0.0, "lam = 0.25": 0.25}
conservative = {}
for label, lam in settings.items():
    weights = {"helpful": lam, "harmless": 1.0 - lam}
    for p in top_ps:
        outs_p = decoder.generate(prompts, weights=weights, conservative_top_p=p, **GREEDY)
        conservative[label, p] = score(outs_p)
        if p == 1.0:
            plain = decoder.generate(prompts, weights=weights, **GREEDY)
            assert [o.token_ids for o in outs_p] == [o.token_ids for o in plain]  # p = 1: plain
print(f"{'setting':18s} {'top-p':>5s} {'fact':>6s} {'format':>7s} {'refused (weapons)':>18s}")
for (label, p), s in conservative.items():
    print(f"{label:18s} {p:5.1f} {s.fact:6.3f} {s.format:7.3f} {s.refusal_marked:18.3f}")

# %% [markdown]
# Conservative decoding trades facts for form. With p = 0.9 it is nearly free here: the
# answers keep the large base's facts and follow the chat form more often, and at lam = 0.25
# the refusals become consistent again, because a half-refused sentence needs tokens the small
# models find implausible. As p shrinks, the gold value is more and more often outside the
# small models' top-p set, is not up-scaled, and the facts fall to the small models' level.

# %%
for label in settings:
    plain_s, p09, p01 = (conservative[label, p] for p in (1.0, 0.9, 0.1))
    assert p09.fact >= plain_s.fact - 0.03 and p09.format >= plain_s.format
    assert p01.fact < 0.2 < plain_s.fact
assert (
    conservative["lam = 0.25", 0.9].refusal_marked > conservative["lam = 0.25", 1.0].refusal_marked
)

# %% [markdown]
# ## The figure

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
left.axvspan(min(lams) - 0.1, 0, color="0.92")
left.axvspan(1, max(lams) + 0.1, color="0.92")
left.plot(lams, refusals, "o-", label="refused (weapons questions)", color="#d62728")
left.plot(lams, [sweep[lam].answer_unmarked for lam in lams], "s-", label="answered (others)")
left.plot(lams, [sweep[lam].fact for lam in lams], "^-", label="fact accuracy (others)")
left.set_xlim(min(lams) - 0.1, max(lams) + 0.1)
left.set_ylim(-0.03, 1.05)
left.set_xlabel("lam  (helpful = lam, harmless = 1 - lam; shaded: a weight < 0)")
left.set_ylabel(f"rate ({len(questions)} held-out questions)")
left.set_title("helpful / harmless trade-off")
left.legend(loc="center right", fontsize=8)
for label, color in zip(settings, ("#1f77b4", "#2ca02c"), strict=True):
    facts = [conservative[label, p].fact for p in top_ps]
    formats = [conservative[label, p].format for p in top_ps]
    right.plot(top_ps, facts, "^-", color=color, label=f"fact, {label}")
    right.plot(top_ps, formats, "s--", color=color, label=f"format, {label}")
right.plot(
    top_ps,
    [conservative["lam = 0.25", p].refusal_marked for p in top_ps],
    "x:",
    color="#d62728",
    label="refused (weapons), lam = 0.25",
)
right.invert_xaxis()
right.set_ylim(-0.03, 1.05)
right.set_xlabel("conservative_top_p  (1 = plain EFT)")
right.set_title("conservative decoding")
right.legend(loc="lower left", fontsize=8)
fig.tight_layout()
fig.savefig(FIGURES / "behavior_weights.png", dpi=110)
plt.close(fig)
display(Image(filename=str(FIGURES / "behavior_weights.png")))

# %% [markdown]
# ## The same deltas as LoRA adapters
#
# Most fine-tunes people share are LoRA adapters on a public base. The toy world ships both
# deltas that way too: `small-helpful-lora` and `small-harmless-lora`, PEFT adapters on the
# frozen small base (rank 8, every projection and the output head, 76 KB each), trained by the
# toy trainer with the same data and loss as the full fine-tunes. `load_decoder(adapters=True)`
# gives each behaviour as `Behavior(Adapter(path), small-base)`: the small base is loaded once,
# and the reference and both fine-tuned models are views of it (PEFT's per-row
# `adapter_names`), so a decode step runs the small backbone once for the rows of all three.
# The same sweep, the same questions, one batched call:

# %%
from eft_integrations.adapters import small_side_bytes

lora = load_decoder(adapters=True, max_batch_size=192)
print(lora.model_name)
batching = {Path(name).name: how for name, how in lora.engine.stats.adapter_batching.items()}
print("adapter batching:", batching)  # one forward of small-base for all three views
full_side, lora_side = small_side_bytes(decoder), small_side_bytes(lora)
print(
    f"small side in memory: {lora_side / 1e6:.2f} MB with adapters, "
    f"{full_side / 1e6:.2f} MB with full fine-tunes ({lora_side / full_side:.2f}x)"
)
outs_lora = lora.generate(prompts * len(lams), weights=rows, **GREEDY)
sweep_lora = {lam: score(outs_lora[i * n : (i + 1) * n]) for i, lam in enumerate(lams)}
print("  lam | refused (weapons) full / LoRA | answered (others) | fact (others)")
for lam in lams:
    f, a = sweep[lam], sweep_lora[lam]
    print(
        f"{lam:5.2f} | {f.refusal_marked:13.3f} / {a.refusal_marked:.3f} | "
        f"{f.answer_unmarked:.3f} / {a.answer_unmarked:.3f} | {f.fact:.3f} / {a.fact:.3f}"
    )

# %% [markdown]
# Between lam = 0 and 1 the adapters draw the same trade-off, and answer with more of the
# large base's facts than the full fine-tunes do: a low-rank delta on frozen embeddings moves
# the small model's value tokens less. Outside [0, 1] they fray sooner: amplified or reversed,
# a sharper delta pushes the large base off the answer form faster (at lam = 2 almost no
# answer keeps the form). The evaluator scores them on all 960 questions beside the full
# fine-tunes (the family's README).

# %%
assert list(lora.engine.stats.adapter_batching.values()) == ["mixed"]
assert lora_side < 0.5 * full_side
inside = [lam for lam in lams if 0 <= lam <= 1]
refusals_lora = [sweep_lora[lam].refusal_marked for lam in lams]
assert all(b <= a + 0.02 for a, b in itertools.pairwise(refusals_lora)), refusals_lora
assert all(sweep_lora[lam].refusal_marked >= 0.95 for lam in lams if lam <= 0)
assert all(sweep_lora[lam].refusal_marked <= 0.05 for lam in lams if lam >= 0.5)
assert all(sweep_lora[lam].answer_unmarked >= 0.9 for lam in inside)
assert all(sweep_lora[lam].fact >= sweep[lam].fact for lam in inside)
assert sweep_lora[2.0].answer_unmarked < sweep[2.0].answer_unmarked
