"""demo.ipynb executed by a real Jupyter kernel (nbclient + ipykernel), as a user runs it: every cell runs and the
summary figure is displayed inline (an image/png output), not only written to disk."""
import os
from pathlib import Path

import pytest
import torch

import meditok

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]


def test_notebook_runs_in_a_kernel_and_shows_the_summary(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ckpt = meditok.save_meditok(meditok.build_meditok("tiny", img_size=64), tmp_path / "tok")
    # the kernel inherits this environment: the repository importable, the checkpoint, and no forced backend
    monkeypatch.setenv("MEDITOK_DEMO_CHECKPOINT", str(ckpt))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    (tmp_path / "datasets").symlink_to(ROOT / "datasets")
    notebook = nbformat.read(ROOT / "demo.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "no figure was displayed inline"
    assert (tmp_path / "outputs/demo_notebook/summary.png").is_file()
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "token ids: (1, 8, 16)" in text
