"""Convert a checkpoint of an older version of this project into the safe format, once.

    python -m training.convert_checkpoint runs/vqa/stageB/ckpt-last.pth            # converted in place
    python -m training.convert_checkpoint OLD.pth --out NEW.pth

Older VQA training checkpoints (``ckpt-last.pth``) stored numpy's RNG state as a numpy array, which
``torch.load(weights_only=True)`` refuses, and this project never loads a file with ``weights_only=False``.
This command reads such a file through torch's weights-only unpickler with exactly numpy's array-rebuilding
classes allowed (plain data: ``ndarray``, ``dtype``, ``_reconstruct``; nothing that can run code), turns every
array into a tensor (RNG states into the layout of ``meditok.seeding.rng_state``), checks that the result
loads with ``meditok.safe_load``, and writes it atomically (the original is kept as ``<name>.orig`` when
converting in place). A file that needs anything else is refused by name, as by every loader.
"""
from __future__ import annotations

import argparse
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence

import numpy as np
import torch

import meditok
from meditok.checkpoint import CheckpointError, _refused_global


def numpy_data_classes() -> List[Any]:
    """numpy's classes an array and its dtype are rebuilt from when unpickled (data only). torch matches them by
    name, and numpy 2 moved ``numpy.core`` to ``numpy._core``: the array-rebuilding function is allowed under
    both names, so a file pickled under either numpy converts under either."""
    try:  # numpy 2
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    rebuild = multiarray._reconstruct
    classes: List[Any] = [(rebuild, f"{prefix}.multiarray._reconstruct") for prefix in ("numpy.core", "numpy._core")]
    return classes + [np.ndarray, np.dtype] + [type(np.dtype(code)) for code in ("u4", "i8", "i4", "f8", "f4", "u1",
                                                                               "bool")]


def _numpy_rng(state: Any) -> Any:
    """numpy's legacy state tuple ('MT19937', keys, pos, has_gauss, cached_gaussian) → meditok.seeding's layout."""
    if (isinstance(state, tuple) and len(state) == 5 and state[0] == "MT19937"
            and isinstance(state[1], np.ndarray)):
        return {"name": state[0], "keys": torch.from_numpy(state[1].astype(np.int64)), "pos": int(state[2]),
                "has_gauss": int(state[3]), "cached_gaussian": float(state[4])}
    return state


def _python_rng(state: Any) -> Any:
    """random.getstate()'s tuple (version, internal, gauss) → meditok.seeding's layout."""
    if isinstance(state, tuple) and len(state) == 3 and isinstance(state[1], tuple):
        return {"version": state[0], "internal": list(state[1]), "gauss": state[2]}
    return state


def to_safe(obj: Any) -> Any:
    """Arrays → tensors (numpy scalars → Python numbers), recursively; RNG dicts into meditok.seeding's layout."""
    if isinstance(obj, dict):
        out = {k: to_safe(v) for k, v in obj.items()}
        if "numpy" in out and "torch" in out and isinstance(out.get("torch"), torch.Tensor):  # an RNG state
            out["numpy"] = _numpy_rng(obj["numpy"])
            out["python"] = _python_rng(obj.get("python"))
        return out
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (list, tuple)):
        converted = [to_safe(v) for v in obj]
        return converted if isinstance(obj, list) else tuple(converted)
    return obj


def read_old(path: Path) -> Any:
    """``path`` through the weights-only unpickler with numpy's data classes allowed, and nothing else."""
    try:
        with torch.serialization.safe_globals(numpy_data_classes()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused: it pickles Python objects other than numpy arrays "
                              f"({_refused_global(e)}); it is not an old checkpoint of this project, and nothing "
                              f"in it was run") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch file ({str(e).splitlines()[0]})") from None


def convert(path: Path, out: Optional[Path] = None) -> Path:
    """Convert ``path`` and write it to ``out`` (default: in place, the original kept as ``<name>.orig``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    converted = to_safe(read_old(path))
    target = Path(out) if out is not None else path
    if target == path:
        backup = path.with_name(path.name + ".orig")
        if backup.exists():
            raise CheckpointError(f"{backup} exists already: convert with --out NEW.pth instead (nothing was changed)")
        shutil.copy2(path, backup)
    meditok.atomic_write(target, lambda f: torch.save(converted, f))
    meditok.safe_load(target, what="converted checkpoint")  # the point of converting: it now loads safely
    return target


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.convert_checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the old checkpoint file")
    parser.add_argument("--out", default=None, help="where to write the converted file (default: in place)")
    args = parser.parse_args(argv)
    try:
        target = convert(Path(args.checkpoint), Path(args.out) if args.out else None)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"[convert] {args.checkpoint} → {target} (loads with weights_only=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
