"""`n > 1`: several choices per prompt from `eft serve`, chat and completions, streamed and
not. Choice i is the in-process call with the seed vLLM derives (`sample_seed(seed, i)`),
the prompt is counted once in the usage, the samples of one prompt compute it once (the
others read it from the prefix cache), and one failing sample fails its request alone."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from eft_integrations.chat import chat
from eft_integrations.options import sample_seed
from eft_integrations.outputs import OutputProcessor
from eft_integrations.serve import BackgroundServer, build_app

from .chat_family import chat_decoder

KEY = "samples-key"
MODEL = "eft-samples"
USER = [{"role": "user", "content": "Tell me about Paris."}]
SEED = 1234
SAMPLING = {"temperature": 1.0, "top_p": 0.9, "seed": SEED}


@pytest.fixture(scope="module")
def decoder():
    return chat_decoder(tools_template=True)


@pytest.fixture(scope="module")
def server(decoder) -> Iterator[BackgroundServer]:
    with BackgroundServer(build_app(decoder, served_model_name=MODEL, api_key=KEY)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _events(response: httpx.Response) -> list[dict[str, Any]]:
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_chat_choices_are_the_seeded_samples_in_process(client, decoder):
    response = client.chat.completions.create(
        model=MODEL, messages=USER, n=3, max_tokens=10, **SAMPLING
    )
    assert [c.index for c in response.choices] == [0, 1, 2]
    expected = [
        chat(decoder, USER, max_new_tokens=10, **{**SAMPLING, "seed": sample_seed(SEED, i)})
        for i in range(3)
    ]
    assert [c.message.content for c in response.choices] == [e.content for e in expected]
    assert len({e.content for e in expected}) > 1  # the seeds differ, so do the samples
    assert response.usage.prompt_tokens == expected[0].usage.prompt_tokens  # counted once
    assert response.usage.completion_tokens == sum(e.usage.completion_tokens for e in expected)


def test_streamed_chat_choices_interleave_and_join_to_the_whole_answer(server, client):
    whole = client.chat.completions.create(
        model=MODEL, messages=USER, n=3, max_tokens=10, **SAMPLING
    )
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "model": MODEL,
            "messages": USER,
            "n": 3,
            "max_tokens": 10,
            "stream": True,
            "stream_options": {"include_usage": True},
            **SAMPLING,
        },
        timeout=120,
    )
    events = _events(response)
    texts, roles, finishes = ["", "", ""], [0, 0, 0], [0, 0, 0]
    for event in events[:-1]:
        (choice,) = event["choices"]
        delta, index = choice["delta"], choice["index"]
        roles[index] += delta.get("role") == "assistant"
        assert roles[index] == 1, "the role chunk comes first, once"
        texts[index] += delta.get("content") or ""
        finishes[index] += choice.get("finish_reason") is not None
    assert finishes == [1, 1, 1]
    assert texts == [c.message.content for c in whole.choices]
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] == whole.usage.completion_tokens
    assert events[-1]["usage"]["prompt_tokens"] == whole.usage.prompt_tokens


def test_completion_choices_are_prompt_major_seeded_samples(client, decoder):
    prompts = ["Once", "The city"]
    response = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=8, **SAMPLING)
    expected = [
        decoder.generate(p, max_new_tokens=8, **{**SAMPLING, "seed": sample_seed(SEED, j)})
        for p in prompts
        for j in range(2)
    ]
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert [c.text for c in response.choices] == [e.text for e in expected]
    assert response.usage.prompt_tokens == sum(e.usage.prompt_tokens for e in expected[::2])
    assert response.usage.completion_tokens == sum(e.usage.completion_tokens for e in expected)


def test_streamed_completion_choices_with_echo_and_logprobs(server, client):
    body = {
        "model": MODEL,
        "prompt": "Once upon",
        "n": 2,
        "max_tokens": 6,
        "echo": True,
        "logprobs": 2,
        **SAMPLING,
    }
    whole = client.completions.create(**body)
    response = httpx.post(
        f"{server.url}/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={**body, "stream": True},
        timeout=120,
    )
    texts, tokens = ["", ""], [[], []]
    for event in _events(response):
        (choice,) = event["choices"]
        texts[choice["index"]] += choice["text"]
        tokens[choice["index"]] += choice["logprobs"]["tokens"]
    assert texts == [c.text for c in whole.choices]
    assert tokens == [c.logprobs.tokens for c in whole.choices]
    assert all(c.text.startswith("Once upon") for c in whole.choices)


def test_the_samples_of_a_prompt_compute_it_once(client, decoder):
    prompt = f"{uuid.uuid4().hex} " * 12  # never seen: nothing cached before
    engine = decoder.engine
    computed = engine.stats.prompt_tokens_computed
    response = client.completions.create(model=MODEL, prompt=prompt, n=4, max_tokens=3, **SAMPLING)
    computed = engine.stats.prompt_tokens_computed - computed
    length = response.usage.prompt_tokens
    assert length > 64
    models = len(decoder.model_names)
    # the first sample computes the whole prompt; the others only its last partial block
    block = engine.memory.pools[0].block_size
    assert computed <= models * (length + 3 * block)
    assert computed >= models * length


def _failing_seed(seed: int) -> Any:
    """`OutputProcessor.process` failing the rows that decode with `seed` (a model failure
    only that row sees, as the runner reports one)."""
    original = OutputProcessor.process

    def process(outputs: OutputProcessor, tokens: Any, failed: Any, logprobs: Any = None) -> Any:
        failed = dict(failed)
        for request in tokens:
            if request.options.seed == seed:
                failed[request] = RuntimeError("a model failed for this row")
        return original(outputs, tokens, failed, logprobs)

    return process


def test_a_failing_sample_fails_its_request_alone(client, decoder, monkeypatch):
    live_body = {"model": MODEL, "prompt": "The city", "max_tokens": 30, **SAMPLING}
    live_solo = client.completions.create(**live_body).choices[0].text
    monkeypatch.setattr(OutputProcessor, "process", _failing_seed(sample_seed(SEED + 7, 1)))
    live: list[str] = []
    thread = threading.Thread(
        target=lambda: live.append(client.completions.create(**live_body).choices[0].text)
    )
    thread.start()
    with pytest.raises(openai.InternalServerError, match="request id"):
        client.chat.completions.create(
            model=MODEL, messages=USER, n=3, max_tokens=40, **{**SAMPLING, "seed": SEED + 7}
        )
    thread.join(120)
    monkeypatch.undo()
    assert decoder.engine.failure is None
    assert live == [live_solo]
    assert decoder.engine.batch_size == 0  # the failed request's other samples left too
    after = client.chat.completions.create(model=MODEL, messages=USER, n=2, max_tokens=4)
    assert len(after.choices) == 2


def test_the_access_log_reports_the_usage_the_client_got(client, caplog):
    with caplog.at_level(logging.INFO, logger="eft_integrations.access"):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=USER, n=3, max_tokens=5, **SAMPLING
        )
        usage = raw.parse().usage
        streamed = client.completions.create(
            model=MODEL,
            prompt="Once upon",
            n=2,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
            **SAMPLING,
        )
        stream_usage = [c.usage for c in streamed if c.usage is not None][-1]
        # the server logs a stream once it has ended, just after the client read [DONE]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            "/v1/completions" in r.getMessage() for r in caplog.records
        ):
            time.sleep(0.02)
    lines = [r.getMessage() for r in caplog.records if r.name == "eft_integrations.access"]
    (line,) = [x for x in lines if raw.headers["x-request-id"] in x]
    assert (
        f"prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens}" in line
    )
    expected = (
        f"prompt_tokens={stream_usage.prompt_tokens} "
        f"completion_tokens={stream_usage.completion_tokens}"
    )
    assert any('"POST /v1/completions" 200' in x and expected in x for x in lines)


def test_choices_past_the_limit_are_a_400_naming_n(client):
    with pytest.raises(openai.BadRequestError, match="choices") as caught:
        client.completions.create(model=MODEL, prompt=["a"] * 33, n=128, max_tokens=1)
    assert caught.value.body["param"] == "n"
