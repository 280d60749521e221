"""Structured output plans a way to finish for every satisfiable schema, and refuses the rest.

`GrammarConstraint.minimum_budget()` is the shortest answer closing mode knows how to write;
closing mode then steers a row to finish within its budget. Both used to follow a fixed
preference of tokens (closing quotes, brackets, separators, digits, else the longest), which
never finishes where the way out is a particular character: inside `"pattern": "a*b"` it wrote
`a`s forever and asked for more than 4,096 tokens. Unsatisfiable schemas are a ValueError that
names the schema (or the tool) before anything is decoded.

The planner is driven two ways: directly, by a sampler that picks uniformly among the tokens the
constraint allows (no model: it tries whatever is allowed, the worst case for the planner), and
through `chat` on the tiny random chat family.
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from eft_integrations import chat as core
from eft_integrations.chat import prepare_chat
from eft_integrations.tool_calls import bounded_schema

from .chat_family import chat_decoder

USER = [{"role": "user", "content": "Answer in JSON."}]

TREE = {
    "$ref": "#/$defs/node",
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "value": {"type": "integer"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
            },
            "required": ["value"],
        }
    },
}

SATISFIABLE = {
    # JSON Schema patterns search (they are not anchored): any string containing a `b`
    "pattern": {"type": "string", "pattern": "a*b"},
    "anchored pattern": {"type": "string", "pattern": "^[0-9]+x$"},
    # satisfiable too (e.g. "aaaaa"): the pattern only asks for an `a` somewhere
    "pattern and minLength": {"type": "string", "pattern": "a", "minLength": 5},
    "pattern in an object": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "name": {"type": "string"},
        },
        "required": ["code", "name"],
    },
    "anyOf": {
        "anyOf": [
            {"type": "string", "pattern": "^z+y$"},
            {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]},
        ]
    },
    "optional recursion": TREE,
    "enum": {"enum": ["red", "green", "blue"]},
    "nested with minItems": {
        "type": "object",
        "properties": {
            "r": {
                "type": "array",
                "minItems": 2,
                "items": {
                    "type": "object",
                    "properties": {
                        "n": {"type": "integer"},
                        "t": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1},
                    },
                    "required": ["n", "t"],
                },
            }
        },
        "required": ["r"],
    },
}

SHORT_INSTANCES = {
    "pattern": '"b"',
    "anchored pattern": '"0x"',
    "pattern and minLength": '"aaaaa"',
    "pattern in an object": '{"code": "AA-000", "name": "a"}',
    "anyOf": '"zy"',
    "optional recursion": '{"value": 0}',
    "enum": '"red"',
    "nested with minItems": '{"r": [{"n": 0, "t": ["a"]}, {"n": 0, "t": ["a"]}]}',
}
"""A short instance of each satisfiable schema, in the grammar's compact layout: the minimum
budget is at most its tokens and end-of-sequence."""

UNSATISFIABLE = {
    "anchored pattern shorter than minLength": {"type": "string", "pattern": "^a$", "minLength": 5},
    "minimum above maximum": {"type": "integer", "minimum": 5, "maximum": 1},
    "allOf of two types": {"allOf": [{"type": "string"}, {"type": "integer"}]},
    "a required property that cannot hold": {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}},
        "required": ["n"],
    },
}


def _format(schema: dict) -> dict:
    return {"type": "json_schema", "schema": schema}


def _constraint(schema: dict, budget: int):
    """A fresh constraint for `schema` planned against `budget` new tokens."""
    decoder = chat_decoder()
    request = prepare_chat(decoder, USER, response_format=_format(schema))
    return decoder, request.constraint(decoder, budget=budget)


def _sample_uniformly(schema: dict, budget: int, seed: int) -> tuple[str, bool]:
    """Decode with a sampler that picks uniformly among the allowed tokens (no model): the
    text and whether it finished (end-of-sequence, or nothing more may follow) in `budget`."""
    decoder, constraint = _constraint(schema, budget)
    rng = random.Random(seed)
    eos, tokens = set(decoder.eos_token_ids), []
    for _ in range(budget):
        if constraint.is_finished():
            break
        allowed = constraint.allowed_mask(decoder.vocab_size).nonzero().flatten().tolist()
        token = rng.choice(allowed)
        if token in eos:
            return decoder.tokenizer.decode(tokens), True
        constraint.advance(token)
        tokens.append(token)
    return decoder.tokenizer.decode(tokens), constraint.is_finished()


def _assert_valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


# ------------------------------------------------------------------------------ satisfiable


@pytest.mark.parametrize("name", list(SATISFIABLE))
def test_minimum_budget_is_small_and_enough(name):
    schema = SATISFIABLE[name]
    decoder, constraint = _constraint(schema, budget=400)
    minimum = constraint.minimum_budget()
    _assert_valid(SHORT_INSTANCES[name], schema)
    short = decoder.tokenizer(SHORT_INSTANCES[name], add_special_tokens=False)["input_ids"]
    assert 1 <= minimum <= len(short) + 1, (name, minimum, len(short))
    # at that budget closing mode is on from the first token: whatever is picked among the
    # tokens it allows, the answer is complete and valid
    for seed in range(4):
        text, finished = _sample_uniformly(schema, minimum, seed)
        assert finished, (name, seed, text)
        _assert_valid(text, schema)


@pytest.mark.parametrize("name", list(SATISFIABLE))
def test_a_budget_of_60_always_finishes_under_uniform_sampling(name):
    # the tree used to overrun with seeds 6-8: `,` in a children array, picked freely with a
    # few spare tokens left, commits to a whole node (` {"value": 0}`), more than the margin
    schema = SATISFIABLE[name]
    for seed in range(12):
        text, finished = _sample_uniformly(schema, 60, seed)
        assert finished, (name, seed, text)
        _assert_valid(text, schema)


@pytest.mark.parametrize("name", list(SATISFIABLE))
def test_chat_at_the_minimum_budget_and_at_60_answers_valid_json(name):
    decoder = chat_decoder()
    schema = SATISFIABLE[name]
    minimum = _constraint(schema, budget=400)[1].minimum_budget()
    for budget, seed in ((minimum, 0), (60, 1), (60, 2)):
        result = core.chat(
            decoder,
            USER,
            response_format=_format(schema),
            max_new_tokens=budget,
            temperature=1.0,
            seed=seed,
        )
        assert result.finish_reason == "stop", (name, budget, result)
        assert result.usage.completion_tokens <= budget
        _assert_valid(result.content, schema)


def test_closing_mode_leaves_a_pattern_string_by_the_character_that_ends_it():
    # inside `"aaa` of `pattern: a*b`, with 6 tokens left, only a `b`-token (then `"`) is a way
    # out: tokens that keep the string open (more `a`s) are not offered, and the answer ends
    decoder = chat_decoder()
    schema = SATISFIABLE["pattern"]
    written = decoder.tokenizer('"aaa', add_special_tokens=False)["input_ids"]
    decoder, constraint = _constraint(schema, budget=len(written) + 6)
    for token in written:
        constraint.advance(token)
    allowed = constraint.allowed_mask(decoder.vocab_size).nonzero().flatten().tolist()
    texts = [decoder.tokenizer.decode([t]) for t in allowed]
    assert texts and all("b" in t or '"' in t for t in texts), texts


def test_a_string_whose_minLength_exceeds_the_cap_stays_satisfiable():
    # unbounded strings are capped (DEFAULT_MAX_STRING_LENGTH = 256); a minLength above the cap
    # used to make the capped schema unsatisfiable
    schema = {"type": "string", "minLength": 300}
    bounded = bounded_schema(schema)
    assert bounded["maxLength"] >= 300
    request = prepare_chat(chat_decoder(), USER, response_format=_format(schema))
    assert request.grammar is not None


# ------------------------------------------------------------------------------ unsatisfiable


@pytest.mark.parametrize("name", list(UNSATISFIABLE))
def test_an_unsatisfiable_response_format_is_refused_before_decoding(name, monkeypatch):
    decoder = chat_decoder()
    schema = UNSATISFIABLE[name]

    def never(*args, **kwargs):
        raise AssertionError("decoding started")

    monkeypatch.setattr(decoder, "generate", never)
    with pytest.raises(ValueError, match="response_format") as error:
        prepare_chat(decoder, USER, response_format=_format(schema))
    message = str(error.value)
    assert json.dumps(schema)[:40] in message and "fix" in message.lower(), message
    assert error.value.param == "response_format"  # a typed request error (the server: 400)
    with pytest.raises(ValueError, match="response_format"):
        core.chat(decoder, USER, response_format=_format(schema), max_new_tokens=60)


@pytest.mark.parametrize("tool_choice", ["broken", "required", "auto"])
def test_a_tool_whose_parameters_are_unsatisfiable_is_refused_naming_it(tool_choice):
    decoder = chat_decoder()
    fine = {"name": "ping", "parameters": {"type": "object", "properties": {}}}
    broken = {"name": "broken", "parameters": UNSATISFIABLE["a required property that cannot hold"]}
    with pytest.raises(ValueError, match="tool 'broken'") as error:
        prepare_chat(decoder, USER, tools=[fine, broken], tool_choice=tool_choice)
    assert "parameters" in str(error.value) and "fix" in str(error.value).lower()
    assert error.value.param == "tools"
    with pytest.raises(ValueError, match="tool 'broken'"):
        core.chat(decoder, USER, tools=[broken], tool_choice=tool_choice, max_new_tokens=60)
    # with tool_choice "none" the tools are only shown, never called: nothing to refuse
    prepare_chat(decoder, USER, tools=[fine, broken], tool_choice="none")


# ------------------------------------------------------------------------------ look ahead


def test_the_look_ahead_leaves_the_parser_where_it_was():
    # closing mode tries tokens on the row's own parser (consume, then roll back) instead of
    # copying it: the parser must come back exactly, after a refused token too (no error
    # state) and when the block raises
    import llguidance

    from eft_integrations.grammar_masks import stepped
    from eft_integrations.token_tables import ll_tokenizer
    from eft_integrations.tool_calls import json_grammar

    decoder = chat_decoder()
    tokenizer, eos = decoder.tokenizer, tuple(sorted(decoder.eos_token_ids))
    grammar = json_grammar(SATISFIABLE["pattern in an object"])
    matcher = llguidance.LLMatcher(
        ll_tokenizer(tokenizer, decoder.vocab_size, eos),
        llguidance.LLMatcher.grammar_from_lark(grammar),
        log_level=0,
    )
    matcher.consume_tokens(tokenizer('{"code": "A', add_special_tokens=False)["input_ids"])

    def state():
        return matcher.compute_bitmask(), matcher.is_accepting(), matcher.is_stopped()

    before = state()
    letter, refused = (tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in "B}")
    with stepped(matcher, [letter]) as consumed:
        assert consumed and state() != before
    assert state() == before
    with stepped(matcher, [refused]) as consumed:
        assert not consumed
    assert state() == before and not matcher.is_error()
    with pytest.raises(RuntimeError), stepped(matcher, [letter]):
        raise RuntimeError("a failure while looking ahead")
    assert state() == before
