"""README examples are executed, so the README cannot drift from the code."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md should show how to use the library"
    (tmp_path / "datasets").symlink_to(README.parent / "datasets")  # examples read the example data
    monkeypatch.chdir(tmp_path)  # and write to outputs/
    namespaces = []
    for block in blocks:
        namespaces.append({})
        exec(compile(block, str(README), "exec"), namespaces[-1])
    namespace = next(ns for ns in namespaces if "ids" in ns)
    # the token example produced what its comments promise
    assert tuple(namespace["ids"].shape) == (2, 8, 64)
    assert tuple(namespace["recon"].shape) == (2, 3, 128, 128)
    assert (tmp_path / "outputs/my_tokenizer/model.safetensors").exists()
