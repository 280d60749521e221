"""The OpenAI-compatible server, called by real clients: the `openai` SDK, LangChain's
ChatOpenAI and LlamaIndex's OpenAILike. Every answer is checked against the chat core (or the
decoder) called in-process with the same arguments: the server adds transport, not behavior.

The server runs with uvicorn on a thread on 127.0.0.1 (a free port), over the tiny chat family
of `tests/chat_family.py` (a template with tool support, 4096-token windows).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from eft_integrations.chat import chat
from eft_integrations.serve import BackgroundServer, ServeConfig, build_app

from .chat_family import chat_decoder

KEY = "test-key"
MODEL = "eft-test"
MAX_BODY = 64 * 1024
USER = [{"role": "user", "content": "Tell me about Paris."}]
WEIGHTS = {"chat": 2.0, "safe": -1.0}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city", "unit"],
        },
    },
}
JOKE = {
    "type": "object",
    "properties": {"setup": {"type": "string", "maxLength": 16}, "rating": {"type": "integer"}},
    "required": ["setup", "rating"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def chat_dec():
    return chat_decoder(tools_template=True)


@pytest.fixture(scope="module")
def server(chat_dec) -> Iterator[BackgroundServer]:
    app = build_app(chat_dec, served_model_name=MODEL, api_key=KEY, max_body_bytes=MAX_BODY)
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _core(decoder: Any, messages: list[dict], **options: Any) -> Any:
    """The chat core in-process, greedy unless told otherwise."""
    options.setdefault("temperature", 0.0)
    return chat(decoder, messages, **options)


def _wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ------------------------------------------------------------------------------ packaging


def test_importing_the_package_imports_no_server_framework():
    code = (
        "import sys, eft_integrations; print(sorted(m for m in ('fastapi', 'uvicorn', "
        "'sse_starlette', 'starlette', 'ray') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def test_config_reads_the_command_line_forms():
    config = ServeConfig.model_validate(
        {
            "base": "b",
            "behaviors": "chat=ft,ref;safe=s,ref",
            "weights": ["chat=0.5"],
        }
    )
    assert config.behaviors == {"chat": ("ft", "ref"), "safe": ("s", "ref")}
    assert config.weights == {"chat": 0.5}
    assert ServeConfig(base="b", behaviors={"c": "f,r"}).behaviors == {"c": ("f", "r")}
    with pytest.raises(ValueError, match="NAME=FINETUNED_PATH,REFERENCE_PATH"):
        ServeConfig(base="b", behaviors=["chat=only-one"])
    with pytest.raises(ValueError, match="not both"):
        ServeConfig(toy=True, base="b")
    with pytest.raises(ValueError, match="--base"):
        ServeConfig()


@pytest.mark.toy
def test_eft_serve_command_serves_the_toy_family(monkeypatch, capsys):
    from eft_integrations import cli
    from eft_integrations.serve import server as server_module

    served: dict[str, Any] = {}
    monkeypatch.setattr(
        server_module,
        "run_server",
        lambda app, host, port, log_level, **limits: served.update(app=app, port=port, **limits),
    )
    cli.main(
        [
            "serve",
            "--toy",
            "--port",
            "8123",
            "--served-model-name",
            "toy",
            "--max-batch-size",
            "3",
            "--weights",
            "helpful=1",
            "--max-queue",
            "4",
            "--header-timeout",
            "3",
            "--shutdown-grace",
            "7.5",
        ]
    )
    assert served["port"] == 8123 and "serving" in capsys.readouterr().out
    assert served["header_timeout"] == 3 and served["shutdown_grace"] == 7.5
    assert served["timeout_keep_alive"] == 5 and served["limit_concurrency"] == 1024
    decoder = served["app"].state.eft.decoder
    assert decoder.engine.max_batch_size == 3
    assert decoder.default_weights == {"helpful": 1.0, "harmless": 1.0}
    question = [{"role": "user", "content": "When was Zedrai founded?"}]
    with BackgroundServer(served["app"]) as running:
        toy = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0)
        reply = toy.chat.completions.create(
            model="toy", messages=question, temperature=0, max_tokens=24
        )
    assert reply.choices[0].message.content == _core(decoder, question, max_new_tokens=24).content
    assert reply.eft_weights == {"helpful": 1.0, "harmless": 1.0}


# ------------------------------------------------------------------------------ openai client


def test_models_lists_the_served_composition(client, chat_dec):
    (card,) = client.models.list().data
    assert card.id == MODEL
    assert card.root == chat_dec.model_name
    assert card.behaviors == ["chat", "safe"] and card.context_window == 4096
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_equals_the_core(client, chat_dec):
    reply = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=12)
    core = _core(chat_dec, USER, max_new_tokens=12)
    (choice,) = reply.choices
    assert choice.message.content == core.content and choice.message.role == "assistant"
    assert choice.finish_reason == core.finish_reason
    assert reply.usage.prompt_tokens == core.usage.prompt_tokens
    assert reply.usage.completion_tokens == core.usage.completion_tokens == 12
    assert reply.usage.total_tokens == core.usage.total_tokens
    assert reply.eft_weights == {"chat": 1.0, "safe": 1.0}


def test_a_next_turn_reports_its_cached_prompt_tokens(client):
    first = [{"role": "user", "content": "Tell me about the river of Veloria, in detail."}]
    reply = client.chat.completions.create(model=MODEL, messages=first, max_tokens=8)
    turn = [
        *first,
        {"role": "assistant", "content": reply.choices[0].message.content},
        {"role": "user", "content": "And the capital?"},
    ]
    again = client.chat.completions.create(model=MODEL, messages=turn, max_tokens=8)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens


def test_streamed_chat_with_usage(client, chat_dec):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=USER,
            temperature=0,
            max_completion_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    core = _core(chat_dec, USER, max_new_tokens=12)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == core.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == core.finish_reason
    assert finish[0].eft_weights == {"chat": 1.0, "safe": 1.0}
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 12
    assert usage.usage.prompt_tokens == core.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len(chunks) > 4  # streamed token by token, not in one piece


def test_completions_equal_the_decoder(client, chat_dec):
    prompt = "The capital of France is"
    expected = chat_dec.generate(prompt, temperature=0, max_new_tokens=8)
    reply = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8)
    assert reply.choices[0].text == expected.text
    assert reply.usage.completion_tokens == 8
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens

    ids = chat_dec.encode(prompt)
    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=8)
    assert by_ids.choices[0].text == expected.text

    other = chat_dec.generate("Once upon a time", temperature=0, max_new_tokens=8)
    both = client.completions.create(
        model=MODEL, prompt=[prompt, "Once upon a time"], temperature=0, max_tokens=8, echo=True
    )
    assert [c.text for c in both.choices] == [
        prompt + expected.text,
        "Once upon a time" + other.text,
    ]
    assert [c.index for c in both.choices] == [0, 1]
    assert both.usage.completion_tokens == 16

    stream = client.completions.create(
        model=MODEL,
        prompt=prompt,
        temperature=0,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == 8


def test_chat_logprobs_equal_the_core_streamed_and_not(client, chat_dec):
    expected = _core(chat_dec, USER, max_new_tokens=6, logprobs=2)
    tokens = [chat_dec.tokenizer.decode([e.token_id]) for e in expected.logprobs]
    reply = client.chat.completions.create(
        model=MODEL, messages=USER, temperature=0, max_tokens=6, logprobs=True, top_logprobs=2
    )
    content = reply.choices[0].logprobs.content
    assert [t.token for t in content] == tokens
    assert [t.logprob for t in content] == pytest.approx(
        [e.logprob for e in expected.logprobs], abs=1e-5
    )
    assert all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.bytes == list(t.token.encode()) for t in content)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    streamed = [
        t
        for c in stream
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_completions_echo_logprobs_score_the_prompt_as_lm_eval_reads_them(client, chat_dec):
    # lm-evaluation-harness's local-completions: token ids, echo, logprobs=1, max_tokens=1
    ids = chat_dec.encode("The capital of France is Paris")
    reply = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(ids) + 1
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    score = chat_dec.score(ids[:1], ids[1:], top_logprobs=1)
    assert logprobs.token_logprobs[1:-1] == pytest.approx(score.logprobs, abs=1e-5)
    greedy = [
        lp >= max(top.values()) - 1e-6
        for lp, top in zip(logprobs.token_logprobs[1:-1], logprobs.top_logprobs[1:-1], strict=True)
    ]
    assert greedy == score.is_greedy
    generated = chat_dec.generate(ids, temperature=0, max_new_tokens=1, logprobs=1)
    assert logprobs.token_logprobs[-1] == pytest.approx(generated.logprobs[0].logprob, abs=1e-5)
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    # max_tokens 0 scores the prompt alone; two prompts score in one batch
    other = chat_dec.encode("Once upon a time")
    both = client.completions.create(
        model=MODEL, prompt=[ids, other], max_tokens=0, echo=True, logprobs=0, temperature=0
    )
    assert [len(c.logprobs.tokens) for c in both.choices] == [len(ids), len(other)]
    assert both.choices[0].logprobs.token_logprobs[1:] == pytest.approx(score.logprobs, abs=1e-5)
    assert both.usage.completion_tokens == 0
    # streamed: the echo chunk carries the prompt's, the rest the generated tokens'
    stream = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=3, echo=True, logprobs=1, temperature=0, stream=True
    )
    tokens = [
        t
        for c in stream
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.token_logprobs
    ]
    assert tokens[1 : len(ids)] == pytest.approx(score.logprobs, abs=1e-5)
    assert len(tokens) == len(ids) + 3


def test_forced_tool_call_validates(client, chat_dec):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[ADD, WEATHER],
        temperature=0,
        max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    core = _core(
        chat_dec, messages, tools=[ADD, WEATHER], tool_choice="get_weather", max_new_tokens=200
    )
    assert arguments == core.tool_calls[0].arguments

    # streamed: a tool-call delta with each whole call (the in-process calls, in order; "required"
    # allows parallel calls), then finish_reason tool_calls
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            tools=[ADD, WEATHER],
            temperature=0,
            max_tokens=200,
            tool_choice="required",
            stream=True,
        )
    )
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    required = _core(
        chat_dec, messages, tools=[ADD, WEATHER], tool_choice="required", max_new_tokens=200
    )
    assert [d.function.name for d in deltas] == [c.name for c in required.tool_calls]
    assert [json.loads(d.function.arguments) for d in deltas] == [
        c.arguments for c in required.tool_calls
    ]
    assert [d.index for d in deltas] == list(range(len(deltas)))
    assert all(d.id and d.type == "function" for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # the call goes back as history with its result, and the model answers
    history = [
        *messages,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    answer = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], temperature=0, max_tokens=6
    )
    assert (
        answer.choices[0].message.content
        == _core(
            chat_dec,
            [
                *messages,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": call.id,
                            "type": "function",
                            "function": {
                                "name": call.function.name,
                                "arguments": call.function.arguments,
                            },
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
            ],
            tools=[WEATHER],
            max_new_tokens=6,
        ).content
    )


def test_response_format_json_schema(client, chat_dec):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a joke."}],
        temperature=0,
        max_tokens=120,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "joke", "schema": JOKE, "strict": True},
        },
    )
    joke = json.loads(reply.choices[0].message.content)
    jsonschema.validate(joke, JOKE)
    any_object = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Some JSON."}],
        temperature=0,
        max_tokens=120,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(any_object.choices[0].message.content), dict)


def test_json_object_equals_the_core_json_mode(client, chat_dec):
    messages = [{"role": "user", "content": "Some JSON about Paris."}]
    sampling = {"temperature": 0.8, "seed": 5}
    reply = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=60,
        response_format={"type": "json_object"},
        **sampling,
    )
    core = _core(
        chat_dec, messages, max_new_tokens=60, response_format={"type": "json_object"}, **sampling
    )
    assert reply.choices[0].message.content == core.content
    assert reply.choices[0].finish_reason == core.finish_reason


def test_eft_weights_change_the_output_exactly_as_the_core(client, chat_dec):
    default = client.chat.completions.create(
        model=MODEL, messages=USER, temperature=0, max_tokens=16
    )
    weighted = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        temperature=0,
        max_tokens=16,
        extra_body={"eft_weights": WEIGHTS},
    )
    core = _core(chat_dec, USER, weights=WEIGHTS, max_new_tokens=16)
    assert weighted.choices[0].message.content == core.content
    assert weighted.choices[0].message.content != default.choices[0].message.content
    assert weighted.eft_weights == WEIGHTS
    partial = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        temperature=0,
        max_tokens=4,
        extra_body={"eft_weights": {"safe": 0}},
    )
    assert partial.eft_weights == {"chat": 1.0, "safe": 0.0}  # names left out: the default

    prompt = "Once upon a time"
    completion = client.completions.create(
        model=MODEL,
        prompt=prompt,
        temperature=0,
        max_tokens=10,
        extra_body={"eft_weights": WEIGHTS},
    )
    expected = chat_dec.generate(prompt, weights=WEIGHTS, temperature=0, max_new_tokens=10)
    assert completion.choices[0].text == expected.text


def test_eft_sampling_fields_reach_the_decoder(client, chat_dec):
    options = {"top_k": 5, "conservative_top_p": 0.9}
    reply = client.completions.create(
        model=MODEL,
        prompt="Once",
        temperature=0.7,
        seed=3,
        max_tokens=10,
        top_p=0.95,
        extra_body=options,
    )
    expected = chat_dec.generate(
        "Once", temperature=0.7, seed=3, max_new_tokens=10, top_p=0.95, **options
    )
    assert reply.choices[0].text == expected.text
    speculative = client.completions.create(
        model=MODEL, prompt="Once", temperature=0, max_tokens=10, extra_body={"speculative_k": 3}
    )
    assert (
        speculative.choices[0].text
        == chat_dec.generate("Once", temperature=0, max_new_tokens=10).text
    )


def test_seed_reproduces_sampling(client, chat_dec):
    def sample(seed: int) -> str:
        reply = client.chat.completions.create(
            model=MODEL, messages=USER, temperature=1.0, seed=seed, max_tokens=16
        )
        return reply.choices[0].message.content

    first, again, other = sample(5), sample(5), sample(6)
    assert first == again != other
    assert first == _core(chat_dec, USER, temperature=1.0, seed=5, max_new_tokens=16).content


# ------------------------------------------------------------------------------ concurrency


def _request(i: int) -> dict[str, Any]:
    """Sixteen different requests: prompts, weights, greedy or seeded, lengths."""
    weights = [None, {"chat": 1.0, "safe": 0.0}, {"chat": 0.5, "safe": 1.5}, WEIGHTS][i % 4]
    return {
        "messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}],
        "weights": weights,
        "temperature": 0.0 if i % 2 == 0 else 0.8,
        "seed": None if i % 2 == 0 else 100 + i,
        "max_new_tokens": 10 + i,
    }


async def test_sixteen_concurrent_streams_equal_their_solo_outputs(server, chat_dec):
    requests = [_request(i) for i in range(16)]
    solo = [
        _core(
            chat_dec,
            r["messages"],
            weights=r["weights"],
            temperature=r["temperature"],
            seed=r["seed"],
            max_new_tokens=r["max_new_tokens"],
        ).content
        for r in requests
    ]
    stats = chat_dec.engine.stats
    steps_before = stats.steps
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)

    async def stream(r: dict[str, Any]) -> str:
        extra = {"eft_weights": r["weights"]} if r["weights"] else None
        chunks = await client.chat.completions.create(
            model=MODEL,
            messages=r["messages"],
            temperature=r["temperature"],
            seed=r["seed"],
            max_tokens=r["max_new_tokens"],
            stream=True,
            extra_body=extra,
        )
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    try:
        texts = await asyncio.gather(*(stream(r) for r in requests))
    finally:
        await client.close()
    assert texts == solo
    new_steps = stats.steps - steps_before
    batch_sizes = list(stats.batch_sizes)[-new_steps:]
    assert max(batch_sizes) > 1  # the engine decoded the clients together


def test_a_client_leaving_mid_stream_frees_its_row(client, chat_dec):
    engine = chat_dec.engine
    cancelled = engine.stats.cancelled
    expected = _core(chat_dec, USER, max_new_tokens=300).content
    results: list[str] = []

    def full_stream() -> None:
        chunks = client.chat.completions.create(
            model=MODEL, messages=USER, temperature=0, max_tokens=300, stream=True
        )
        results.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))

    others = [threading.Thread(target=full_stream) for _ in range(2)]
    for thread in others:
        thread.start()
    leaving = client.chat.completions.create(
        model=MODEL, messages=USER, temperature=0, max_tokens=300, stream=True
    )
    for _, _ in zip(range(3), leaving, strict=False):
        pass
    leaving.close()  # the client goes away: the connection closes mid-stream
    assert _wait_for(lambda: engine.stats.cancelled == cancelled + 1)
    assert any(thread.is_alive() for thread in others)  # cancelled while the others decode
    for thread in others:
        thread.join(120)
    assert results == [expected, expected]  # the others finish, undisturbed
    assert _wait_for(lambda: engine.batch_size == 0 and engine.cached_tokens() == 0)
    assert engine.stats.cancelled == cancelled + 1


def test_a_client_leaving_before_its_answer_cancels_it(server, chat_dec):
    engine = chat_dec.engine
    cancelled = engine.stats.cancelled
    body = {"model": MODEL, "messages": USER, "temperature": 0, "max_tokens": 3000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/v1/chat/completions",
            json=body,
            timeout=1.0,
            headers={"Authorization": f"Bearer {KEY}"},
        )
    assert _wait_for(lambda: engine.stats.cancelled == cancelled + 1)
    assert _wait_for(lambda: engine.batch_size == 0 and engine.cached_tokens() == 0)


# ------------------------------------------------------------------------------ errors


def _chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, "max_tokens": 4, **fields}


LONG_PROMPT = "word " * 3000  # about 7500 tokens of the tiny tokenizer: over the 4096 window

ERRORS = [  # (id, request, status, words of the message, param)
    (
        "malformed-json",
        {"content": b'{"model": "eft-test", "messages": ['},
        400,
        "malformed JSON",
        None,
    ),
    ("not-an-object", {"content": b"[1, 2]"}, 400, "invalid request", "body"),
    ("missing-messages", {"json": {"model": MODEL}}, 400, "Field required", "messages"),
    ("empty-messages", {"json": _chat_body(messages=[])}, 400, "at least 1", "messages"),
    (
        "bad-role",
        {"json": _chat_body(messages=[{"role": "robot", "content": "x"}])},
        400,
        "'system', 'developer', 'user', 'assistant' or 'tool'",
        "messages[0].role",
    ),
    (
        "negative-temperature",
        {"json": _chat_body(temperature=-1)},
        400,
        "greater than or equal to 0",
        "temperature",
    ),
    ("top-p-over-one", {"json": _chat_body(top_p=1.5)}, 400, "less than or equal to 1", "top_p"),
    (
        "zero-max-tokens",
        {"json": _chat_body(max_tokens=0)},
        400,
        "greater than or equal to 1",
        "max_tokens",
    ),
    ("n-zero", {"json": _chat_body(n=0)}, 400, "n must be between 1 and 128", "n"),
    ("n-too-many", {"json": _chat_body(n=129)}, 400, "n must be between 1 and 128", "n"),
    (
        "top-logprobs-alone",
        {"json": _chat_body(top_logprobs=2)},
        400,
        "top_logprobs needs logprobs: true",
        "top_logprobs",
    ),
    (
        "top-logprobs-too-many",
        {"json": _chat_body(logprobs=True, top_logprobs=21)},
        400,
        "less than or equal to 20",
        "top_logprobs",
    ),
    (
        "completion-zero-tokens-without-echo",
        {"path": "/v1/completions", "json": {"model": MODEL, "prompt": "a", "max_tokens": 0}},
        400,
        "0 only with echo",
        "max_tokens",
    ),
    (
        "image-part",
        {
            "json": _chat_body(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                    }
                ]
            )
        },
        400,
        "only text content parts",
        "messages",
    ),
    ("unknown-model", {"json": _chat_body(model="gpt-4")}, 404, "'gpt-4' does not exist", "model"),
    ("missing-key", {"json": _chat_body(), "headers": {}}, 401, "missing API key", None),
    (
        "wrong-key",
        {"json": _chat_body(), "headers": {"Authorization": "Bearer nope"}},
        401,
        "incorrect API key",
        None,
    ),
    (
        "unknown-behavior",
        {"json": _chat_body(eft_weights={"helpful": 1.0})},
        400,
        "unknown behavior 'helpful' in weights; known behaviors: ['chat', 'safe']",
        "eft_weights",
    ),
    (
        "weight-not-a-number",
        {"json": _chat_body(eft_weights={"chat": "high"})},
        400,
        "valid number",
        "eft_weights.chat",
    ),
    (
        "weight-nan",
        {
            "content": b'{"model": "eft-test", "messages": [{"role": "user", '
            b'"content": "x"}], "eft_weights": {"chat": NaN}}'
        },
        400,
        "finite number",
        "eft_weights.chat",
    ),
    (
        "speculative-zero",
        {"json": _chat_body(speculative_k=0)},
        400,
        "greater than or equal to 1",
        "speculative_k",
    ),
    (
        "unknown-tool-choice",
        {
            "json": _chat_body(
                tools=[ADD], tool_choice={"type": "function", "function": {"name": "multiply"}}
            )
        },
        400,
        "'multiply'",
        "tool_choice",
    ),
    (
        "schema-missing",
        {"json": _chat_body(response_format={"type": "json_schema"})},
        400,
        'needs "json_schema"',
        "response_format",
    ),
    (
        "prompt-too-long",
        {"json": _chat_body(messages=[{"role": "user", "content": LONG_PROMPT}])},
        400,
        "tokens but the smallest context window is 4096",
        "messages",
    ),
    (
        "completion-too-long",
        {"path": "/v1/completions", "json": {"model": MODEL, "prompt": LONG_PROMPT}},
        400,
        "smallest context window is 4096",
        "prompt",
    ),
    (
        "completion-stream-two-prompts",
        {"path": "/v1/completions", "json": {"model": MODEL, "prompt": ["a", "b"], "stream": True}},
        400,
        "one prompt",
        "prompt",
    ),
    (
        "completion-empty-prompt",
        {"path": "/v1/completions", "json": {"model": MODEL, "prompt": ""}},
        400,
        "prompt is empty",
        "prompt",
    ),
    (
        "body-too-large",
        {"json": _chat_body(messages=[{"role": "user", "content": "x" * MAX_BODY}])},
        413,
        f"limit of {MAX_BODY} bytes",
        None,
    ),
    (
        "chunked-body-too-large",
        {"content": iter([b" " * 40_000] * 3)},
        413,
        f"limit of {MAX_BODY} bytes",
        None,
    ),
    ("unknown-route", {"path": "/v1/embeddings"}, 404, "Not Found", None),
    ("wrong-method", {"method": "GET"}, 405, "Method Not Allowed", None),
]


@pytest.mark.parametrize(
    ("request_", "status", "words", "param"),
    [row[1:] for row in ERRORS],
    ids=[row[0] for row in ERRORS],
)
def test_errors_are_openai_error_json(server, client, chat_dec, request_, status, words, param):
    request_ = dict(request_)
    method = request_.pop("method", "POST")
    path = request_.pop("path", "/v1/chat/completions")
    headers = request_.pop("headers", {"Authorization": f"Bearer {KEY}"})
    if "content" in request_:
        headers = {**headers, "Content-Type": "application/json"}
    response = httpx.request(method, server.url + path, headers=headers, timeout=60, **request_)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"]
    assert error["param"] == param
    if status == 400 and "context window" in words:  # both numbers are named
        assert error["code"] == "context_length_exceeded"
        assert int(re.search(r"prompt has (\d+) tokens", error["message"]).group(1)) > 4096
    # the server still answers
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert (
        client.chat.completions.create(
            model=MODEL, messages=USER, temperature=0, max_tokens=2
        ).usage.completion_tokens
        == 2
    )


def test_the_openai_client_raises_its_typed_errors(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=USER, extra_body={"eft_weights": {"x": 1}}
        )
    assert caught.value.param == "eft_weights"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(client.base_url), api_key="bad", max_retries=0).models.list()


def test_failures_inside_the_core_stay_in_their_request(server, client, monkeypatch):
    from eft_integrations.chat import ChatDelta
    from eft_integrations.serve import app as app_module

    async def fails_mid_stream(*args: Any, **kwargs: Any):
        yield ChatDelta("partial", [])
        raise RuntimeError("a model failed")

    monkeypatch.setattr(app_module, "astream_chat", fails_mid_stream)
    with pytest.raises(openai.InternalServerError, match=r"internal error \(request id"):
        client.chat.completions.create(model=MODEL, messages=USER)
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=_chat_body(stream=True),
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 200  # the headers went out with the first delta
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[1])["choices"][0]["delta"]["content"] == "partial"
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    assert events[-1] == "[DONE]"
    monkeypatch.undo()
    assert (
        client.chat.completions.create(
            model=MODEL, messages=USER, temperature=0, max_tokens=2
        ).usage.completion_tokens
        == 2
    )


def test_a_full_queue_answers_503_with_retry_after(chat_dec):
    engine = chat_dec.engine
    limit = engine.max_batch_size
    app = build_app(chat_dec, served_model_name=MODEL, max_queue=0)
    with BackgroundServer(app) as running:
        busy = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0)
        engine.max_batch_size = 1
        try:
            stream = busy.chat.completions.create(
                model=MODEL, messages=USER, temperature=0, max_tokens=2000, stream=True
            )
            next(iter(stream))
            assert engine.batch_size == 1
            response = httpx.post(f"{running.url}/v1/chat/completions", json=_chat_body())
            stream.close()
        finally:
            engine.max_batch_size = limit
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        error = response.json()["error"]
        assert error["code"] == "queue_full" and "max_queue=0" in error["message"]
        assert _wait_for(lambda: engine.batch_size == 0)
        answer = busy.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
        assert answer.usage.completion_tokens == 2


# ------------------------------------------------------------------------------ LangChain


def _chat_openai(server, **fields: Any):
    from langchain_openai import ChatOpenAI

    fields.setdefault("max_tokens", 12)
    return ChatOpenAI(
        base_url=f"{server.url}/v1",
        api_key=KEY,
        model=MODEL,
        temperature=0,
        max_retries=0,
        **fields,
    )


def test_langchain_chat_openai_invoke_and_stream(server, chat_dec):
    core = _core(chat_dec, USER, max_new_tokens=12)
    llm = _chat_openai(server, stream_usage=True)
    reply = llm.invoke(USER[0]["content"])
    assert reply.content == core.content
    assert reply.usage_metadata["output_tokens"] == 12
    assert reply.usage_metadata["input_tokens"] == core.usage.prompt_tokens
    chunks = list(llm.stream(USER[0]["content"]))
    assert len(chunks) > 2
    joined = chunks[0]
    for chunk in chunks[1:]:
        joined += chunk
    assert joined.content == core.content
    assert joined.usage_metadata["output_tokens"] == 12

    weighted = _chat_openai(server, extra_body={"eft_weights": WEIGHTS})
    assert (
        weighted.invoke(USER[0]["content"]).content
        == _core(chat_dec, USER, weights=WEIGHTS, max_new_tokens=12).content
    )


def test_langchain_forced_tool_call_and_structured_output(server):
    from pydantic import BaseModel, Field

    llm = _chat_openai(server, max_tokens=200)
    reply = llm.bind_tools([ADD], tool_choice="add").invoke("What is 2 plus 3?")
    (call,) = reply.tool_calls
    assert call["name"] == "add" and not reply.invalid_tool_calls
    jsonschema.validate(call["args"], ADD["function"]["parameters"])

    class Joke(BaseModel):
        """A joke."""

        setup: str = Field(max_length=16)
        rating: int

    for method in ("json_schema", "function_calling"):
        joke = llm.with_structured_output(Joke, method=method).invoke("Tell me a joke.")
        assert isinstance(joke, Joke), method


# ------------------------------------------------------------------------------ LlamaIndex


def _openai_like(server, **fields: Any):
    from llama_index.llms.openai_like import OpenAILike

    fields.setdefault("max_tokens", 12)
    return OpenAILike(
        model=MODEL,
        api_base=f"{server.url}/v1",
        api_key=KEY,
        temperature=0,
        is_chat_model=True,
        is_function_calling_model=True,
        context_window=4096,
        max_retries=0,
        **fields,
    )


def test_llama_index_openai_like_chat_complete_stream(server, chat_dec):
    from llama_index.core.llms import ChatMessage

    core = _core(chat_dec, USER, max_new_tokens=12)
    llm = _openai_like(server)
    assert llm.complete(USER[0]["content"]).text == core.content
    messages = [ChatMessage(role="user", content=USER[0]["content"])]
    assert llm.chat(messages).message.content == core.content
    pieces = [r.delta for r in llm.stream_chat(messages)]
    assert len(pieces) > 2 and "".join(p or "" for p in pieces) == core.content
    weighted = _openai_like(server, additional_kwargs={"extra_body": {"eft_weights": WEIGHTS}})
    assert (
        weighted.chat(messages).message.content
        == _core(chat_dec, USER, weights=WEIGHTS, max_new_tokens=12).content
    )


def test_llama_index_forced_tool_call_and_structured_output(server):
    from llama_index.core.prompts import PromptTemplate
    from llama_index.core.tools import FunctionTool
    from pydantic import BaseModel, Field

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    llm = _openai_like(server, max_tokens=200)
    tool = FunctionTool.from_defaults(fn=add)
    response = llm.chat_with_tools([tool], user_msg="What is 2 plus 3?", tool_required=True)
    (selection,) = llm.get_tool_calls_from_response(response)
    assert selection.tool_name == "add"
    jsonschema.validate(selection.tool_kwargs, ADD["function"]["parameters"])

    class Joke(BaseModel):
        """A joke."""

        setup: str = Field(max_length=16)
        rating: int

    joke = llm.structured_predict(
        Joke, PromptTemplate("Tell me a joke about {topic}."), topic="cats"
    )
    assert isinstance(joke, Joke)


def test_llama_index_query_engine_answers_through_the_server(server, chat_dec):
    from llama_index.core import Settings

    from eft_integrations.llama_index import EFTLLM

    from .llama_index.corpus import QUESTION, build_index
    from .llama_index.embeddings import MiniLMEmbedding

    previous = Settings._tokenizer
    Settings.tokenizer = chat_dec.tokenizer.encode  # count (and pack) tokens offline
    try:
        index = build_index(MiniLMEmbedding())
        remote = index.as_query_engine(
            llm=_openai_like(server, max_tokens=16), similarity_top_k=2
        ).query(QUESTION)
        local = index.as_query_engine(
            llm=EFTLLM(decoder=chat_dec, temperature=0.0, max_new_tokens=16), similarity_top_k=2
        ).query(QUESTION)
    finally:
        Settings._tokenizer = previous
    assert remote.source_nodes[0].node.ref_doc_id == "veloria"
    assert remote.response == local.response  # the same prompt, the same engine, greedy
