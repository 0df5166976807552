"""notebooks/quickstart.ipynb runs top to bottom in a fresh kernel and draws its plot."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_runs_and_plots():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(os.path.abspath(NOTEBOOK))}},
    )
    client.execute()  # raises CellExecutionError naming the cell on any error

    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert all(c.execution_count is not None for c in code)

    plot_cells = [c for c in code if "plot" in c.metadata.get("tags", [])]
    assert len(plot_cells) == 1
    images = [o for o in plot_cells[0].outputs if "image/png" in o.get("data", {})]
    assert images, f"the plot cell produced no image: {plot_cells[0].outputs}"

    text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    assert "finish_reason: length" in text
    assert "Output tokens/s" in text
