"""What the benchmark scripts share: the realistic-shape random family and BENCHMARKS.md.

Each script owns one section of BENCHMARKS.md, between `<!-- section: NAME -->` markers, and
rewrites only that section, so the scripts can run separately and the file keeps them all.
"""

from __future__ import annotations

import inspect
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from eft_integrations import EFTDecoder

VOCAB = 32000
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
"""A chat template for the word-level tokenizer: messages joined by spaces."""
BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = [
    "# Benchmarks",
    "",
    "Each section is written by the script it names (`make bench` runs them all); ratios are "
    "measured side by side in one run, interleaved where it matters, median of repetitions. "
    "Absolute times depend on the machine; the ratios are the result.",
    "",
]


def random_llama(hidden: int, layers: int, heads: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(config).eval()


def word_level_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


def realistic_family(
    base_size: tuple[int, int, int] = (768, 12, 12),
    small_size: tuple[int, int, int] = (256, 4, 4),
    **decoder_kwargs,
) -> EFTDecoder:
    """A ~134M-parameter Llama base and two ~20M small models (chat and its reference) with
    random weights and a 32k vocabulary, loaded through `EFTDecoder.from_pretrained`.
    `base_size` and `small_size` are (hidden size, layers, heads)."""
    made = {
        "base": random_llama(*base_size, seed=0),
        "chat": random_llama(*small_size, seed=1),
        "ref": random_llama(*small_size, seed=2),
    }
    tokenizer = word_level_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in made.items():
            model.save_pretrained(Path(tmp) / name)
            tokenizer.save_pretrained(Path(tmp) / name)
        return EFTDecoder.from_pretrained(
            base=Path(tmp) / "base",
            behaviors={"chat": (Path(tmp) / "chat", Path(tmp) / "ref")},
            dtype=torch.float32,
            eos_token_ids=[],
            chat_template=PLAIN_TEMPLATE,
            **decoder_kwargs,
        )


def random_prompt(tokens: int, seed: int) -> list[int]:
    return torch.randint(
        1, VOCAB, (tokens,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


def params(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def time_it(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine(threads: int) -> str:
    return (
        f"{threads} torch threads, {platform.processor() or platform.machine()}, "
        f"{platform.system()}, torch {torch.__version__}, "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}"
    )


def write_section(name: str, lines: list[str], path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) section `name` of BENCHMARKS.md with `lines`."""
    text = path.read_text() if path.exists() else ""
    if not text.startswith("# Benchmarks"):
        text = "\n".join(HEADER) + "\n"
    begin, end = f"<!-- section: {name} -->", f"<!-- /section: {name} -->"
    block = "\n".join([begin, *lines, end])
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else text.rstrip("\n") + "\n\n" + block + "\n"
    )
    path.write_text(text)
    print("\n".join(lines))


@torch.inference_mode()
def bare_decode(model: torch.nn.Module, prompts: list[list[int]], tokens: int) -> float:
    """Seconds of a model's own cached greedy decode of `tokens` tokens per row, as bare
    forwards (a prefill, then one-token forwards over a `DynamicCache`, argmax on device):
    the least any decoder running this model must pay."""
    # the cache keyword as the engine passes it (transformers renamed it on some models)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.tensor(prompts, device=model.device)
    start = time.perf_counter()
    cache = DynamicCache()
    logits = model(input_ids=ids, use_cache=True, **{name: cache}).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(tokens - 1):
        out = model(input_ids=token, use_cache=True, **{name: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    if ids.is_cuda:
        torch.cuda.synchronize(ids.device)  # the forwards were only queued
    return time.perf_counter() - start
