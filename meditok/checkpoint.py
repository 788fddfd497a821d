"""Loading and saving MedITok weights from any source a user is likely to hold.

``load_meditok(source)`` accepts
  * the released bare state dict ``meditok_simple_v1.pth``;
  * a full training checkpoint (released ``meditok_ckpt_v1.pth`` or ours): the tokenizer weights are
    found wherever they are nested (e.g. ``ckpt['trainer']['model']`` with ``module.``/``core.``
    prefixes) by locating the ``encoder.pos_embed`` anchor;
  * this project's own files (``save_meditok``): a folder with ``model.safetensors`` + ``config.json``,
    a ``.safetensors`` file (config in its metadata) or a ``.pth``;
  * a Hugging Face Hub repo id (``hf-hub:org/name`` or ``org/name``), via huggingface_hub's cache.

``torch.load`` is only ever called with ``weights_only=True``. Models are built on the meta device
and the weights assigned (memory-mapped where possible), so loading ``large`` needs no extra copy.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .config import CONFIG_FILENAME, PRESETS, MedITokConfig, get_config

if TYPE_CHECKING:  # imported where a model is built: it pulls in timm, slow to import (see meditok/__init__.py)
    from .model import MedITok

RELEASED_HUB_REPO = "massaki75/meditok"
RELEASED_FILES = {
    "meditok_simple_v1.pth": "bare tokenizer state dict (1,186 tensors, ~697 M parameters, preset 'large')",
    "meditok_ckpt_v1.pth": "full training checkpoint (tokenizer nested under the trainer state)",
}
MODEL_FILENAME = "model.safetensors"
FORMAT_TAG = "meditok"
_ANCHOR = "encoder.pos_embed"  # present in every MedITok state dict, released or ours
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
HOW_TO_GET = (
    "Download it from https://huggingface.co/{repo}/tree/main into weights/ "
    "(e.g. `hf download {repo} meditok_simple_v1.pth --local-dir weights`), "
    "or see weights/README.md."
)


class CheckpointError(ValueError):
    """A checkpoint cannot be found, read or fitted to a MedITok model; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------
# Building

def build_meditok(preset: Union[str, MedITokConfig] = "large", *, device: Union[str, torch.device, None] = None,
                  empty: bool = False, **overrides: Any) -> MedITok:
    """Build a MedITok tokenizer from a preset name (``tiny``, ``small``, ``base``, ``large``) or a config.

    Args:
        preset: preset name or a ``MedITokConfig``.
        device: where to put the weights (default CPU).
        empty: build on the meta device (no memory, no initialisation) — for inspection or to load
            weights into with ``load_state_dict(..., assign=True)``.
        **overrides: config fields to change, e.g. ``img_size=512``.
    """
    from .model import MedITok

    cfg = preset.replace(**overrides) if isinstance(preset, MedITokConfig) else get_config(preset, **overrides)
    with torch.device("meta"):
        model = MedITok(cfg)
    if empty:
        return model
    # Materialise directly on the target device and initialise there (fast for `large` on a GPU).
    return model.to_empty(device=device if device is not None else "cpu").init_weights()


@functools.lru_cache(maxsize=None)
def _preset_shapes(preset: str) -> Dict[str, Tuple[int, ...]]:
    model = build_meditok(preset, empty=True)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def matching_presets(state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """Names of the presets whose parameter names and shapes equal those of ``state_dict``."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    return [p for p in PRESETS if _preset_shapes(p) == shapes]


@dataclass
class StateDictDiff:
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mis_shaped: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)  # key, ckpt, model

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mis_shaped)

    def describe(self, limit: int = 20) -> str:
        def clip(items: List[str]) -> str:
            more = f" … and {len(items) - limit} more" if len(items) > limit else ""
            return ", ".join(items[:limit]) + more
        lines = []
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): {clip(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): {clip(self.unexpected)}")
        if self.mis_shaped:
            items = [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.mis_shaped]
            lines.append(f"  shape mismatches ({len(items)}): {clip(items)}")
        return "\n".join(lines)


def diff_state_dict(model: MedITok, state_dict: Mapping[str, torch.Tensor]) -> StateDictDiff:
    """Compare a state dict (released naming) with what ``model`` expects."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    return StateDictDiff(
        missing=[k for k in expected if k not in got],
        unexpected=[k for k in got if k not in expected],
        mis_shaped=[(k, got[k], expected[k]) for k in expected if k in got and got[k] != expected[k]],
    )


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (hex) over every weight of the tokenizer: names, shapes and float32 bytes.

    Covers the whole model (ids depend on the encoder and codebooks, images decoded from ids on the
    decoder), so a generator is never silently decoded by a tokenizer other than its cache's. The
    quantizer's ``vocab_usage`` buffer is a running statistic, not a weight, and is left out. Values
    are hashed as float32 so the same weights loaded in bf16 or on another device agree.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.endswith("vocab_usage"):
            continue
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Reading

