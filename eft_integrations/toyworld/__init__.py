"""The toy world: an embedded model family on which emulated fine-tuning is measurable offline.

Five tiny LlamaForCausalLM models share one tokenizer and a synthetic world of fictional
kingdoms: a small and a large base, small "helpful" and "harmless" chat fine-tunes of the small
base, and a large helpful chat model as the upper reference; the two small deltas also ship as
LoRA adapters on the small base. Up-scaling (large base + small chat - small base) answers in
the chat form with the large base's knowledge.

- `world`, `corpora`: the seeded world, its pre-training text and chat dialogues
- `tokenizer`: the family's byte-level BPE with its chat template
- `train`: `python -m eft_integrations.toyworld.train` reproduces the shipped weights
- `evaluate`: `python -m eft_integrations.toyworld.evaluate` scores models and EFT
- `demo`: `make demo` / `eft demo`
- `paths`: `model_dir(name)`, `adapter_dir(name)`, `load_decoder()` over the shipped family
  (`adapters=True`: the deltas as LoRA adapters), `DEFAULT_WEIGHTS`
"""

from .paths import (
    ADAPTER_NAMES,
    BEHAVIOURS,
    DEFAULT_WEIGHTS,
    FAMILY_NAMES,
    MODEL_NAMES,
    adapter_dir,
    default_weights,
    load_decoder,
    model_dir,
    weights_dir,
)

__all__ = [
    "ADAPTER_NAMES",
    "BEHAVIOURS",
    "DEFAULT_WEIGHTS",
    "FAMILY_NAMES",
    "MODEL_NAMES",
    "adapter_dir",
    "default_weights",
    "load_decoder",
    "model_dir",
    "weights_dir",
]
