"""Cookbook 1: up-scaling with the core decoder, on the embedded toy-world family.

The toy world's large base knows the facts of every kingdom (pre-training) but does not answer
in the chat format; the small chat model answers in the format but does not know held-out
kingdoms. EFT decodes from  large base + (small chat - small base)  and gets both, without
training anything. Then: behaviour weights per call, conservative decoding, the composed
distribution itself, and exact speculative decoding.

Run: python cookbooks/01_upscaling_toyworld.py   (offline, about a minute on a laptop CPU)
"""

from __future__ import annotations

import time

from eft_integrations.toyworld.paths import load_decoder
from eft_integrations.toyworld.world import World

GREEDY = {"temperature": 0.0, "max_new_tokens": 32}

# 1. Three decoders over the same shipped weights: each model is loaded from disk once per
#    decoder, and a reference shared by two behaviours is loaded and run once.
eft = load_decoder()  # large base + helpful and harmless deltas (both over the small base)
small_chat = load_decoder(base="small-helpful", behaviors=())  # the small chat model alone
large_base = load_decoder(behaviors=())  # the large base alone
print("EFT decoder:", eft.model_name)
# calls that name no weights: the best-behaved setting measured (weights/README.md)
print("default weights:", eft.default_weights)

# 2. Held-out kingdoms: in pre-training, never in chat fine-tuning.
world = World.generate(seed=0)
questions = [q for q in world.eval_questions(limit_entities=4) if not q.marked][:4]
for q in questions:
    prompt = eft.format_chat([{"role": "user", "content": q.text}])
    print(f"\nQ: {q.text}   (gold: {q.answer})")
    print("  small chat    :", small_chat.generate(prompt, **GREEDY).text)
    print("  large base    :", large_base.generate(prompt, **GREEDY).text)
    print(
        "  EFT up-scaled :",
        eft.generate(prompt, weights={"helpful": 1.0, "harmless": 0.0}, **GREEDY).text,
    )

# 3. Behaviour weights per call: the harmless delta refuses questions about weapons.
#    One batched call, one weights dict per row.
marked = next(q for q in world.eval_questions(limit_entities=4) if q.marked)
prompt = eft.format_chat([{"role": "user", "content": marked.text}])
lams = [0.0, 0.5, 1.0]
outs = eft.generate(
    [prompt] * len(lams), weights=[{"helpful": lam, "harmless": 1 - lam} for lam in lams], **GREEDY
)
print(f"\nQ: {marked.text}   (gold: {marked.answer})")
for lam, out in zip(lams, outs, strict=True):
    print(f"  helpful={lam:.1f} harmless={1 - lam:.1f}: {out.text}")

# 4. The composed next-token distribution, and how a weight moves it.
q = questions[0]
prompt = eft.format_chat([{"role": "user", "content": q.text}])
for w in (0.0, 1.0, 2.0):
    logprobs = eft.next_token_logprobs(prompt, weights={"helpful": w, "harmless": 0.0})
    top = logprobs.topk(3)
    shown = ", ".join(
        f"{eft.tokenizer.decode([int(i)])!r}: {p.exp():.2f}"
        for p, i in zip(top.values, top.indices, strict=True)
    )
    print(f"\nnext token with helpful={w}: {shown}")

# 5. Conservative decoding (EFT paper 4.4): only tokens in the small chat model's top-p set
#    are up-scaled; the rest keep the small model's probability.
print(
    "\nconservative top-p 0.9:",
    eft.generate(
        prompt, weights={"helpful": 1.0, "harmless": 0.0}, conservative_top_p=0.9, **GREEDY
    ).text,
)

# 6. Speculative decoding: the small models draft 4 tokens, the large base verifies them in
#    one forward. Greedy output is identical; sampling keeps EFT's distribution exactly.
weights = {"helpful": 1.0, "harmless": 0.0}
start = time.perf_counter()
plain = eft.generate(prompt, weights=weights, **GREEDY)
plain_s = time.perf_counter() - start
start = time.perf_counter()
fast = eft.generate(prompt, weights=weights, speculative_k=4, **GREEDY)
fast_s = time.perf_counter() - start
assert fast.token_ids == plain.token_ids
print(
    f"\nspeculative k=4: same {len(fast.token_ids)} tokens, {plain_s * 1e3:.0f} ms -> "
    f"{fast_s * 1e3:.0f} ms"
)
