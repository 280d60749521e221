"""Decoding options and results: small immutable dataclasses, validated once."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from numbers import Real
from types import MappingProxyType
from typing import Any, NamedTuple, TypedDict

import torch

from .errors import EFTRequestError

__all__ = [
    "DEFAULT_CHAT_MAX_TOKENS",
    "DEFAULT_CHAT_TEMPERATURE",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_TEMPERATURE",
    "GREEDY_TEMPERATURE",
    "MAX_ABS_WEIGHT",
    "MAX_TOP_LOGPROBS",
    "OPTION_NAMES",
    "SEED_RANGE",
    "ContinuationScore",
    "GenerationKwargs",
    "GenerationOptions",
    "GenerationResult",
    "RequestStats",
    "ResolvedWeights",
    "StreamChunk",
    "TokenLogprob",
    "Usage",
    "logprobs_option",
    "merge_call_options",
    "merge_call_weights",
    "merge_weights",
    "resolve_weights",
    "sample_seed",
]

DEFAULT_MAX_NEW_TOKENS = 128
"""The decoder's default budget of new tokens per prompt (`EFTDecoder.generate`)."""
DEFAULT_TEMPERATURE = 1.0
"""The decoder's default temperature: the composed distribution as it is."""
DEFAULT_CHAT_TEMPERATURE = 0.7
"""The chat adapters' default temperature (ChatEFT, EFTLLM): a little cooler than the raw
distribution, as chat models usually sample."""
DEFAULT_CHAT_MAX_TOKENS = 256
"""The chat adapters' default budget of new tokens per call (LlamaIndex's num_output too)."""
GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this decode greedily, as vLLM does: dividing log-probs by a smaller
one overflows float32 (1e-300 turns every score into inf or nan)."""
MAX_ABS_WEIGHT = 1e6
"""The largest behavior weight magnitude accepted. A weight times a log-prob delta must stay
finite in float32, where composition runs (1e38 is finite in Python, inf once multiplied);
beyond 1e6 the delta alone decides the token anyway."""
MAX_TOP_LOGPROBS = 20
"""The most alternatives a request may ask log-probs for per token (OpenAI's limit)."""
SEED_RANGE = (-(2**63), 2**64 - 1)
"""Seeds torch's generators accept (a seed of 2**64 is an overflow inside torch)."""


def sample_seed(seed: int | None, index: int) -> int | None:
    """The seed of sample `index` of a request asking for several (`n`) with `seed`, as
    vLLM derives them: `seed + index`, wrapped into `SEED_RANGE`; sample 0 keeps the seed,
    so `n=1` equals a single call. No seed stays none (each sample draws from the shared
    generator)."""
    if seed is None or index == 0:
        return seed
    low, high = SEED_RANGE
    return (seed + index - low) % (high - low + 1) + low


@dataclass(frozen=True)
class GenerationOptions:
    """How to decode. Sampling transforms apply to the EFT-composed distribution."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    """Most tokens to generate per prompt; decoding also stops at the context window."""
    temperature: float = DEFAULT_TEMPERATURE
    """0 decodes greedily (argmax of the composed log-probs); > 0 samples. Values below
    `GREEDY_TEMPERATURE` (1e-5) are taken as 0."""
    top_p: float = 1.0
    """Nucleus sampling over the composed distribution, in (0, 1]; 1 keeps every token."""
    top_k: int = 0
    """Keep only the k most likely composed tokens; 0 keeps all."""
    conservative_top_p: float | None = None
    """EFT paper 4.4: up-scale only tokens in the top-p set of the fine-tuning-scale model."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; matched on text across token boundaries, trimmed."""
    seed: int | None = None
    """Seed of this call's own random generator; same seed, same samples. Any int in
    [-2**63, 2**64 - 1] (`SEED_RANGE`)."""
    speculative_k: int | None = None
    """Draft k tokens per round with the behaviors' fine-tuned models and verify them with
    one forward of the others; the output distribution is exactly EFT's."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely one's (after
    temperature, top-k and top-p, as transformers' MinPLogitsWarper); 0 disables it."""
    repetition_penalty: float = 1.0
    """Scale the composed log-prob of every token already in the prompt or the completion
    by this factor (transformers' RepetitionPenaltyLogitsProcessor on log-probs: > 1
    discourages repeats); 1 disables it. Not with speculative_k."""
    presence_penalty: float = 0.0
    """Subtract this from the score of every token the completion already holds (OpenAI's
    presence penalty, in [-2, 2]). Not with speculative_k."""
    frequency_penalty: float = 0.0
    """Subtract this times its count in the completion from each token's score (OpenAI's
    frequency penalty, in [-2, 2]). Not with speculative_k."""
    logit_bias: Mapping[int, float] | None = None
    """Token id -> bias added to its composed score before sampling (OpenAI's logit_bias,
    each in [-100, 100]; -100 in effect bans a token, 100 forces it)."""
    logprobs: int | None = None
    """Return each generated token's log-prob and those of the `logprobs` most likely
    alternatives (0: the chosen token only; at most `MAX_TOP_LOGPROBS`) in
    `GenerationResult.logprobs` / `StreamChunk.logprobs`; None returns none. They are
    log-probs of the composed EFT distribution at the request's weights (with
    conservative_top_p), before logit_bias, penalties, constraints, temperature, top-k and
    top-p: what vLLM returns by default and `EFTDecoder.next_token_logprobs` gives."""

    @classmethod
    def from_kwargs(cls, **options: Any) -> GenerationOptions:
        """Options from keywords (`stop` may be None); an unknown name is a ValueError naming
        the accepted ones."""
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise EFTRequestError(
                f"unknown generation options {unknown}; accepted: {list(OPTION_NAMES)}",
                param=unknown[0],
            )
        if options.get("stop", ()) is None:
            options["stop"] = ()
        return cls(**options)

    @property
    def uses_history(self) -> bool:
        """Whether sampling reads the tokens so far (the penalties)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def check_vocabulary(self, vocab_size: int) -> None:
        """ValueError if an option names a token outside [0, vocab_size)."""
        bad = [t for t in self.logit_bias or {} if not 0 <= t < vocab_size]
        if bad:
            raise EFTRequestError(
                f"logit_bias names token id {bad[0]}, outside the vocabulary [0, {vocab_size})",
                param="logit_bias",
            )

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise EFTRequestError(
                f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}",
                param="max_new_tokens",
            )
        if self.max_new_tokens < 1:
            raise EFTRequestError(
                f"max_new_tokens must be >= 1, got {self.max_new_tokens}", param="max_new_tokens"
            )
        _check_real("temperature", self.temperature)
        if self.temperature < 0:
            raise EFTRequestError(
                f"temperature must be >= 0 (0 = greedy), got {self.temperature}",
                param="temperature",
            )
        if self.temperature < GREEDY_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)
        _check_real("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise EFTRequestError(
                f"top_p must be in (0, 1] (1 disables it), got {self.top_p}", param="top_p"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise EFTRequestError(
                f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}", param="top_k"
            )
        if self.conservative_top_p is not None:
            _check_real("conservative_top_p", self.conservative_top_p)
            if not 0.0 < self.conservative_top_p <= 1.0:
                raise EFTRequestError(
                    f"conservative_top_p must be in (0, 1] or None, got {self.conservative_top_p}",
                    param="conservative_top_p",
                )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            raise EFTRequestError(
                f"stop must be non-empty strings, got {self.stop!r}", param="stop"
            )
        object.__setattr__(self, "stop", stop)
        self._check_sampling_extras()
        seed_is_int = isinstance(self.seed, int) and not isinstance(self.seed, bool)
        if self.seed is not None and not seed_is_int:
            raise EFTRequestError(f"seed must be an int or None, got {self.seed!r}", param="seed")
        if seed_is_int and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:  # type: ignore[operator]
            raise EFTRequestError(
                f"seed must be in [-2**63, 2**64 - 1], got {self.seed}; reduce it, e.g. "
                "seed % 2**64",
                param="seed",
            )

    def _check_sampling_extras(self) -> None:
        n = self.logprobs
        if n is not None and (
            isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_TOP_LOGPROBS
        ):
            raise EFTRequestError(
                f"logprobs must be None or an int in [0, {MAX_TOP_LOGPROBS}] (the alternatives "
                f"returned per token; 0: the chosen token only), got {n!r}",
                param="logprobs",
            )
        k = self.speculative_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise EFTRequestError(
                f"speculative_k must be an int >= 1 or None, got {k!r}", param="speculative_k"
            )
        _check_real("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise EFTRequestError(
                f"min_p must be in [0, 1] (0 disables it), got {self.min_p}", param="min_p"
            )
        _check_real("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise EFTRequestError(
                f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}",
                param="repetition_penalty",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_real(name, value)
            if not -2.0 <= value <= 2.0:
                raise EFTRequestError(
                    f"{name} must be in [-2, 2] (0 disables it), got {value}", param=name
                )
        if self.uses_history and k is not None:
            raise EFTRequestError(
                "repetition, presence and frequency penalties read every token so far, which "
                "speculative drafts change within a round; leave speculative_k=None with them",
                param="speculative_k",
            )
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise EFTRequestError(
                    f"logit_bias must be a dict of token id -> bias, got {self.logit_bias!r}",
                    param="logit_bias",
                )
            bias = {}
            for token, value in self.logit_bias.items():
                if isinstance(token, bool) or not isinstance(token, int):
                    raise EFTRequestError(
                        f"logit_bias keys must be int token ids, got {token!r}", param="logit_bias"
                    )
                _check_real(f"logit_bias[{token}]", value)
                if not -100.0 <= value <= 100.0:
                    raise EFTRequestError(
                        f"logit_bias[{token}] must be in [-100, 100], got {value}",
                        param="logit_bias",
                    )
                bias[token] = float(value)
            object.__setattr__(self, "logit_bias", MappingProxyType(bias) if bias else None)


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(GenerationOptions))
"""Every option `GenerationOptions` takes (the keywords of generate/stream and the
adapters' per-call options)."""


class GenerationKwargs(TypedDict, total=False):
    """`GenerationOptions` as keyword arguments (`EFTDecoder.generate(**options)`)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    conservative_top_p: float | None
    stop: str | Sequence[str] | None
    seed: int | None
    speculative_k: int | None
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    logit_bias: Mapping[int, float] | None
    logprobs: int | None


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise EFTRequestError(
            f"{name} must be a finite number, got {value!r}", param=name.split("[")[0]
        )


@dataclass(frozen=True)
class Usage:
    """Token counts of one generation, as chat APIs report them."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    """Prompt tokens that every model read from the prefix cache instead of computing them
    (OpenAI's `prompt_tokens_details.cached_tokens`)."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class RequestStats:
    """How one request went through the engine (seconds, measured on the engine's clock)."""

    queue_time: float
    """From submission to admission into the running batch."""
    time_to_first_token: float | None
    """From submission to the first generated token (None if none was generated)."""
    tokens_per_second: float
    """Completion tokens per second of decoding (from admission to the end)."""
    total_time: float = 0.0
    """From submission to the last token."""
    speculative_rounds: int | None = None
    """Draft-and-verify rounds, for speculative requests (None otherwise)."""
    drafted_tokens: int | None = None
    """Tokens the drafting models proposed (speculative requests)."""
    accepted_tokens: int | None = None
    """Drafted tokens the verification accepted (speculative requests)."""

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted over drafted tokens (None when nothing was drafted)."""
        if not self.drafted_tokens:
            return None
        return (self.accepted_tokens or 0) / self.drafted_tokens

    def as_dict(self) -> dict[str, float | int | None]:
        """Every figure, `acceptance_rate` included, as a plain dict (response metadata)."""
        return {**asdict(self), "acceptance_rate": self.acceptance_rate}


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-prob under the composed EFT distribution, and its alternatives'."""

    token_id: int
    logprob: float
    top_logprobs: dict[int, float] = field(default_factory=dict)
    """The most likely tokens at this position (token id -> log-prob), most likely first."""


@dataclass(frozen=True)
class ContinuationScore:
    """How likely a given continuation is under the composed EFT distribution
    (`EFTDecoder.score`): one entry per continuation token."""

    token_ids: list[int]
    logprobs: list[float]
    """log p_eft(token | prompt, the continuation before it), per token."""
    is_greedy: list[bool]
    """Whether each token is the composed distribution's most likely one there."""
    top_logprobs: list[dict[int, float]] | None = None
    """With `top_logprobs=k`: the k most likely tokens at each position (id -> log-prob)."""

    @property
    def total(self) -> float:
        """The continuation's log-likelihood: the sum of its tokens' log-probs."""
        return float(sum(self.logprobs))

    @property
    def greedy(self) -> bool:
        """Whether greedy decoding would produce exactly this continuation."""
        return all(self.is_greedy)


@dataclass(frozen=True)
class GenerationResult:
    """The completion of one prompt."""

    text: str
    """Decoded completion, without special tokens, trimmed at the first stop string."""
    token_ids: list[int]
    """Every token generated for this prompt (the completion only, end token included)."""
    finish_reason: str
    """"stop" (end-of-turn token, stop string, or finished constraint) or "length"."""
    usage: Usage
    weights: dict[str, float] = field(default_factory=dict)
    """The behavior weights this completion was decoded with."""
    stats: RequestStats | None = None
    """Queue time, time to first token, speed (and speculative drafting figures)."""
    logprobs: list[TokenLogprob] | None = None
    """With the `logprobs` option: one entry per token of `token_ids`."""


@dataclass(frozen=True)
class StreamChunk:
    """An increment of a streamed completion. The last chunk carries finish_reason and usage."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    stats: RequestStats | None = None
    """On the last chunk: how the request went (see `GenerationResult.stats`)."""
    logprobs: list[TokenLogprob] | None = None
    """With the `logprobs` option: one entry per token of `token_ids`."""


WeightsArg = Mapping[str, float] | Sequence[Mapping[str, float]] | None


def merge_weights(
    weights: Mapping[str, float] | None,
    defaults: Mapping[str, float],
) -> dict[str, float]:
    """`weights` over `defaults` (names left out take the default), validated: an unknown
    name, a non-number or a non-finite value is a ValueError naming the known behaviors."""
    known = list(defaults)
    if weights is None:
        return dict(defaults)
    if not isinstance(weights, Mapping):
        raise EFTRequestError(
            f"weights must be a dict of behavior name -> float, got {type(weights).__name__}; "
            f"known behaviors: {known}",
            param="weights",
        )
    resolved = dict(defaults)
    for name, value in weights.items():
        if name not in defaults:
            raise EFTRequestError(
                f"unknown behavior {name!r} in weights; known behaviors: {known}", param="weights"
            )
        if isinstance(value, bool) or not isinstance(value, Real):
            raise EFTRequestError(
                f"weight of {name!r} must be a float, got {type(value).__name__}; "
                f"known behaviors: {known}",
                param="weights",
            )
        if not math.isfinite(value) or abs(value) > MAX_ABS_WEIGHT:
            raise EFTRequestError(
                f"weight of {name!r} must be a finite number in [-1e6, 1e6], got {value}; "
                f"known behaviors: {known}",
                param="weights",
            )
        resolved[name] = float(value)
    return resolved


class ResolvedWeights(NamedTuple):
    """The weights of every row of a call."""

    rows: list[dict[str, float]]
    """One dict per row, every behavior named."""
    tensor: torch.Tensor
    """[B, n_behaviors] float32, behaviors in the decoder's order."""


def resolve_weights(
    weights: WeightsArg,
    defaults: Mapping[str, float],
    batch_size: int,
) -> ResolvedWeights:
    """Per-row weight dicts and their [B, n_behaviors] float32 tensor.

    `weights` is one dict for every row, a list of dicts (one per row), or None (defaults).
    Names left out take the default; unknown names and non-finite values are ValueErrors.
    """
    if isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        if len(weights) != batch_size:
            raise EFTRequestError(
                f"got {len(weights)} weight dicts for {batch_size} prompts; give one dict per "
                "prompt, or a single dict for all",
                param="weights",
            )
        rows = [merge_weights(w, defaults) for w in weights]
    else:
        rows = [merge_weights(weights, defaults)] * batch_size
    names = list(defaults)
    tensor = torch.tensor([[row[n] for n in names] for row in rows], dtype=torch.float32)
    return ResolvedWeights([dict(r) for r in rows], tensor.reshape(batch_size, len(names)))


# ------------------------------------------------------------------------- per-call options


def merge_call_weights(
    weights: Mapping[str, float] | None,
    call_weights: Mapping[str, float] | None,
    behaviors: Sequence[str],
) -> dict[str, float] | None:
    """A call's weights over an adapter's own `weights`: names the call leaves out keep the
    adapter's weight, then the decoder's default (None: every weight is the default).
    Validated now against the decoder's `behaviors` (`merge_weights`), so a bad name or value
    fails at the call, naming the known behaviors."""
    if isinstance(call_weights, Sequence) and not isinstance(call_weights, str):
        raise EFTRequestError(
            f"weights is one dict per call, got a {type(call_weights).__name__}; for different "
            "weights per input of a batch, give each input its own call or config (in "
            "LangChain: configurable_fields(weights=...) and one config per input)",
            param="weights",
        )
    known = dict.fromkeys(behaviors, 1.0)
    for checked in (weights, call_weights):
        merge_weights(checked, known)  # raises on a bad name or value
    return {**(weights or {}), **(call_weights or {})} or None


def merge_call_options(
    fields: Mapping[str, Any],
    call: Mapping[str, Any],
    *,
    owner: str,
    aliases: Mapping[str, str] = MappingProxyType({"max_tokens": "max_new_tokens"}),
    passthrough: Sequence[str] = (),
    behaviors: Sequence[str],
) -> dict[str, Any]:
    """The options of one adapter call, named as the core takes them.

    `fields` are the adapter's own defaults under the core's names (`weights`,
    `max_new_tokens`, `temperature`, ...); `call` holds the call's overrides, where `aliases`
    maps other accepted names to the core's (`max_tokens` -> `max_new_tokens`) and
    `passthrough` names options that have no field but go to the core as given (`tools`,
    `tool_choice`, ...); every `GenerationOptions` name is accepted too, so a new sampling
    option reaches the core through both adapters without touching them. Call weights
    merge over the field's, validated against the decoder's `behaviors`
    (`merge_call_weights`); a None `max_new_tokens` is the decoder's default. Any other
    name is a ValueError naming it and the accepted ones (`owner` says whose call it was)."""
    accepted = list(dict.fromkeys([*fields, *aliases, *passthrough, *OPTION_NAMES]))
    unknown = [name for name in call if name not in accepted]
    if unknown:
        raise ValueError(f"unknown {owner} call options {unknown}; accepted: {accepted}")
    overrides = {aliases.get(name, name): value for name, value in call.items()}
    options = {**fields, **overrides}
    options["weights"] = merge_call_weights(
        fields.get("weights"), overrides.get("weights"), behaviors
    )
    if "max_new_tokens" in options and options["max_new_tokens"] is None:
        del options["max_new_tokens"]  # the decoder's default
    return options


def logprobs_option(logprobs: bool | None, top_logprobs: int | None) -> int | None:
    """OpenAI's `logprobs` (a bool) and `top_logprobs` (alternatives per token) as the core's
    one `logprobs` option (None: none returned)."""
    if not logprobs:
        if top_logprobs:
            raise EFTRequestError(
                f"top_logprobs={top_logprobs} needs logprobs=True (as in OpenAI's API); set both",
                param="top_logprobs",
            )
        return None
    return top_logprobs or 0
