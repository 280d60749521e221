"""Concurrent callers through one engine, on the realistic-shape random family.

Measured side by side in one run (greedy, the same prompts for every contender):

- throughput, like with like: N threads calling `EFTDecoder.generate` at once against the same
  N calls made one after another, and against the ceiling, one `generate([...N prompts])`;
  N `ChatEFT.ainvoke` gathered against the same N `ainvoke` awaited one after another. The
  curve for 1/2/4/8/16 callers. Targets at 8 callers: >= 5x sequential, >= 0.85x the
  explicit batch's throughput.
- time to first token of a request arriving while 7 others decode, against its solo value.
  Target: <= 2x.
- a batch whose 7 other rows finished early: the live row's time per token against that row
  alone (finished rows leave the batch). Target: <= 1.2x.

Run: `python benchmarks/engine.py [--tokens 32 --threads 2]`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, median, random_prompt, realistic_family, write_section
from eft_integrations import EFTDecoder


def sequential(decoder: EFTDecoder, prompts: list[list[int]], n: int) -> float:
    start = time.perf_counter()
    for p in prompts:
        decoder.generate(p, temperature=0, max_new_tokens=n)
    return time.perf_counter() - start


def threaded(decoder: EFTDecoder, prompts: list[list[int]], n: int) -> float:
    threads = [
        threading.Thread(
            target=decoder.generate, args=(p,), kwargs=dict(temperature=0, max_new_tokens=n)
        )
        for p in prompts
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def batched(decoder: EFTDecoder, prompts: list[list[int]], n: int) -> float:
    start = time.perf_counter()
    decoder.generate(prompts, temperature=0, max_new_tokens=n)
    return time.perf_counter() - start


def chat_calls(decoder: EFTDecoder, prompts: list[list[int]], n: int, gathered: bool) -> float:
    """N `ChatEFT.ainvoke` on the same messages, gathered or awaited one after another."""
    from langchain_core.messages import HumanMessage

    from eft_integrations.langchain import ChatEFT

    chat = ChatEFT(decoder=decoder, temperature=0, max_tokens=n)
    messages = [[HumanMessage(decoder.tokenizer.decode(p))] for p in prompts]

    async def run() -> None:
        if gathered:
            await asyncio.gather(*(chat.ainvoke(m) for m in messages))
        else:
            for m in messages:
                await chat.ainvoke(m)

    start = time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - start


def throughput_rows(
    decoder: EFTDecoder, args: argparse.Namespace
) -> tuple[list[str], dict[str, float]]:
    rows = [
        "| callers | sequential s | threads s | one batch s | threads vs sequential "
        "| threads vs batch |",
        "|---|---|---|---|---|---|",
    ]
    at_eight: dict[str, float] = {}
    for callers in (1, 2, 4, 8, 16):
        prompts = [random_prompt(args.prompt_tokens, seed=i) for i in range(callers)]
        seq, par, one = [], [], []
        for _ in range(args.repeats):  # interleaved: load drifts hit all three
            seq.append(sequential(decoder, prompts, args.tokens))
            par.append(threaded(decoder, prompts, args.tokens))
            one.append(batched(decoder, prompts, args.tokens))
        seq_s, par_s, one_s = median(seq), median(par), median(one)
        rows.append(
            f"| {callers} | {seq_s:.2f} | {par_s:.2f} | {one_s:.2f} | {seq_s / par_s:.2f}x "
            f"| {one_s / par_s:.2f}x |"
        )
        if callers == 8:
            at_eight = {"vs_sequential": seq_s / par_s, "vs_batch": one_s / par_s}
    return rows, at_eight


def time_to_first_token(decoder: EFTDecoder, args: argparse.Namespace) -> tuple[float, float]:
    """(solo TTFT, TTFT while 7 others decode), medians, in seconds."""
    newcomer = random_prompt(args.prompt_tokens, seed=99)
    solo, loaded = [], []
    for _ in range(args.repeats):
        solo.append(
            decoder.generate(newcomer, temperature=0, max_new_tokens=1).stats.time_to_first_token
        )
        others = [
            threading.Thread(
                target=decoder.generate,
                args=(random_prompt(args.prompt_tokens, seed=i),),
                kwargs=dict(temperature=0, max_new_tokens=4 * args.tokens),
            )
            for i in range(7)
        ]
        for t in others:
            t.start()
        while decoder.engine.batch_size < 7:  # the seven are decoding
            time.sleep(0.001)
        time.sleep(0.05)
        loaded.append(
            decoder.generate(newcomer, temperature=0, max_new_tokens=1).stats.time_to_first_token
        )
        for t in others:
            t.join()
    return median(solo), median(loaded)


def finished_rows(decoder: EFTDecoder, args: argparse.Namespace) -> tuple[float, float]:
    """Seconds per decode step of one long row: alone, and with 7 batch-mates that finished
    at token 2 (their steps count too: 1 of 63 steps ran with all eight rows)."""
    long_prompt = random_prompt(args.prompt_tokens, seed=50)
    alone, after = [], []
    for _ in range(args.repeats):
        out = decoder.generate(long_prompt, temperature=0, max_new_tokens=args.tokens * 2)
        alone.append(_per_token(out))
        prompts = [long_prompt] + [random_prompt(args.prompt_tokens, seed=i) for i in range(7)]
        budgets = [args.tokens * 2] + [2] * 7
        results: list = [None] * 8

        def call(i: int, prompt: list[int], budget: int, out: list) -> None:
            out[i] = decoder.generate(prompt, temperature=0, max_new_tokens=budget)

        threads = [
            threading.Thread(target=call, args=(i, prompts[i], budgets[i], results))
            for i in range(8)
        ]
        decoder.engine.stats.batch_sizes.clear()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after.append(_per_token(results[0]))
    return median(alone), median(after)


def _per_token(result) -> float:
    """Seconds per token after the first (the prefill of the batch is not a decode step)."""
    stats = result.stats
    return (stats.total_time - stats.time_to_first_token) / (len(result.token_ids) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    decoder = realistic_family()
    decoder.generate(random_prompt(8, 0), temperature=0, max_new_tokens=4)  # warm-up

    rows, eight = throughput_rows(decoder, args)
    prompts = [random_prompt(args.prompt_tokens, seed=i) for i in range(8)]
    chat_seq, chat_par = [], []
    for _ in range(args.repeats):
        chat_seq.append(chat_calls(decoder, prompts, args.tokens, gathered=False))
        chat_par.append(chat_calls(decoder, prompts, args.tokens, gathered=True))
    chat_ratio = median(chat_seq) / median(chat_par)
    ttft_solo, ttft_loaded = time_to_first_token(decoder, args)
    alone, after = finished_rows(decoder, args)
    ttft_ratio, finished_ratio = ttft_loaded / ttft_solo, after / alone
    met = lambda ok: "met" if ok else "missed"  # noqa: E731
    write_section(
        "engine",
        [
            "## Concurrent callers (engine)",
            "",
            f"`python benchmarks/engine.py --tokens {args.tokens} --threads {args.threads}`: the "
            f"realistic-shape random family (134M base + 20M chat and reference, 32k vocabulary), "
            f"greedy, {args.prompt_tokens}-token prompts, {args.tokens} new tokens per call, "
            f"median of {args.repeats}, contenders interleaved; {machine(args.threads)}. Every "
            "contender runs the same calls on the same models: sequential = one call after "
            "another, threads = one thread per call, one batch = one `generate` of all prompts "
            "(the ceiling).",
            "",
            *rows,
            "",
            f"- 8 threads calling `generate`: **{eight['vs_sequential']:.2f}x** the same 8 "
            f"calls made one after another (target >= 5x: {met(eight['vs_sequential'] >= 5)}), "
            f"**{eight['vs_batch']:.2f}x** the throughput of one `generate` of the 8 prompts "
            f"(target >= 0.85x: {met(eight['vs_batch'] >= 0.85)}).",
            f"- 8 `ChatEFT.ainvoke` through `asyncio.gather`: {median(chat_par):.2f} s against "
            f"{median(chat_seq):.2f} s for the same 8 awaited one after another, "
            f"**{chat_ratio:.2f}x** (target >= 5x: {met(chat_ratio >= 5)}).",
            f"- Time to first token of a request arriving while 7 others decode: "
            f"{ttft_loaded * 1e3:.0f} ms against {ttft_solo * 1e3:.0f} ms alone, "
            f"**{ttft_ratio:.2f}x**. Target <= 2x: {met(ttft_ratio <= 2)}.",
            f"- One live row after 7 batch-mates finished at token 2: {after * 1e3:.1f} ms per "
            f"token against {alone * 1e3:.1f} ms alone, **{finished_ratio:.2f}x**. Target <= 1.2x: "
            f"{met(finished_ratio <= 1.2)}.",
            "",
        ],
    )


if __name__ == "__main__":
    main()
