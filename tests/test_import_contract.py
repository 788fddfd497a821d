"""The import contract between our packages, read from the source with ``ast`` (nothing is imported).

Layers, bottom up: ``meditok`` (the tokenizer library) → ``training`` (what every trainer shares) → the
packages built on them (``tokenizer_training`` the tokenizer's training code, ``generation``, ``interpretation``,
``evaluation``, ``local_openclip``) → the entry points (``train.py``, ``scripts``, ``benchmarks``, ``demo.py``).
Loading a trained model never needs its trainer: samplers and evaluators import ``*/loading.py``
(``generation.diffusion.loading``, ``interpretation.loading``) or the model module, never a ``train*.py``.

Every rule's failure lists ``file:line  import`` for each offending import. Tests (``tests/``) drive the
trainers and the entry points, so rules (d) and (e) do not apply to them.
"""
from __future__ import annotations

import ast
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]

# our top-level packages and modules; anything else (torch, transformers, ...) is third-party
OURS = ("meditok", "training", "tokenizer_training", "local_openclip", "generation", "interpretation", "evaluation",
        "benchmarks", "scripts", "train", "demo")

# the trainers: a train*.py module is imported by nobody but itself, tests and the exceptions below
TRAINERS = ("generation.train_ar", "generation.diffusion.train", "interpretation.train", "train")

# (importing file, trainer module) → why it may import the trainer. Keep this short: anything a sampler,
# an evaluator or a library needs from a trainer belongs in a loading or model module instead.
TRAINER_EXCEPTIONS: Dict[Tuple[str, str], str] = {}


class Import(NamedTuple):
    file: str           # path relative to the repository root
    line: int
    text: str           # the statement as written (first line)
    targets: Tuple[str, ...]  # absolute dotted names it may bind: the module, and module.name for each name

    def __str__(self) -> str:
        return f"{self.file}:{self.line}  {self.text}"


