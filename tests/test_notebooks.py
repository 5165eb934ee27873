"""The notebooks run as written (executed here with nbclient, small sizes, CPU) and are kept
in git without outputs."""

import glob
import os
import re

import nbformat
import pytest
from conftest import REPO
from nbclient import NotebookClient

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
# What each notebook shows when it runs: lines it prints, and how many plots it draws.
SHOWS = {
    "01_quickstart.ipynb": (["164,160 parameters", "'fsdp'", "def main("], 1),
    "02_convert_and_chat.ipynb": (["manifest verified", "max |llamax - transformers|", "->"], 0),
    "03_position_interpolation.ipynb": ([], 2),
    "04_lora_chat.ipynb": (["Velmor ->", "adapter_model.safetensors"], 0),
}


def test_expected_notebooks():
    names = [os.path.basename(p) for p in NOTEBOOKS]
    assert names == [
        "01_quickstart.ipynb", "02_convert_and_chat.ipynb", "03_position_interpolation.ipynb",
        "04_lora_chat.ipynb",
    ]  # fmt: skip


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_stripped_and_holds_no_library_code(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "outputs in git"
            assert not re.search(r"^\s*(def|class) ", cell.source, re.M), cell.source
    assert any("import llamax" in c.source for c in notebook.cells)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path):
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(path)}},
    )  # fmt: skip
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on failure
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "a cell did not run"
    outputs = [o for c in code for o in c.outputs]
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    plots = sum("image/png" in o.get("data", {}) for o in outputs)
    lines, figures = SHOWS[os.path.basename(path)]
    for line in lines:
        assert line in text, f"the notebook no longer shows {line!r}"
    assert plots >= figures