CONVERT_COMMAND = "python -m training.convert_checkpoint"


class UnsafeCheckpointError(CheckpointError):
    """A file that pickles Python objects beyond tensors and plain containers: refused, never run. An older
    checkpoint of this project is one (convert it once with :data:`CONVERT_COMMAND`), so callers that would set an
    unusable file aside leave this one where it is."""


def _refused_global(error: BaseException) -> str:
    """What torch's weights-only unpickler refused to build, in a few words (the rest of its message advises
    allow-listing or ``weights_only=False``, advice this project must never pass on)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    if found:
        return f"it would build {found.group(1)}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if line.startswith(("WeightsUnpickler error:", "Unsupported"))]
    return (useful or lines or [type(error).__name__])[0].replace("WeightsUnpickler error: ", "")[:200]


def safe_load(path: Union[str, os.PathLike], *, formats: Tuple[str, ...] = (), what: str = "checkpoint",
              mmap: bool = False) -> Any:
    """The one way this project reads a PyTorch file it did not write in this process: ``torch.load`` with
    ``weights_only=True`` (tensors, numbers, strings and plain containers; never a pickled object, so never
    code), onto the CPU. With ``formats``, the file must be a dict whose ``"format"`` is one of them.

    Every failure is a :class:`CheckpointError` whose message is one line naming the file and the fix: a
    missing or empty file, a damaged one, a file that pickles Python objects (refused, not run; an old
    checkpoint of this project is converted once with ``python -m training.convert_checkpoint``) and a
    file of another kind. ``mmap=True`` maps the file instead of reading it (large checkpoints)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such {what} file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the {what} file is empty (an interrupted download or save?)")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if not mmap or "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: refused: the file pickles Python objects beyond tensors and plain containers "
            f"({_refused_global(e)}), and this project never unpickles code. If you made it with an older version "
            f"of this project, convert it once with `{CONVERT_COMMAND} {path}`; otherwise re-save only its "
            f"tensors where it was made (e.g. `torch.save(ckpt['model'], 'weights.pth')`).") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch {what} ({first}); the file may be truncated or "
                              f"damaged: write or download it again") from None
    if formats:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        if not isinstance(obj, dict) or found not in formats:
            raise CheckpointError(f"{path}: not a {what} (its format is {found!r}, expected "
                                  f"{' or '.join(repr(f) for f in formats)})")
    return obj


def _read_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e}). Re-download or re-save it.") from e


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _find_tokenizer_state_dicts(obj: Any, path: str = "", depth: int = 0) -> List[Tuple[str, Dict[str, torch.Tensor]]]:
    """Every nested mapping that holds a MedITok state dict, with its location and prefixes stripped."""
    found = []
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        anchors = [k for k in tensors if k == _ANCHOR or k.endswith("." + _ANCHOR)]
        for anchor in anchors:
            prefix = anchor[: len(anchor) - len(_ANCHOR)]
            sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            # torch.compile wraps modules as `_orig_mod`; strip it wherever it appears.
            sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}
            found.append((path + (f"[{prefix!r}]" if prefix else ""), sd))
        if depth < 4:
            for k, v in obj.items():
                if isinstance(v, Mapping):
                    found += _find_tokenizer_state_dicts(v, f"{path}[{k!r}]", depth + 1)
    return found


def extract_tokenizer_state_dict(obj: Any, key: Optional[str] = None, source: str = "checkpoint"
                                 ) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """Find the tokenizer weights inside a loaded checkpoint object.

    Returns (state_dict with released parameter names, config dict if the checkpoint carries one).
    ``key`` picks a nested entry by dotted path (e.g. ``"ema"`` or ``"trainer.model"``) when a
    checkpoint holds more than one tokenizer.
    """
    config = None
    if isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping):
        config = dict(obj["config"])
    if key is not None:
        for part in key.split("."):
            if not isinstance(obj, Mapping) or part not in obj:
                raise CheckpointError(f"{source}: has no entry {key!r} (failed at {part!r}); "
                                      f"top-level keys: {list(obj)[:20] if isinstance(obj, Mapping) else type(obj)}")
            obj = obj[part]
    candidates = _find_tokenizer_state_dicts(obj)
    if not candidates:
        top = list(obj)[:20] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{source}: no MedITok weights found (no key ending in {_ANCHOR!r}; top level: {top}). "
                              f"Is this a MedITok checkpoint?")
    where, sd = candidates[0]
    if len(candidates) > 1:
        others = ", ".join(w or "<top level>" for w, _ in candidates[1:])
        warnings.warn(f"{source}: several tokenizer state dicts found; using {where or '<top level>'} "
                      f"(others: {others}). Pass key=... to choose.", stacklevel=3)
    return sd, config