def python_files() -> List[Path]:
    """Tracked .py files plus new ones git does not ignore (so a file is checked before its first commit)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.py"],
                             cwd=ROOT, capture_output=True, check=True, timeout=60).stdout.decode()
        names = sorted({n for n in out.split("\0") if n})
    except (OSError, subprocess.SubprocessError):  # no git (an unpacked archive): our packages, tests, top level
        names = sorted(str(p.relative_to(ROOT)) for top in (*OURS, "tests") for p in ROOT.glob(f"{top}/**/*.py"))
        names += sorted(p.name for p in ROOT.glob("*.py"))
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def module_name(rel: str) -> str:
    parts = list(Path(rel).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(node: ast.ImportFrom, rel: str) -> Optional[str]:
    """The absolute module of ``from <module> import ...`` in file ``rel`` (relative levels resolved)."""
    if not node.level:
        return node.module
    package = module_name(rel).split(".")
    if not rel.endswith("__init__.py"):
        package = package[:-1]  # a module's package; a package's __init__ is its own package
    if node.level - 1 > len(package) or (node.level - 1 == len(package) and not node.module):
        return None  # beyond the top level: Python refuses it too
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else [])) or None


def imports_of(path: Path) -> List[Import]:
    return imports_in(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())


def imports_in(source: str, rel: str) -> List[Import]:
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, filename=rel)):  # lazy imports inside functions count too
        if isinstance(node, ast.Import):
            targets = tuple(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = resolve(node, rel)
            if module is None:
                continue
            # ``from generation.diffusion import train`` imports the module generation.diffusion.train
            targets = (module,) + tuple(f"{module}.{alias.name}" for alias in node.names if alias.name != "*")
        else:
            continue
        found.append(Import(rel, node.lineno, lines[node.lineno - 1].strip(), targets))
    return sorted(found, key=lambda i: i.line)


@lru_cache(maxsize=None)
def all_imports() -> Tuple[Import, ...]:
    return tuple(imp for path in python_files() for imp in imports_of(path))


def top(name: str) -> str:
    return name.split(".")[0]


def is_within(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def in_dir(rel: str, *folders: str) -> bool:
    return any(rel.startswith(folder + "/") for folder in folders)


def ours(imp: Import) -> List[str]:
    return sorted({top(t) for t in imp.targets if top(t) in OURS})


def report(rule: str, offenders: Iterable[Import]) -> str:
    lines = sorted({str(imp) for imp in offenders})
    return f"{rule}; {len(lines)} offending import(s):\n  " + "\n  ".join(lines)


def test_the_scan_sees_the_packages_and_resolves_relative_imports():
    files = {imp.file for imp in all_imports()}
    for expected in ("meditok/__init__.py", "training/options.py", "generation/diffusion/train.py",
                     "interpretation/inference.py", "evaluation/diffusion.py", "train.py"):
        assert expected in files, f"{expected} not scanned (scanned {len(files)} files)"
    relative = ast.parse("from .loading import RUN_FILE\nfrom . import train\nfrom .. import meditok\n").body
    assert resolve(relative[0], "interpretation/inference.py") == "interpretation.loading"
    assert resolve(relative[1], "interpretation/inference.py") == "interpretation"  # + "interpretation.train"
    assert resolve(relative[0], "interpretation/__init__.py") == "interpretation.loading"
    assert resolve(relative[0], "generation/diffusion/sample.py") == "generation.diffusion.loading"
    assert resolve(relative[2], "generation/diffusion/sample.py") == "generation"  # + "generation.meditok"
    assert resolve(relative[2], "demo.py") is None
    sample = [imp for imp in all_imports() if imp.file == "interpretation/inference.py"]
    assert any("interpretation.loading" in imp.targets for imp in sample), sample


def rule_a(imports: Iterable[Import]) -> List[Import]:
    return [imp for imp in imports if in_dir(imp.file, "meditok") and set(ours(imp)) - {"meditok"}]


def rule_b(imports: Iterable[Import]) -> List[Import]:
    return [imp for imp in imports if in_dir(imp.file, "training") and set(ours(imp)) - {"meditok", "training"}]


def rule_c(imports: Iterable[Import]) -> List[Import]:
    return [imp for imp in imports if in_dir(imp.file, "generation", "interpretation", "evaluation")
            and {"tokenizer_training", "train"} & set(ours(imp))]


def rule_d(imports: Iterable[Import]) -> List[Import]:
    entry_points = ("scripts", "benchmarks", "demo")
    return [imp for imp in imports if not in_dir(imp.file, "tests")
            and any(t in entry_points and t != top(module_name(imp.file)) for t in ours(imp))]


def trainers_imported(imp: Import) -> List[str]:
    return [trainer for trainer in TRAINERS if any(is_within(t, trainer) for t in imp.targets)]


def rule_e(imports: Iterable[Import]) -> List[Import]:
    return [imp for imp in imports if not in_dir(imp.file, "tests")  # tests drive the trainers
            and any(module_name(imp.file) != trainer and (imp.file, trainer) not in TRAINER_EXCEPTIONS
                    for trainer in trainers_imported(imp))]


def test_each_rule_catches_what_it_forbids():
    """The rules on made-up files: each forbidden import is caught, each allowed one passes."""
    def scan(rel: str, source: str) -> List[Import]:
        return imports_in(source, rel)
    cases = [
        (rule_a, "meditok/models.py", "from training.options import UsageError", True),
        (rule_a, "meditok/models.py", "def f():\n    import local_openclip", True),  # lazy imports count
        (rule_a, "meditok/models.py", "from .config import PRESETS\nimport torch", False),
        (rule_b, "training/optim.py", "from generation.ar_model import ARGenerator", True),
        (rule_b, "training/optim.py", "from meditok import safe_load\nfrom .options import UsageError", False),
        (rule_c, "generation/sample.py", "from tokenizer_training.trainer import Trainer", True),
        (rule_c, "interpretation/model.py", "import train", True),
        (rule_c, "generation/sample.py", "from training.stopping import StopRequests", False),
        (rule_c, "evaluation/reconstruction.py", "from tokenizer_training.args import parse_args", True),
        (rule_d, "evaluation/report.py", "from benchmarks import loader_benchmark", True),
        (rule_d, "generation/sample.py", "import demo", True),
        (rule_d, "scripts/data/build_corpus.py", "from scripts.data import sources", False),  # its own package
        (rule_d, "tests/test_demo.py", "import demo", False),
        (rule_e, "interpretation/inference.py", "from .train import RUN_FILE", True),
        (rule_e, "interpretation/inference.py", "from . import train", True),
        (rule_e, "evaluation/diffusion.py", "from generation.diffusion import train", True),
        (rule_e, "evaluation/efficiency.py", "import train", True),
        (rule_e, "generation/sample.py", "from .train_ar import TrainConfig", True),
        (rule_e, "interpretation/inference.py", "from .loading import RUN_FILE", False),
        (rule_e, "evaluation/report.py", "import training.options", False),  # training is not train
        (rule_e, "generation/diffusion/sample.py", "from .sampler import sample", False),
        (rule_e, "tests/test_vqa_train.py", "from interpretation import train", False),
        (rule_e, "benchmarks/synthesis_benchmark.py", "from generation.train_ar import TrainConfig", True),
        (rule_e, "benchmarks/synthesis_benchmark.py", "from generation.ar_training import TrainConfig", False),
        (rule_e, "benchmarks/synthesis_benchmark.py", "from generation.diffusion.train import lr_at", True),
    ]
    for rule, rel, source, caught in cases:
        found = rule(scan(rel, source))
        assert bool(found) == caught, (rule.__name__, rel, source, found)
    message = report("(x) a rule", rule_e(scan("evaluation/diffusion.py", "import json\nimport train\n")))
    assert "evaluation/diffusion.py:2  import train" in message, message


def test_a_meditok_imports_nothing_of_ours():
    bad = rule_a(all_imports())
    assert not bad, report("(a) meditok/ (the tokenizer library) must import nothing of ours but meditok", bad)


def test_b_training_imports_only_meditok():
    bad = rule_b(all_imports())
    assert not bad, report("(b) training/ (shared by all trainers) may import only meditok of ours", bad)


def test_c_downstream_packages_do_not_import_the_tokenizer_trainer():
    bad = rule_c(all_imports())
    assert not bad, report("(c) generation/, interpretation/ and evaluation/ must not import tokenizer_training (the tokenizer's "
                           "training code) nor train (train.py)", bad)


def test_d_nothing_imports_scripts_benchmarks_or_demo():
    bad = rule_d(all_imports())
    assert not bad, report("(d) nothing imports scripts, benchmarks or demo (entry points; only they themselves "
                           "and tests may)", bad)


def test_e_nobody_imports_a_trainer():
    bad = rule_e(all_imports())
    assert not bad, report(f"(e) no module imports a trainer {TRAINERS} (load through a loading or model module "
                           f"instead, or list the import in TRAINER_EXCEPTIONS with the reason)", bad)


def test_e_every_listed_exception_is_still_needed():
    used = {(imp.file, trainer) for imp in all_imports() for trainer in trainers_imported(imp)}
    stale = sorted(set(TRAINER_EXCEPTIONS) - used)
    assert not stale, f"TRAINER_EXCEPTIONS lists imports that no longer exist; remove them: {stale}"
