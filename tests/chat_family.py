"""Tiny random chat models with room for tool prompts, shared by the chat and adapter tests.

The family of `tiny_models.save_family` has 96-128 position windows; tool listings and
structured-output instructions need more, so this one uses 4096 positions (the LlamaIndex
tests build it with 3072). Built once per process into a temporary folder and loaded back
through `from_pretrained`.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from eft_integrations import EFTDecoder

from .tiny_models import build_tokenizer, gpt2, llama

WINDOW = 4096

TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    'Call a tool as <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>\n{% endif %}'
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}"
    "{% if m.tool_calls is defined and m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>\n{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']}"
    " | tojson }}\n</tool_call>{% endfor %}{% endif %}<|end|>"
    "{% elif m['role'] == 'tool' %}<|user|><tool_response>\n{{ m['content'] }}\n"
    "</tool_response>"
    "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""A template with tool support in the Hermes / Qwen style (the tiny default has none)."""


@functools.lru_cache(maxsize=2)
def chat_family_paths(window: int = WINDOW, base_layers: int = 2) -> dict[str, str]:
    """base (Llama), chat and safe fine-tunes (Llama), one GPT-2 reference, every model with
    `window` positions; saved once per (window, base_layers)."""
    root = Path(tempfile.mkdtemp(prefix="eft-chat-family-"))
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    made = {
        "base": llama(vocab, seed=11, hidden=48, layers=base_layers, window=window),
        "chat": llama(vocab, seed=12, window=window),
        "safe": llama(vocab, seed=13, window=window),
        "ref": gpt2(vocab, seed=14, window=window),
    }
    paths = {}
    for name, model in made.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def from_pretrained_args(tools_template: bool = False, **family: int) -> dict:
    """Keyword arguments of `EFTDecoder.from_pretrained` for the family (`family`: the
    window and base_layers of `chat_family_paths`)."""
    paths = chat_family_paths(**family)
    args = {
        "base": paths["base"],
        "behaviors": {"chat": (paths["chat"], paths["ref"]), "safe": (paths["safe"], paths["ref"])},
        "dtype": torch.float32,
    }
    if tools_template:
        args["chat_template"] = TOOLS_TEMPLATE
    return args


@functools.lru_cache(maxsize=2)
def chat_decoder(tools_template: bool = False) -> EFTDecoder:
    """One shared decoder per template kind (loaded once per process)."""
    return EFTDecoder.from_pretrained(**from_pretrained_args(tools_template))
