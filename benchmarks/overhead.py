"""The engine's own cost where model compute is negligible. Writes BENCHMARKS.md.

Three tiny random Llamas (a 32k vocabulary, so composing and sampling over the vocabulary is
real work, and bodies small enough that their forwards cost little: the regime a GPU is in for
small batches) decode greedily through `EFTDecoder.generate`, at batch 1 and 16. Measured side
by side, interleaved, median of repetitions:

- EFT step: one decode step of the engine (three models, composition, sampling, text, stops),
  from the requests' own timings (total time minus time to first token, per token after it);
- bare forwards: the same three models' cached one-token forwards at the same batch size,
  summed (what any EFT implementation must pay);
- host reads per step: device-to-host reads (`item`, `tolist`, `cpu`, `numpy`, truth tests of
  tensors) counted during the decode, per step, split by whose code made them: the engine's,
  or transformers' inside the model forwards (its SDPA mask check on a padding mask reads
  the mask once per forward); on a GPU each is a synchronisation.

Target: EFT step <= 1.3x the bare forwards at batch 1 and 16; host reads per step: 1.
Run: `python benchmarks/overhead.py [--tokens 48 --repeats 5 --threads 2]`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import bare_decode, machine, random_prompt, realistic_family, write_section
from eft_integrations import EFTDecoder

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def counting_host_reads() -> Iterator[collections.Counter[str]]:
    """Count calls of the tensor methods that read device memory from the host, by whose
    code made them: the engine's own (`eft_integrations`) or the models' (transformers)."""
    counts: collections.Counter[str] = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            counts["engine" if f"{os.sep}eft_integrations{os.sep}" in caller else "models"] += 1
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def eft_step_seconds(decoder: EFTDecoder, prompts: list[list[int]], tokens: int) -> float:
    """Seconds per decode step after the first token, from the requests' own timings."""
    results = decoder.generate(prompts, temperature=0, max_new_tokens=tokens)
    stats = results[0].stats
    return (stats.total_time - stats.time_to_first_token) / (tokens - 1)


def bare_step_seconds(models: list, prompts: list[list[int]], tokens: int) -> float:
    """Seconds per decode step of the models' own cached forwards, summed over models."""
    decode = sum(bare_decode(m, prompts, tokens) for m in models)
    prefill = sum(bare_decode(m, prompts, 1) for m in models)
    return (decode - prefill) / (tokens - 1)


def host_reads_per_step(
    decoder: EFTDecoder, prompts: list[list[int]], tokens: int
) -> tuple[float, float]:
    """(the engine's own host reads per step, the models' forwards' own per step)."""
    decoder.generate(prompts, temperature=0, max_new_tokens=2)  # the engine thread is up
    with counting_host_reads() as counts:
        decoder.generate(prompts, temperature=0, max_new_tokens=tokens)
    return counts["engine"] / tokens, counts["models"] / tokens


def overhead_rows(decoder: EFTDecoder, args: argparse.Namespace) -> tuple[list[str], dict]:
    models = decoder._models
    rows = [
        "| batch | EFT step ms | bare forwards ms | EFT / bare | host reads per step: engine "
        "| host reads per step: inside the models' forwards |",
        "|---|---|---|---|---|---|",
    ]
    ratios = {}
    for batch in (1, 16):
        prompts = [random_prompt(args.prompt_tokens, seed=i) for i in range(batch)]
        eft_step_seconds(decoder, prompts, 4)  # warm-up
        bare_step_seconds(models, prompts, 4)
        eft, bare, ratio = [], [], []
        for _ in range(args.repeats):  # interleaved: load drifts hit both
            eft.append(eft_step_seconds(decoder, prompts, args.tokens))
            bare.append(bare_step_seconds(models, prompts, args.tokens))
            ratio.append(eft[-1] / bare[-1])
        reads, model_reads = host_reads_per_step(decoder, prompts, args.tokens)
        ratios[batch] = (statistics.median(ratio), reads)
        rows.append(
            f"| {batch} | {statistics.median(eft) * 1e3:.2f} | "
            f"{statistics.median(bare) * 1e3:.2f} | {ratios[batch][0]:.2f}x | {reads:.1f} "
            f"| {model_reads:.1f} |"
        )
    return rows, ratios


def tiny_family(**decoder_kwargs) -> EFTDecoder:
    """Three distinct tiny Llamas (hidden 64, 2 layers) over the 32k word-level vocabulary;
    `decoder_kwargs` go to `from_pretrained` (e.g. `device_map="cuda"`)."""
    return realistic_family(base_size=(64, 2, 2), small_size=(64, 2, 2), **decoder_kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    decoder = tiny_family()
    rows, ratios = overhead_rows(decoder, args)
    met = lambda ok: "met" if ok else "missed"  # noqa: E731
    write_section(
        "overhead",
        [
            "## Engine overhead (tiny models)",
            "",
            f"`python benchmarks/overhead.py --threads {args.threads}`: three distinct tiny "
            f"random Llamas (hidden 64, 2 layers, 32k vocabulary), greedy, "
            f"{args.prompt_tokens}-token prompts, {args.tokens} new tokens, median of "
            f"{args.repeats}; {machine(args.threads)}.",
            "",
            *rows,
            "",
            *(
                f"- batch {b}: EFT step {r:.2f}x the bare forwards (target <= 1.3x: "
                f"{met(r <= 1.3)}); the engine's own host reads per step: {reads:.1f} (goal 1: "
                f"{met(reads <= 1.0)})."
                for b, (r, reads) in ratios.items()
            ),
            "",
        ],
    )


if __name__ == "__main__":
    main()
