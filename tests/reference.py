"""A brute-force EFT reference: every step recomputes every full sequence, no cache, no padding.

Models are loaded here independently of the decoder, so a loading or caching bug in the
decoder cannot hide in the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import AutoModelForCausalLM


class BruteForceEFT:
    def __init__(self, base: str, behaviors: Mapping[str, tuple[str, str]], vocab_size: int):
        load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
        self.base = load(base)
        self.behaviors = {n: (load(ft), load(ref)) for n, (ft, ref) in behaviors.items()}
        self.vocab_size = vocab_size

    @torch.no_grad()
    def _logprobs(self, model, ids: Sequence[int]) -> torch.Tensor:
        logits = model(input_ids=torch.tensor([list(ids)])).logits[0, -1, : self.vocab_size]
        return torch.log_softmax(logits.double(), dim=-1)

    def next_logprobs(self, chat_ids: Sequence[int], weights: Mapping[str, float],
                      base_ids: Sequence[int] | None = None) -> torch.Tensor:
        base_ids = chat_ids if base_ids is None else base_ids
        score = self._logprobs(self.base, base_ids)
        for name, (ft, ref) in self.behaviors.items():
            w = weights.get(name, 1.0)
            score = score + w * (self._logprobs(ft, chat_ids) - self._logprobs(ref, base_ids))
        return torch.log_softmax(score, dim=-1)

    def greedy(self, chat_ids: Sequence[int], weights: Mapping[str, float], steps: int,
               base_ids: Sequence[int] | None = None, eos: frozenset[int] = frozenset()):
        chat, base = list(chat_ids), list(base_ids if base_ids is not None else chat_ids)
        out = []
        for _ in range(steps):
            token = int(self.next_logprobs(chat, weights, base).argmax())
            out.append(token)
            if token in eos:
                break
            chat.append(token)
            base.append(token)
        return out