def _resolve_hub(repo_id: str, filename: Optional[str], cache_dir: Optional[str]) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # pragma: no cover - huggingface_hub is a requirement
        raise CheckpointError("loading from the Hub needs `pip install huggingface_hub`") from e
    names = [filename] if filename else [MODEL_FILENAME, "meditok_simple_v1.pth"]
    errors = []
    for name in names:
        try:
            path = Path(hf_hub_download(repo_id, name, cache_dir=cache_dir))
            if name == MODEL_FILENAME:  # our layout: fetch the config beside it when present
                try:
                    hf_hub_download(repo_id, CONFIG_FILENAME, cache_dir=cache_dir)
                except Exception:
                    pass
            return path
        except Exception as e:  # offline, missing file, no network: try the next name, then explain
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    raise CheckpointError(
        f"Could not get MedITok weights from the Hub repo {repo_id!r}"
        f"{' (HF_HUB_OFFLINE is set and the file is not in the local cache)' if offline else ''}:\n  "
        + "\n  ".join(errors) + "\n" + HOW_TO_GET.format(repo=repo_id) + " Then pass the local path.")


# First path components that are this project's own folders, never Hub organisations.
_LOCAL_FOLDERS = {"runs", "outputs", "weights", "external", "datasets", "checkpoints", "configs"}


def looks_like_hub_id(text: str) -> bool:
    """The rule for a source without a prefix: ``org/name`` is a Hub repo id only when no such local path
    exists, it is not written like a path (``./x``, ``~/x``, ``/x``, ``x/y/z``, a file extension), its
    first component is not a local folder, and not one of this project's folders (``runs/``, ``weights/``,
    ``outputs/`` ...). ``hf-hub:org/name`` is always a Hub id; ``local-dir:path`` never is."""
    if not _HUB_ID.match(text) or text.endswith((".pth", ".pt", ".bin", ".safetensors")):
        return False
    first = text.split("/", 1)[0]
    return not Path(text).exists() and not Path(first).exists() and first not in _LOCAL_FOLDERS


def _locate(source: Union[str, os.PathLike], hub_filename: Optional[str], cache_dir: Optional[str]) -> Path:
    text = str(source)
    if text.startswith("hf-hub:"):
        return _resolve_hub(text[len("hf-hub:"):], hub_filename, cache_dir)
    if text.startswith("local-dir:"):
        text = text[len("local-dir:"):]
    elif looks_like_hub_id(text):
        return _resolve_hub(text, hub_filename, cache_dir)
    path = Path(text).expanduser()
    if path.exists():
        return path
    hint = " Check the path (a Hub repo id is written hf-hub:org/name)."
    if path.name in RELEASED_FILES:
        hint = f" It is the released {RELEASED_FILES[path.name]}. " + HOW_TO_GET.format(repo=RELEASED_HUB_REPO)
    raise CheckpointError(f"Checkpoint not found: no file or folder at {path.resolve()}.{hint}")


def _read(path: Path, key: Optional[str]) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """Read any supported file or folder → (state dict, config dict or None)."""
    if path.is_dir():
        if (path / MODEL_FILENAME).exists():
            sd, cfg = _read(path / MODEL_FILENAME, key)
            if (path / CONFIG_FILENAME).exists():
                cfg = json.loads((path / CONFIG_FILENAME).read_text())
            return sd, cfg
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".pth", ".pt", ".bin"))
        if len(files) != 1:
            raise CheckpointError(f"{path}: expected {MODEL_FILENAME} or exactly one .pth/.safetensors file, "
                                  f"found {[f.name for f in files] or 'none'}. Pass the file itself.")
        return _read(files[0], key)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (interrupted download or save?). Get it again.")
    if path.suffix == ".safetensors":
        sd, metadata = _read_safetensors(path)
        cfg = json.loads(metadata["config"]) if "config" in metadata else None
        sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}
        return sd, cfg
    obj = safe_load(path, mmap=True)
    return extract_tokenizer_state_dict(obj, key=key, source=str(path))


