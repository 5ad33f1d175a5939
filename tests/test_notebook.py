"""examples/quickstart.ipynb runs top to bottom. It asserts itself that on real text
float < QoQ W4A8KV4 < RTN W4A8KV4 < 3x float in perplexity (the real model's end-to-end accuracy
check: QoQ quantization with a small calibration, the packed W4A8 path, the KV4 cache)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_quickstart_notebook_executes():
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "QoQ W4A8KV4" in outputs and "Paris" in outputs
