"""Rebuild the cookbook notebooks from their scripts and execute them in place.

Each cookbook is a jupytext percent-format script `NN_name.py` (the source to edit and review)
paired with `NN_name.ipynb` (the same cells, executed, with outputs and figures, for GitHub to
render). This script writes every notebook from its script and runs it with nbclient in this
folder, so the figures land in `figures/`:

    python cookbooks/execute.py                  # all of them (`make cookbooks`)
    python cookbooks/execute.py 01 05            # the ones whose names start so

The tests (tests/test_cookbooks.py) check that each .ipynb holds its script's cells and
execute every notebook again.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def notebooks(prefixes: list[str] | None = None) -> list[Path]:
    """The cookbook scripts (`NN_name.py`), in order, optionally those starting so."""
    scripts = sorted(HERE.glob("[0-9][0-9]_*.py"))
    if prefixes:
        scripts = [s for s in scripts if any(s.name.startswith(p) for p in prefixes)]
    return scripts


def execute(script: Path, cwd: Path, timeout: int = 900) -> nbformat.NotebookNode:
    """The notebook of `script`, executed in `cwd` (a fresh python3 kernel)."""
    notebook = jupytext.read(script)
    for i, cell in enumerate(notebook.cells):
        cell.id = f"cell-{i}"  # stable ids: a rebuild changes only what the cells print
    NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},
    ).execute()
    return notebook


def main(argv: list[str]) -> None:
    for script in notebooks(argv):
        start = time.perf_counter()
        notebook = execute(script, HERE)
        nbformat.write(notebook, script.with_suffix(".ipynb"))
        print(f"{script.with_suffix('.ipynb').name}: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