def load_meditok(source: Union[str, os.PathLike], preset: Optional[str] = None, *, img_size: Optional[int] = None,
                 device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
                 key: Optional[str] = None, hub_filename: Optional[str] = None, cache_dir: Optional[str] = None,
                 eval_mode: bool = True) -> MedITok:
    """Load a MedITok tokenizer from a file, folder or Hub repo id; strict, with explanatory errors.

    Args:
        source: path to ``.pth`` / ``.safetensors`` / a saved folder, or ``hf-hub:org/name`` / ``org/name``.
        preset: the preset to build. Default: the config stored with the checkpoint, else the preset
            whose parameter names and shapes match the weights.
        img_size: input resolution the model is meant for (informational; any multiple of 16 works).
        device, dtype: where and in which dtype to put the weights.
        key: dotted path to the tokenizer inside a checkpoint holding several (e.g. ``"ema"``).
        hub_filename: file to fetch from a Hub repo (default: ``model.safetensors``, then
            ``meditok_simple_v1.pth``).
        cache_dir: huggingface_hub cache folder (default: its usual cache).
        eval_mode: return the model in eval mode.

    Raises:
        CheckpointError: file missing/unreadable, or weights that do not fit; the message lists the
            missing, unexpected and mis-shaped keys and names a preset that would fit, if any.
    """
    path = _locate(source, hub_filename, cache_dir)
    state_dict, stored_cfg = _read(path, key)

    if preset is not None:
        cfg = get_config(preset)
    elif stored_cfg is not None:
        cfg = MedITokConfig.from_dict(stored_cfg)
    else:
        fits = matching_presets(state_dict)
        if not fits:
            raise CheckpointError(f"{path}: the weights match none of the presets {list(PRESETS)} and the file "
                                  f"carries no config. Pass preset=... to see what differs.")
        cfg = get_config(fits[0])
    if img_size is not None:
        cfg = cfg.replace(img_size=img_size)

    from .model import MedITok

    with torch.device("meta"):
        model = MedITok(cfg)
    diff = diff_state_dict(model, state_dict)
    if diff:
        fits = matching_presets(state_dict)
        hint = (f"The checkpoint's names and shapes match preset {fits[0]!r}: load it with preset={fits[0]!r} "
                f"(or leave preset unset to detect it)." if fits else
                "No preset matches these weights: they may come from another model, or a key was renamed.")
        raise CheckpointError(f"{path}: weights do not fit MedITok preset {cfg.preset!r}:\n{diff.describe()}\n{hint}")
    model.load_state_dict(state_dict, strict=True, assign=True)
    # assign=True keeps the checkpoint's dtypes; bring everything to one dtype/device.
    model = model.to(device=device, dtype=dtype if dtype is not None else torch.float32)
    return model.eval() if eval_mode else model


# --------------------------------------------------------------------------------------------------
# Saving

TEMP_SUFFIX = ".tmp"  # atomic_write's temp files are named ".<final name>.<random>.tmp"


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (setting it to read it back would,
    for a moment, apply to files other threads create)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Union[str, os.PathLike], write: Callable[[BinaryIO], None]) -> Path:
    """Write a file so that ``path`` only ever holds a complete version: ``write(f)`` fills a temp file in
    the same folder, which is fsynced and renamed over ``path`` (the folder is fsynced too, so the rename
    survives a power cut). A crash or kill mid-write leaves the previous file untouched and at most a
    ``.<name>.*.tmp`` file, which nothing reads. The file gets the permissions of a plain ``open`` (the
    umask decides), not the owner-only ones of the temp file, so collaborators can read checkpoints."""
    def fill(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)
    return atomic_write_via_path(path, fill)


def atomic_write_via_path(path: Union[str, os.PathLike], write: Callable[[str], None]) -> Path:
    """:func:`atomic_write` for writers that need a file name rather than a file object (a numpy memmap,
    ``safetensors.torch.save_file``): ``write(tmp_path)`` creates the temp file's contents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_meditok(model: MedITok, path: Union[str, os.PathLike]) -> Path:
    """Save weights + config so that ``load_meditok(path)`` rebuilds the same model with no other argument.

    ``path`` ending in ``.safetensors``: one file, config JSON in its metadata. Ending in ``.pth``/``.pt``:
    ``{'format', 'config', 'model'}`` (loadable with ``weights_only=True``). Anything else: a folder with
    ``model.safetensors`` and ``config.json``. Files are written atomically (temp file, fsync, rename).
    """
    path = Path(path)
    state_dict = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config_json = model.config.to_json()
    if path.suffix == ".safetensors":
        from safetensors.torch import save
        atomic_write(path, lambda f: f.write(save(state_dict, metadata={"format": FORMAT_TAG, "config": config_json})))
    elif path.suffix in (".pth", ".pt"):
        payload = {"format": FORMAT_TAG, "config": model.config.to_dict(), "model": state_dict}
        atomic_write(path, lambda f: torch.save(payload, f))
    else:
        save_meditok(model, path / MODEL_FILENAME)
        atomic_write(path / CONFIG_FILENAME, lambda f: f.write((config_json + "\n").encode()))
    return path
