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
# # 5. Speculative decoding: acceptance rate and speed against k
#
# Up-scaling runs the large base at every token. Speculative EFT (paper section 4.3) lets the
# small fine-tuned model draft `k` tokens one at a time; the base and the references then score
# all k drafts in **one** forward, and standard rejection sampling keeps the output
# distribution exactly EFT's (greedy: exactly the same tokens). The paper reports about 2.5x
# for a 70B base with a 7B chat model.
#
# Here, on the toy world (a 3.7M-parameter base, 0.23M-parameter small models): how many
# drafts are accepted, how many base forwards each token costs, and what that buys in wall
# time on this CPU. `speculative_k=k` per call; `adaptive_speculation=False` keeps k fixed
# (the default adapts it per row: +2 after a fully accepted round, -1 after a rejection).
# Timings depend on the machine and are printed, not checked.

# %%
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
from eft_integrations.toyworld.paths import load_decoder
from eft_integrations.toyworld.world import World

FIGURES = Path("figures")
FIGURES.mkdir(exist_ok=True)

# up-scaling with the helpful delta: large base + (small helpful - small base)
decoder = load_decoder(behaviors=("helpful",), adaptive_speculation=False)
print(decoder.model_name)
questions = World.generate(seed=0).eval_questions(limit_entities=4)  # 16 held-out questions
prompts = evaluate.chat_prompts(questions)
GREEDY = {"temperature": 0.0, "max_new_tokens": 32}
_ = decoder.generate(prompts[0], **GREEDY)  # warm-up


def one_at_a_time(k=None, repeats=3):
    """Decode every prompt alone; the results and the best wall time of `repeats` runs
    (the best of a few is the least disturbed by whatever else the machine runs)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        outs = [decoder.generate(p, speculative_k=k, **GREEDY) for p in prompts]
        best = min(best, time.perf_counter() - start)
    return outs, best


# %% [markdown]
# ## Plain decoding, one request at a time
#
# Latency is what speculative decoding improves, so each prompt is decoded alone; times are
# the best of three runs.

# %%
plain, plain_s = one_at_a_time()
tokens = sum(len(o.token_ids) for o in plain)
print(
    f"{len(prompts)} prompts, {tokens} tokens in {plain_s:.2f} s: {tokens / plain_s:.0f} tokens/s"
)
print("e.g.", repr(plain[0].text))

# %% [markdown]
# ## Speculative decoding for k = 1 ... 8
#
# For each k: the same prompts, one at a time. Each result carries `stats` with the drafted
# and accepted tokens and the number of draft-and-verify rounds (one base forward each).

# %%
ks = [1, 2, 3, 4, 6, 8]
runs = {}
for k in ks:
    outs, seconds = one_at_a_time(k)
    # greedy speculative decoding writes exactly the tokens plain decoding writes
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain], k
    drafted = sum(o.stats.drafted_tokens for o in outs)
    accepted = sum(o.stats.accepted_tokens for o in outs)
    rounds = sum(o.stats.speculative_rounds for o in outs)
    runs[k] = {
        "acceptance": accepted / drafted,
        "tokens_per_round": tokens / rounds,
        "tokens_per_s": tokens / seconds,
    }
print("  k | same tokens | acceptance | tokens per base forward | tokens/s | vs plain")
for k, r in runs.items():
    print(
        f"{k:3d} | {'yes':>11s} | {r['acceptance']:10.3f} | {r['tokens_per_round']:23.2f} | "
        f"{r['tokens_per_s']:8.0f} | {r['tokens_per_s'] * plain_s / tokens:7.2f}x"
    )

# %% [markdown]
# Every k gives exactly the plain tokens. The acceptance rate falls as k grows (a long draft is
# more likely to stray), while the tokens won per base forward keep rising, with diminishing
# returns. When the base's forward dominates the cost, as with a 70B base and a 7B chat model,
# "tokens per base forward" is roughly the speed-up. The toy base is only 16 times the size of
# the small models and every forward has a fixed overhead on a CPU, so the wall-clock gain
# here is much smaller than that.

# %%
acceptance = [runs[k]["acceptance"] for k in ks]
per_round = [runs[k]["tokens_per_round"] for k in ks]
assert all(0.0 < a <= 1.0 for a in acceptance)
assert acceptance[0] > acceptance[-1]  # longer drafts are accepted less often
assert per_round[-1] > per_round[0] > 1.0  # but each base forward yields more tokens

# %% [markdown]
# ## Adaptive k, sampling, and batches
#
# - With the default `adaptive_speculation=True`, `speculative_k` is where each row starts.
# - Sampling stays exact: drafts are accepted with probability min(1, p_eft / q) and rejected
#   ones resampled from the residual, so samples follow EFT's distribution. A seed reproduces
#   a speculative sample, but it may differ from the plain sample of the same seed, which
#   spends its random numbers differently.
# - In a batch, rows accept different numbers of drafts and roll back separately.

# %%
adaptive = load_decoder(behaviors=("helpful",))  # adaptive_speculation=True by default
outs = [adaptive.generate(p, speculative_k=4, **GREEDY) for p in prompts]
assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
drafted = sum(o.stats.drafted_tokens for o in outs)
accepted = sum(o.stats.accepted_tokens for o in outs)
rounds = sum(o.stats.speculative_rounds for o in outs)
print(
    f"adaptive from k=4: acceptance {accepted / drafted:.3f}, {tokens / rounds:.2f} tokens/forward"
)

sample = decoder.generate(prompts[0], temperature=1.0, seed=0, speculative_k=4, max_new_tokens=32)
print(f"sampled (T=1, seed 0): {sample.text!r}, acceptance {sample.stats.acceptance_rate:.2f}")
again = decoder.generate(prompts[0], temperature=1.0, seed=0, speculative_k=4, max_new_tokens=32)
assert again.token_ids == sample.token_ids  # seeded: reproducible

batch = decoder.generate(prompts, speculative_k=4, **GREEDY)
assert [o.token_ids for o in batch] == [o.token_ids for o in plain]
print(f"batch of {len(prompts)} with k=4: the same tokens as plain decoding, row by row")

# %% [markdown]
# ## The figure

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
left.plot(ks, acceptance, "o-", label="acceptance rate (accepted / drafted)")
left.set_xlabel("k (drafted tokens per round)")
left.set_ylabel("acceptance rate")
left.set_ylim(0, 1.05)
twin = left.twinx()
twin.plot(ks, per_round, "s--", color="#ff7f0e", label="tokens per base forward")
twin.set_ylabel("tokens per base forward")
twin.set_ylim(0, max(per_round) * 1.15)
left.legend(handles=left.get_lines() + twin.get_lines(), loc="lower center", fontsize=8)
left.set_title("drafts accepted (greedy, toy world)")
right.bar([str(k) for k in ks], [runs[k]["tokens_per_s"] for k in ks], color="#2ca02c")
right.axhline(tokens / plain_s, color="0.3", linestyle=":", label="plain decoding")
right.set_xlabel("k")
right.set_ylabel("tokens / s (one request at a time)")
right.set_title("speed on this CPU (3.7M base, 0.23M drafter)")
right.legend(loc="lower right", fontsize=8)
fig.tight_layout()
fig.savefig(FIGURES / "speculative.png", dpi=110)
plt.close(fig)
display(Image(filename=str(FIGURES / "speculative.png")))
