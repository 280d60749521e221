from __future__ import annotations

import pytest
import torch

from eft_integrations import Behavior, EFTDecoder

from .tiny_models import save_family

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def decoder(tiny_paths) -> EFTDecoder:
    """base + chat(chat - ref) + safe(safe - ref): two behaviors sharing one reference."""
    return EFTDecoder.from_pretrained(
        base=tiny_paths["base"],
        behaviors={
            "chat": Behavior(finetuned=tiny_paths["chat"], reference=tiny_paths["ref"]),
            "safe": (tiny_paths["safe"], tiny_paths["ref"]),
        },
        dtype=torch.float32,
    )
