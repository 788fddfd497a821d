"""Packaging: what `pip install .` / `pip install '.[data]'` promise is what the code imports, and
`import meditok` stays light (heavy modules are imported where they are used)."""
import ast
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _dist_name(requirement: str) -> str:
    """'pydicom>=3.0' → 'pydicom'; 'meditok[data]' → 'meditok' (PEP 503 normalised)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _third_party_imports(folder: Path, recursive: bool = False) -> dict:
    """Top-level names of every absolute import in ``folder``'s .py files (module level and inside functions,
    since a lazily imported module is as necessary as any), minus the standard library: {name: first file}."""
    found = {}
    for path in sorted(folder.rglob("*.py") if recursive else folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("meditok", "__future__"):
                    found.setdefault(top, path.name)
    return found


def _distributions_of(modules: dict) -> dict:
    """{module: distribution} through the installed distributions' top-level names."""
    owners = md.packages_distributions()
    missing = sorted(m for m in modules if m not in owners)
    assert not missing, f"modules imported by meditok that no installed distribution provides: {missing}"
    return {m: _dist_name(owners[m][0]) for m in modules}


def test_data_extra_lists_every_module_meditok_data_imports():
    project = _pyproject()
    declared = {_dist_name(r) for r in project["dependencies"]} | \
               {_dist_name(r) for r in project["optional-dependencies"]["data"]}
    modules = _third_party_imports(ROOT / "meditok" / "data", recursive=True)  # with meditok/data/readers
    assert {"pandas", "pydicom", "nibabel"} <= set(modules)  # the scan sees the readers' imports at all
    undeclared = {m: (d, modules[m]) for m, d in _distributions_of(modules).items() if d not in declared}
    assert not undeclared, (f"meditok.data imports modules whose distributions are in neither the core dependencies "
                            f"nor the [data] extra of pyproject.toml: {undeclared}")


def test_core_library_imports_only_core_dependencies():
    project = _pyproject()
    core = {_dist_name(r) for r in project["dependencies"]}
    modules = _third_party_imports(ROOT / "meditok")
    undeclared = {m: (d, modules[m]) for m, d in _distributions_of(modules).items() if d not in core}
    assert not undeclared, f"meditok/*.py imports modules outside the core dependencies of pyproject.toml: {undeclared}"


def _requirement_closure(names) -> set:
    """Distributions installed because of ``names`` (their requirements, recursively; extras ignored)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        todo += [_dist_name(r) for r in requires if "extra ==" not in r.replace("extra==", "extra ==")]
    return seen


# A None entry in sys.modules is how Python marks a module as not importable: `import pandas` raises
# ModuleNotFoundError and importlib.util.find_spec("pandas") returns None, as when it is not installed.
_BLOCKER = r"""
import json, sys
for name in json.loads(sys.argv[1]):
    sys.modules[name] = None
"""


def test_meditok_needs_only_core_dependencies_and_imports_lazily(tmp_path):
    """With every module of the [data]/[train] extras made unimportable (except those the core dependencies pull
    in themselves, e.g. torchvision through timm): `import meditok` and taking its loading functions imports
    neither timm, torchvision nor huggingface_hub (a CLI reports a bad argument at once; timm comes in when a
    model is built), and building, tokenizing, saving and loading back a tiny model works."""
    project = _pyproject()
    core = {_dist_name(r) for r in project["dependencies"]}
    extras = {_dist_name(r) for reqs in project["optional-dependencies"].values() for r in reqs} - {"meditok"}
    outside = extras - _requirement_closure(core)
    assert {"pandas", "pydicom"} <= outside
    blocked = sorted(m for m, dists in md.packages_distributions().items()
                     if any(_dist_name(d) in outside for d in dists))
    code = _BLOCKER + f"""
import meditok
from meditok import load_meditok, save_meditok, get_config, PRESETS, CheckpointError
heavy = [m for m in ("timm", "torchvision", "huggingface_hub") if m in sys.modules]
import torch
m = meditok.build_meditok("tiny").eval()
x = torch.rand(1, 3, 32, 32) * 2 - 1
with torch.no_grad():
    ids = m.img_to_idx(x)
save_meditok(m, {str(tmp_path / 'tok')!r})
back = load_meditok({str(tmp_path / 'tok')!r})
with torch.no_grad():
    same = torch.equal(back.img_to_idx(x), ids)
print(json.dumps({{"heavy_at_import": heavy, "timm_after_build": "timm" in sys.modules, "round_trip": same}}))
"""
    out = subprocess.run([sys.executable, "-c", code, json.dumps(blocked)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"heavy_at_import": [], "timm_after_build": True, "round_trip": True}


def test_lazy_names_are_the_modules_objects():
    import meditok
    from meditok import checkpoint, config, model
    assert meditok.load_meditok is checkpoint.load_meditok and meditok.MedITok is model.MedITok
    assert meditok.PRESETS is config.PRESETS
    assert set(meditok.__all__) <= set(dir(meditok))
    try:
        meditok.no_such_name
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("meditok.no_such_name did not raise AttributeError")
