"""The Colab TPU notebook runs end to end on CPU in its tiny mode (so it cannot silently rot)."""

import os

import nbformat
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "ism_colab_tpu.ipynb")
REPO = os.path.join(os.path.dirname(__file__), "..")


def _with_parameters(notebook, **values):
  cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "the notebook needs exactly one cell tagged 'parameters'"
  cells[0].source += "\n" + "\n".join(f"{name} = {value!r}" for name, value in values.items())
  return notebook


def test_notebook_runs_in_tiny_mode(tmp_path):
  notebook = _with_parameters(nbformat.read(NOTEBOOK, as_version=4), TINY=True, INSTALL=False,
                              WORKDIR=str(tmp_path / "run"), DATA_DIR=str(tmp_path / "data"))
  env_before = os.environ.get("XLA_FLAGS")
  os.environ["XLA_FLAGS"] = ""  # the kernel is a fresh process: one CPU device, like a Colab runtime
  try:
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.abspath(REPO)}}).execute()
  finally:
    if env_before is None:
      os.environ.pop("XLA_FLAGS", None)
    else:
      os.environ["XLA_FLAGS"] = env_before
  text = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []))
  assert "backend: cpu" in text
  assert "step 12/12" in text
  assert "round 6:" in text and "time to first token" in text
  images = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            if "image/png" in out.get("data", {})]
  assert len(images) == 3  # the masks, the loss curve, time to first token per round
