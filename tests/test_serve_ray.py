"""The server as a Ray Serve deployment, started locally with `serve.run`: one replica, then two,
answering the `openai` client exactly as the toy family answers in-process."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from eft_integrations.chat import chat  # noqa: E402
from eft_integrations.serve.config import ServeConfig  # noqa: E402
from eft_integrations.toyworld.paths import load_decoder  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.toy]

QUESTIONS = [
    "When was Zedrai founded?",
    "What is the capital of Bozi?",
    "Who founded Zedrai?",
    "What does Bozi export?",
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url() -> Iterator[str]:
    """A local Ray with Serve's HTTP proxy on a free port."""
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "0"}},
    )
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def expected() -> list[str]:
    """The toy family's greedy answers, in-process."""
    decoder = load_decoder()
    return [
        chat(decoder, [{"role": "user", "content": q}], temperature=0.0, max_new_tokens=24).content
        for q in QUESTIONS
    ]


def _ask(url: str, question: str, stream: bool = False) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": question}]
    if stream:
        chunks = client.chat.completions.create(
            model="toy", messages=messages, temperature=0, max_tokens=24, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reply = client.chat.completions.create(
        model="toy", messages=messages, temperature=0, max_tokens=24
    )
    return reply.choices[0].message.content


def _running_replicas(name: str) -> int:
    status = serve.status().applications[name].deployments["EFTDeployment"]
    return status.replica_states.get("RUNNING", 0)


def test_one_replica_answers_the_openai_client(ray_url, expected):
    from eft_integrations.serve.ray import app_builder

    serve.run(
        app_builder({"toy": "true", "served_model_name": "toy"}), name="eft", route_prefix="/"
    )
    assert _running_replicas("eft") == 1
    assert _ask(ray_url, QUESTIONS[0]) == expected[0]
    assert _ask(ray_url, QUESTIONS[1], stream=True) == expected[1]
    serve.delete("eft")


def test_two_replicas_share_the_load(ray_url, expected):
    from eft_integrations.serve.ray import EFTDeployment

    config = ServeConfig(toy=True, served_model_name="toy")
    deployment = EFTDeployment.options(num_replicas=2, ray_actor_options={"num_cpus": 0.5})
    serve.run(deployment.bind(config), name="eft2", route_prefix="/")
    deadline = time.monotonic() + 60
    while _running_replicas("eft2") < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _running_replicas("eft2") == 2
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda i: _ask(ray_url, QUESTIONS[i % 4], stream=i % 2 == 1), range(8))
        )
    assert answers == [expected[i % 4] for i in range(8)]
    serve.delete("eft2")
