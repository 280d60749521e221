"""The engine and speculative EFT on a GPU, with bf16 random-weight models of real shapes.

A Llama-7B-shaped base and two Llama-1B-shaped small models (chat and its reference) with
random weights, 32k vocabulary, bfloat16 on one CUDA device. Measured side by side in one run:

- EFT decode (batch 1) against the sum of the three models' own cached `generate`;
- concurrent callers (1, 8, 32 threads) against the same calls made one after another;
- time to first token of a request arriving while 7 others decode, against alone;
- speculative EFT (k = 4, adaptive) against plain EFT, greedy, same tokens checked;
- eager vs torch.compile vs CUDA graphs (`compile="reduce-overhead"`) decode, EFT and the
  base alone, batch 1 and 8;
- engine overhead where model compute is negligible (`overhead.py`'s tiny models on the
  device): the EFT step against the three models' bare cached forwards at batch 1 and 16,
  and the host reads (synchronisations) per step.

Without CUDA it says so and exits (`--device cpu --shapes tiny` runs the same code on small
shapes, to check the script). Run: `python benchmarks/gpu.py`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (
    PLAIN_TEMPLATE,
    VOCAB,
    median,
    random_prompt,
    time_it,
    word_level_tokenizer,
    write_section,
)
from benchmarks.overhead import overhead_rows, tiny_family
from eft_integrations import EFTDecoder

SHAPES = {  # hidden, layers, heads, kv heads, intermediate
    "real": {"base": (4096, 32, 32, 32, 11008), "small": (2048, 16, 32, 8, 8192)},
    "tiny": {"base": (256, 4, 4, 4, 688), "small": (128, 2, 4, 2, 344)},
}


def build(shape: tuple[int, int, int, int, int], seed: int, device: str) -> LlamaForCausalLM:
    hidden, layers, heads, kv, inter = shape
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():  # a peaked head, so drafts are sometimes accepted
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def family(args: argparse.Namespace) -> EFTDecoder:
    shapes = SHAPES[args.shapes]
    base = build(shapes["base"], 0, args.device)
    chat = build(shapes["small"], 1, args.device)
    ref = build(shapes["small"], 2, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = word_level_tokenizer()
        tokenizer.save_pretrained(tmp)
    return EFTDecoder(
        base=base,
        behaviors={"chat": (chat, ref)},
        tokenizer=tokenizer,
        eos_token_ids=[],
        chat_template=PLAIN_TEMPLATE,
    )


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def callers(decoder: EFTDecoder, n: int, tokens: int, concurrent: bool) -> float:
    prompts = [random_prompt(32, seed=i) for i in range(n)]
    run = lambda p: decoder.generate(p, temperature=0, max_new_tokens=tokens)  # noqa: E731
    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for p in prompts:
            run(p)
    sync()
    return time.perf_counter() - start


def compiled_rows(decoder: EFTDecoder, tokens: int, repeats: int) -> list[str]:
    """Eager vs torch.compile vs CUDA graphs ("reduce-overhead"), tokens per second of EFT
    (three models) and of the base alone, batch 1 and 8, on the same loaded models."""
    base = decoder._models[decoder._ensemble.base]
    pair = (
        decoder._models[decoder._ensemble.pairs[0].finetuned],
        decoder._models[decoder._ensemble.pairs[0].reference],
    )
    rows = [
        "| decode step | batch | EFT tok/s | base alone tok/s | EFT vs eager |",
        "|---|---|---|---|---|",
    ]
    eager_rate: dict[int, float] = {}
    for mode in (False, True, "reduce-overhead"):
        made = {
            "eft": EFTDecoder(
                base, {"chat": pair}, decoder.tokenizer, eos_token_ids=[], compile=mode
            ),
            "base": EFTDecoder(base, {}, decoder.tokenizer, eos_token_ids=[], compile=mode),
        }
        for batch in (1, 8):
            prompts = [random_prompt(32, seed=i) for i in range(batch)]
            rates = {}
            for name, dec in made.items():
                for _ in range(3):  # compiles every model's graph for the buckets met
                    dec.generate(prompts, temperature=0, max_new_tokens=tokens)
                sync()
                seconds = median(
                    [
                        time_it(
                            lambda d=dec, p=prompts: (
                                d.generate(p, temperature=0, max_new_tokens=tokens),
                                sync(),
                            )
                        )
                        for _ in range(repeats)
                    ]
                )
                rates[name] = batch * tokens / seconds
            if mode is False:
                eager_rate[batch] = rates["eft"]
            label = {False: "eager", True: "torch.compile", "reduce-overhead": "CUDA graphs"}[mode]
            rows.append(
                f"| {label} | {batch} | {rates['eft']:.0f} | {rates['base']:.0f} | "
                f"{rates['eft'] / eager_rate[batch]:.2f}x |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="real")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    decoder = family(args)
    n, prompt = args.tokens, random_prompt(32, seed=0)
    decoder.generate(prompt, temperature=0, max_new_tokens=8)  # warm-up

    def eft() -> None:
        decoder.generate(prompt, temperature=0, max_new_tokens=n)
        sync()

    def own(model: LlamaForCausalLM) -> None:
        ids = torch.tensor([prompt], device=args.device)
        model.generate(
            ids,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        sync()

    eft_s, own_s = [], []
    for _ in range(args.repeats):
        eft_s.append(time_it(eft))
        own_s.append(sum(time_it(lambda m=m: own(m)) for m in decoder._models))
    overhead = median(eft_s) / median(own_s)
    rows = ["| callers | sequential s | concurrent s | speed-up |", "|---|---|---|---|"]
    for count in (1, 8, 32):
        seq = median([callers(decoder, count, n, False) for _ in range(args.repeats)])
        par = median([callers(decoder, count, n, True) for _ in range(args.repeats)])
        rows.append(f"| {count} | {seq:.2f} | {par:.2f} | {seq / par:.2f}x |")
    newcomer = random_prompt(32, seed=99)
    solo = decoder.generate(newcomer, temperature=0, max_new_tokens=1).stats.time_to_first_token
    others = [
        threading.Thread(
            target=decoder.generate,
            args=(random_prompt(32, seed=i),),
            kwargs=dict(temperature=0, max_new_tokens=4 * n),
        )
        for i in range(7)
    ]
    for t in others:
        t.start()
    while decoder.engine.batch_size < 7:
        time.sleep(0.001)
    loaded = decoder.generate(newcomer, temperature=0, max_new_tokens=1).stats.time_to_first_token
    for t in others:
        t.join()
    plain = decoder.generate(prompt, temperature=0, max_new_tokens=n)
    spec_rows = ["| decoding | s | vs plain | acceptance | same tokens |", "|---|---|---|---|---|"]
    plain_s = time_it(lambda: decoder.generate(prompt, temperature=0, max_new_tokens=n))
    spec_rows.append(f"| plain | {plain_s:.2f} | 1.00x | - | True |")
    for k in (4, 8):
        start = time.perf_counter()
        out = decoder.generate(prompt, temperature=0, max_new_tokens=n, speculative_k=k)
        sync()
        seconds = time.perf_counter() - start
        spec_rows.append(
            f"| speculative k={k} (adaptive) | {seconds:.2f} | "
            f"{plain_s / seconds:.2f}x | {out.stats.acceptance_rate or 0:.2f} | "
            f"{out.token_ids == plain.token_ids} |"
        )
    compiled = compiled_rows(decoder, n, args.repeats)
    tiny = tiny_family(device_map=args.device)
    tiny_args = argparse.Namespace(tokens=48, prompt_tokens=16, repeats=args.repeats)
    overhead_table, _ = overhead_rows(tiny, tiny_args)
    write_section(
        f"gpu-{args.shapes}",
        [
            f"## GPU: {name}",
            "",
            f"`python benchmarks/gpu.py --shapes {args.shapes}`: bf16 random weights, Llama-7B-"
            f"shaped base + two Llama-1B-shaped small models ({args.shapes} shapes), {n} tokens, "
            "greedy.",
            "",
            "- EFT decode vs the sum of the three models' own cached decoding: "
            f"**{overhead:.2f}x**.",
            f"- Time to first token while 7 others decode: {loaded * 1e3:.0f} ms vs "
            f"{solo * 1e3:.0f} ms alone (**{loaded / solo:.2f}x**).",
            "",
            *rows,
            "",
            *spec_rows,
            "",
            "Engine overhead on tiny models (hidden 64, 2 layers, 32k vocabulary; "
            "`benchmarks/overhead.py`'s method on this device):",
            "",
            *overhead_table,
            "",
            "Eager vs compiled decode step (`EFTDecoder(compile=...)`, bucketed shapes):",
            "",
            *compiled,
            "",
        ],
    )


if __name__ == "__main__":
    main()
