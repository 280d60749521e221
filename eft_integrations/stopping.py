"""Per-row decoding state: tokens, incremental text, stop strings, budget and finish reason."""

from __future__ import annotations

from collections.abc import Set

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .constraints import TokenConstraint
from .options import TokenLogprob
from .text import CompletionText

__all__ = ["RowText"]


class RowText:
    """What one request has generated, and whether it is done.

    `record(token)` adds a sampled token and decides the finish reason: "stop" for an
    end-of-turn token, a completed stop string or a finished constraint; "length" when the
    budget (max_new_tokens cut to the context window) is used up.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop: tuple[str, ...],
        eos_token_ids: Set[int],
        prompt_tokens: int,
        token_budget: int,
        constraint: TokenConstraint | None = None,
        logprobs: bool = False,
    ) -> None:
        self.text = CompletionText(tokenizer, stop)
        self.eos_token_ids = eos_token_ids
        self.prompt_tokens = prompt_tokens
        self.token_budget = token_budget
        self.constraint = constraint
        self.finish_reason: str | None = None
        self.unsent_token_ids: list[int] = []  # recorded since the last stream chunk
        self.logprobs: list[TokenLogprob] | None = [] if logprobs else None
        """One entry per token of `token_ids`, where the request asked for log-probs."""
        self.unsent_logprobs: list[TokenLogprob] = []

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def token_ids(self) -> list[int]:
        return self.text.token_ids

    @property
    def tokens_left(self) -> int:
        return self.token_budget - len(self.text.token_ids)

    def record(self, token: int, logprob: TokenLogprob | None = None) -> None:
        """Add one sampled token (with its log-probs, where the request asked for them); may
        finish the row. Raises what the constraint raises."""
        self.unsent_token_ids.append(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
            self.unsent_logprobs.append(logprob)
        if token in self.eos_token_ids:
            self.text.append_end_token(token)
            self.finish_reason = "stop"
            return
        self.text.append(token)
        if self.constraint is not None:
            self.constraint.advance(token)
            if self.constraint.is_finished():
                self.finish_reason = "stop"
        if self.text.stopped:
            self.finish_reason = "stop"
        elif self.finish_reason is None and self.tokens_left <= 0:
            self.finish_reason = "length"

    def take_unsent(self) -> list[int]:
        ids, self.unsent_token_ids = self.unsent_token_ids, []
        return ids

    def take_unsent_logprobs(self) -> list[TokenLogprob] | None:
        """The log-probs of the tokens `take_unsent` hands out (None without the option)."""
        if self.logprobs is None:
            return None
        entries, self.unsent_logprobs = self.unsent_logprobs, []
        return entries
