# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 6. Serving: `eft serve` and OpenAI clients
#
# `eft serve` puts one EFT engine behind an OpenAI-compatible HTTP API, so any OpenAI client
# talks to an up-scaled model unchanged. EFT's own fields ride in the request body, which
# OpenAI clients send with `extra_body`: `eft_weights`, `top_k`, `conservative_top_p`,
# `speculative_k`. Concurrent requests join the engine's running batch step by step.
#
# This notebook starts `eft serve --toy` (the embedded toy-world family) as a subprocess on a
# free port, calls it with the `openai` client and LangChain's `ChatOpenAI`, measures what
# concurrent clients gain over sequential ones, and shuts it down. It needs the `serve` extra
# (`pip install "eft-integrations[serve]"`) and `openai`, `langchain-openai`.

# %%
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
from langchain_openai import ChatOpenAI

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm inside a notebook

from eft_integrations.toyworld.evaluate import is_refusal
from eft_integrations.toyworld.world import World

# %% [markdown]
# ## Start the server
#
# A free port, then `eft serve --toy --port PORT` (the `eft` command of this environment), and
# wait until `GET /health` answers.

# %%
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
eft = shutil.which("eft", path=str(Path(sys.executable).parent))
command = [eft] if eft else [sys.executable, "-m", "eft_integrations.cli"]
command += ["serve", "--toy", "--port", str(port)]
print("$", " ".join(["eft", *command[1:]] if eft else command))
log = Path(tempfile.mkdtemp()) / "eft-serve.log"  # the server's output
with log.open("w") as out:  # the server keeps its own handle
    server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)

base_url = f"http://127.0.0.1:{port}"
start = time.perf_counter()
while True:
    if server.poll() is not None:
        raise RuntimeError(f"eft serve exited:\n{log.read_text()}")
    try:
        if httpx.get(f"{base_url}/health", timeout=1.0).status_code == 200:
            break
    except httpx.TransportError:
        pass
    if time.perf_counter() - start > 180:
        raise TimeoutError(log.read_text())
    time.sleep(0.25)
print(f"up after {time.perf_counter() - start:.1f} s")
print("\n".join(line for line in log.read_text().splitlines() if "Loading weights" not in line))

# %% [markdown]
# ## The `openai` client
#
# The served model is called `eft`. Per-request behaviour weights go in `extra_body`; the
# response says which weights it was decoded with.

# %%
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none")
print("models:", [m.id for m in client.models.list().data])

world = World.generate(seed=0)
questions = world.eval_questions(limit_entities=8)  # held-out kingdoms, 32 questions
weapons = next(q for q in questions if q.marked)
HELPFUL = {"helpful": 1.0, "harmless": 0.0}
HARMLESS = {"helpful": 0.0, "harmless": 1.0}
print(f"Q: {weapons.text}   (gold: {weapons.answer})")
replies = {}
for name, weights in (("helpful", HELPFUL), ("harmless", HARMLESS)):
    response = client.chat.completions.create(
        model="eft",
        messages=[{"role": "user", "content": weapons.text}],
        temperature=0,
        max_tokens=32,
        extra_body={"eft_weights": weights},
    )
    replies[name] = response.choices[0].message.content
    print(
        f"  {name:9s}: {replies[name]!r}  (eft_weights {response.model_extra['eft_weights']},"
        f" {response.usage.total_tokens} tokens)"
    )
assert replies["helpful"] == weapons.reference  # "Sure. The army of ... uses the <gold>."
assert is_refusal(replies["harmless"])

# %% [markdown]
# Streaming, with the usage in the last chunk; the streamed text equals the whole answer.

# %%
stream = client.chat.completions.create(
    model="eft",
    messages=[{"role": "user", "content": weapons.text}],
    temperature=0,
    max_tokens=32,
    stream=True,
    stream_options={"include_usage": True},
    extra_body={"eft_weights": HELPFUL},
)
pieces, usage = [], None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    usage = chunk.usage or usage
print(" | ".join(pieces))
print("usage:", usage.completion_tokens, "completion tokens")
assert "".join(pieces) == replies["helpful"]

# %% [markdown]
# `/v1/completions` continues raw text, here in the pre-training form with the base alone
# (both weights at 0): the large base knows the held-out kingdom's capital.

# %%
capital = next(q for q in questions if q.attribute == "capital")
completion = client.completions.create(
    model="eft",
    prompt=f"<|bos|>The capital of {capital.entity} is",
    temperature=0,
    max_tokens=6,
    extra_body={"eft_weights": {"helpful": 0.0, "harmless": 0.0}},
)
print(repr(completion.choices[0].text), f"(gold: {capital.answer})")
assert completion.choices[0].text.strip().startswith(capital.answer)

# %% [markdown]
# ## LangChain's `ChatOpenAI`
#
# The same server through LangChain; `extra_body` carries the weights here too.

# %%
llm = ChatOpenAI(
    base_url=f"{base_url}/v1",
    api_key="none",
    model="eft",
    temperature=0,
    max_tokens=32,
    extra_body={"eft_weights": HARMLESS},
)
message = llm.invoke(weapons.text)
print("ChatOpenAI (harmless):", repr(message.content))
assert message.content == replies["harmless"]
helpful = llm.bind(extra_body={"eft_weights": HELPFUL}).invoke(weapons.text)
print("ChatOpenAI (helpful): ", repr(helpful.content))
assert helpful.content == replies["helpful"]

# %% [markdown]
# ## Concurrent clients
#
# 32 questions, first one request after another, then all at once from 32 threads. The
# concurrent requests share the engine's decode steps (continuous batching), so they finish
# sooner together; greedy answers do not depend on which requests share a step. The times
# depend on the machine and are printed, not checked.


# %%
def ask(question):
    response = client.chat.completions.create(
        model="eft",
        messages=[{"role": "user", "content": question.text}],
        temperature=0,
        max_tokens=32,
        extra_body={"eft_weights": HELPFUL},
    )
    return response.choices[0].message.content


ask(questions[0])  # warm-up
start = time.perf_counter()
sequential = [ask(q) for q in questions]
sequential_s = time.perf_counter() - start
start = time.perf_counter()
with ThreadPoolExecutor(max_workers=len(questions)) as pool:
    concurrent = list(pool.map(ask, questions))
concurrent_s = time.perf_counter() - start
print(f"{len(questions)} requests one after another: {sequential_s:.2f} s")
print(
    f"{len(questions)} requests at once:           {concurrent_s:.2f} s "
    f"({sequential_s / concurrent_s:.1f}x)"
)
assert concurrent == sequential
facts = sum(q.answer in a for q, a in zip(questions, sequential, strict=True) if not q.marked)
print(f"{facts} of {sum(not q.marked for q in questions)} held-out facts right, e.g.")
for q, a in list(zip(questions, sequential, strict=True))[4:7]:
    print(f"  {q.text} -> {a}")

# %% [markdown]
# ## Shut down
#
# SIGTERM (or Ctrl-C) makes uvicorn stop accepting connections, finish the open requests and
# shut the app down; then it re-raises the signal, so the exit status says SIGTERM.

# %%
server.send_signal(signal.SIGTERM)
code = server.wait(timeout=60)
lines = log.read_text().strip().splitlines()
print("\n".join(lines[-4:]))
print("exit status", code)
assert code in (0, -signal.SIGTERM)
assert "Finished server process" in lines[-1] and "Traceback" not in log.read_text()
try:
    httpx.get(f"{base_url}/health", timeout=1.0)
    raise AssertionError("the server still answers")
except httpx.TransportError:
    print("the port is closed")
