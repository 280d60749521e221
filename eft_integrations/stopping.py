"""Per-row decoding state: tokens, incremental text, stop strings, budget and finish reason."""

from __future__ import annotations

from collections.abc import Set

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .constraints import TokenConstraint
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
    ) -> None:
        self.text = CompletionText(tokenizer, stop)
        self.eos_token_ids = eos_token_ids
        self.prompt_tokens = prompt_tokens
        self.token_budget = token_budget
        self.constraint = constraint
        self.finish_reason: str | None = None
        self.unsent_token_ids: list[int] = []  # recorded since the last stream chunk

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def token_ids(self) -> list[int]:
        return self.text.token_ids

    @property
    def tokens_left(self) -> int:
        return self.token_budget - len(self.text.token_ids)

    def record(self, token: int) -> None:
        """Add one sampled token; may finish the row. Raises what the constraint raises."""
        self.unsent_token_ids.append(token)
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
