"""One protocol for every kind of generator over MedITok tokens, and a registry of the kinds.

A *kind* is one family of generator (the autoregressive :mod:`generation.ar_model`, the joint image–report
diffusion :mod:`generation.diffusion.model`): its settings dataclass, how to build, train (loss), sample,
save and load a model, and how to recognise its checkpoints. Evaluators that only need class-conditional
images (``evaluation.synthesis``, paper Table 3) go through this protocol, so one evaluator serves every
kind::

    from generation.generators import generator_for_checkpoint
    kind = generator_for_checkpoint("runs/x/generator.pth")         # detected from the checkpoint's format
    model, info = kind.load("runs/x/generator.pth", device="cuda")   # info["label_names"], info["token_cache"]
    ids = kind.sample(model, torch.tensor([0, 0, 1]), seed=0)        # [3, 8, h·w] image token ids

The adapters here are thin: model, loss, sampler and checkpoint code stay in their own modules
(``ar``: :class:`~generation.ar_model.ARGenerator`, :func:`~generation.sample.generate`,
:func:`~generation.ar_model.load_generator`; ``diffusion``: :class:`~generation.diffusion.model.JointDiffusionTransformer`,
:func:`~generation.diffusion.masking.diffusion_loss`, :func:`~generation.diffusion.sampler.sample`,
:func:`~generation.diffusion.loading.load_for_inference`). Checkpoints are each kind's existing format.

**Labels of the diffusion model.** The joint model is conditioned on a modality label (its
``condition_names``; index ``len(condition_names)`` is the null label) *and* on report text. A label-indexed
image is its label-only task: :func:`~generation.diffusion.sampler.sample` with ``task="joint"`` (text and
image both start fully masked, the label is the only condition; the report it writes alongside is dropped).
No caption is made up from the label. Classifier-free guidance then contrasts the label with the null label
(the sampler's unconditional branch of the joint task), as the AR sampler does.

A new kind: a class with the members of :class:`Generator`, decorated with ``@register_generator("name")``
(see CONTRIBUTING.md and tests/test_generator_registry.py).
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Tuple, Type, Union, runtime_checkable

import torch
import torch.nn as nn

PathLike = Union[str, Path]


class UnknownGeneratorError(ValueError):
    """A generator kind or checkpoint format that no registered kind knows; the message lists the known kinds."""


@runtime_checkable
class Generator(Protocol):
    """What every generator kind provides (members of the adapter object, not of the model).

    * ``name``: the registry key (``ar``, ``diffusion``); ``description``: one phrase for reports;
      ``formats``: the checkpoint ``"format"`` strings it reads.
    * ``config_class``: its dataclass of model settings; ``make_config(preset, **overrides)`` one of its presets.
    * ``build(config)`` → a new ``nn.Module``.
    * ``loss(model, batch, **options)`` → (scalar loss tensor with grad, logs ``{name: float}``); ``batch`` has
      ``"ids"`` (image token ids [B, 8, L]), ``"labels"`` [B] and, for kinds that model text, ``"text_ids"``.
    * ``sample(model, labels, *, temperature, top_k, top_p, cfg_scale, generator, seed, amp_dtype, **options)``
      → image ids [B, 8, L] int64 in [0, codebook_size), one image per label index (the null label = unconditional).
      Draws come from ``generator`` (a ``torch.Generator`` on the model's device) or, without one, a new one
      seeded with ``seed``; the same seed gives the same ids.
    * ``save(model, path, **extra)`` / ``load(path, device)`` → (model in eval mode, info). ``info`` holds the
      checkpoint's metadata plus ``kind``, ``label_names`` and ``token_cache`` (``tokenizer_source``,
      ``tokenizer_fingerprint``: what :func:`generation.sample.load_decoder` needs to decode the ids).
    * ``detect(payload_or_path)`` → whether a checkpoint (its loaded dict, or its path) is of this kind.
    * ``describe_sampling(**settings)`` → the effective sampling settings, for reports.
    """

    name: str
    description: str
    formats: Tuple[str, ...]

    @property
    def config_class(self) -> Type: ...

    def make_config(self, preset: str, **overrides: Any) -> Any: ...

    def build(self, config: Any) -> nn.Module: ...

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor], **options: Any
             ) -> Tuple[torch.Tensor, Dict[str, float]]: ...

    def sample(self, model: nn.Module, labels: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, cfg_scale: Optional[float] = None, generator: Optional[torch.Generator] = None,
               seed: Optional[int] = None, amp_dtype: Optional[torch.dtype] = None, **options: Any) -> torch.Tensor: ...

    def save(self, model: nn.Module, path: PathLike, **extra: Any) -> Path: ...

    def load(self, path: PathLike, device: Union[str, torch.device] = "cpu") -> Tuple[nn.Module, Dict[str, Any]]: ...

    def detect(self, payload_or_path: Union[Mapping[str, Any], PathLike]) -> bool: ...

    def describe_sampling(self, **settings: Any) -> Dict[str, Any]: ...


GENERATORS: Dict[str, Generator] = {}


def register_generator(name: str) -> Callable[[type], type]:
    """Class decorator: instantiate the adapter class and register it under ``name`` (its ``name`` is set)."""
    def decorate(cls: type) -> type:
        if name in GENERATORS:
            raise ValueError(f"generator kind {name!r} is registered twice")
        adapter = cls()
        adapter.name = name
        missing = [m for m in ("config_class", "make_config", "build", "loss", "sample", "save", "load", "detect",
                               "describe_sampling", "description", "formats") if not hasattr(adapter, m)]
        if missing:
            raise TypeError(f"generator kind {name!r} ({cls.__name__}) lacks {missing} of the Generator protocol")
        GENERATORS[name] = adapter
        return cls
    return decorate


def known_kinds() -> str:
    """``ar (format 'meditok-ar-generator-v1'), diffusion (...)``: for error messages."""
    return ", ".join(f"{name} (format {' or '.join(repr(f) for f in kind.formats)})" for name, kind in GENERATORS.items())


def generator_for(name: str) -> Generator:
    """The registered kind called ``name``; an :class:`UnknownGeneratorError` listing the known kinds otherwise."""
    try:
        return GENERATORS[name]
    except KeyError:
        raise UnknownGeneratorError(f"unknown generator kind {name!r}; known kinds: {known_kinds()}") from None


def generator_for_checkpoint(path: PathLike) -> Generator:
    """The kind whose checkpoint format ``path`` has (the file is read once, memory-mapped).

    Raises FileNotFoundError (no file), :class:`meditok.CheckpointError` (unreadable) or
    :class:`UnknownGeneratorError` (a checkpoint of no registered kind; the message lists the known kinds)."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder: pass a checkpoint file, or name the kind of a run folder that "
                                f"its loader reads (e.g. --kind diffusion); known kinds: {known_kinds()}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: generator checkpoint not found")
    payload = _read_payload(path)
    for kind in GENERATORS.values():
        if kind.detect(payload):
            return kind
    found = payload.get("format") if isinstance(payload, Mapping) else type(payload).__name__
    raise UnknownGeneratorError(f"{path}: not a checkpoint of a known generator kind (its format is {found!r}); "
                                f"known kinds: {known_kinds()}")


def _read_payload(path: Path) -> Any:
    from meditok import safe_load

    return safe_load(path, what="generator checkpoint", mmap=True)


def _format_of(payload_or_path: Union[Mapping[str, Any], PathLike]) -> Tuple[Optional[str], Any]:
    payload = payload_or_path if isinstance(payload_or_path, Mapping) else _read_payload(Path(payload_or_path))
    return (payload.get("format") if isinstance(payload, Mapping) else None), payload


def torch_generator(generator: Optional[torch.Generator], seed: Optional[int], device: torch.device
                    ) -> Optional[torch.Generator]:
    """``generator`` if given, else a new one on ``device`` seeded with ``seed`` (None without a seed)."""
    if generator is not None or seed is None:
        return generator
    return torch.Generator(device=device).manual_seed(int(seed))


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def sample_ids(kind: Generator, model: nn.Module, labels: torch.Tensor, *, batch_size: int = 64, seed: int = 0,
               progress: bool = False, **settings: Any) -> Tuple[torch.Tensor, float]:
    """Image ids [N, 8, L] (CPU) for ``labels`` [N], ``batch_size`` at a time, all draws from one ``torch.Generator``
    seeded with ``seed`` on the model's device (for ``ar``: the ids :func:`generation.sample.run_sampling` makes);
    returns (ids, seconds spent sampling)."""
    from tqdm import tqdm

    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    chunks, seconds = [], 0.0
    for start in tqdm(range(0, len(labels), batch_size), desc="sampling", unit="batch", disable=not progress):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        chunks.append(kind.sample(model, labels[start:start + batch_size], generator=generator, **settings).cpu())
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - began
    return torch.cat(chunks), seconds


# --------------------------------------------------------------------------------------------------
# ar: generation.ar_model + generation.sample

@register_generator("ar")
class ARKind:
    """Adapter of the autoregressive generator (LlamaGen-style, :mod:`generation.ar_model`)."""

    name = "ar"
    description = "AR (generation.ar_model)"

    @property
    def formats(self) -> Tuple[str, ...]:
        from generation.ar_model import GENERATOR_FORMAT
        return (GENERATOR_FORMAT,)

    @property
    def config_class(self) -> Type:
        from generation.ar_model import ARConfig
        return ARConfig

    def make_config(self, preset: str, **overrides: Any):
        from generation.ar_model import get_ar_config
        return get_ar_config(preset, **overrides)

    def build(self, config) -> nn.Module:
        from generation.ar_model import build_generator
        return build_generator(config)

    def loss(self, model, batch: Mapping[str, torch.Tensor], **options: Any) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Mean cross-entropy per code (:meth:`ARGenerator.loss`); in training mode the labels are dropped to the
        null label with the model's class-dropout probability (as the trainer does; ``uniform`` may be given)."""
        ids, labels = batch["ids"], batch["labels"]
        if model.training:
            labels = model.condition.drop_labels(labels, **options)
        loss = model.loss(ids, labels)
        return loss, {"loss": float(loss.detach())}

    def sample(self, model, labels: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               cfg_scale: Optional[float] = None, generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
               amp_dtype: Optional[torch.dtype] = None, use_cache: bool = True, **options: Any) -> torch.Tensor:
        from generation.sample import generate

        if options:
            raise TypeError(f"the ar generator takes no sampling option(s) {sorted(options)}")
        generator = torch_generator(generator, seed, model.rope_cos.device)
        return generate(model, labels, temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                        generator=generator, use_cache=use_cache, amp_dtype=amp_dtype)

    def save(self, model, path: PathLike, **extra: Any) -> Path:
        """The trainer's ``generator.pth`` format (:func:`generator_payload`; ``extra`` e.g. ``label_names``,
        ``token_cache``), written atomically with its ``.sha256``."""
        from generation.ar_model import generator_payload
        from training.checkpoint_files import atomic_torch_save

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(generator_payload(model, **extra), path)
        return path

    def load(self, path: PathLike, device: Union[str, torch.device] = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
        """:func:`load_generator` (EMA weights when saved); ``label_names`` default to "0", "1", ..."""
        from generation.ar_model import load_generator

        model, info = load_generator(path, device=device)
        names = info.get("label_names") or [str(i) for i in range(model.config.num_labels)]
        return model, {**info, "kind": self.name, "label_names": list(names), "token_cache": info.get("token_cache") or {}}

    def detect(self, payload_or_path) -> bool:
        return _format_of(payload_or_path)[0] in self.formats

    def describe_sampling(self, **settings: Any) -> Dict[str, Any]:
        return {"temperature": settings.get("temperature", 1.0), "top_k": settings.get("top_k", 0),
                "top_p": settings.get("top_p", 1.0), "cfg_scale": settings.get("cfg_scale")}


# --------------------------------------------------------------------------------------------------
# diffusion: generation.diffusion.{model, masking, sampler, loading}

@register_generator("diffusion")
class DiffusionKind:
    """Adapter of the joint image–report masked diffusion (:mod:`generation.diffusion.model`): label-indexed
    images come from its ``joint`` task (label the only condition; see the module docstring)."""

    name = "diffusion"
    description = "joint diffusion (generation.diffusion.model)"
    task = "joint"

    @property
    def formats(self) -> Tuple[str, ...]:
        from generation.diffusion.loading import CHECKPOINT_FORMAT
        return (CHECKPOINT_FORMAT,)

    @property
    def config_class(self) -> Type:
        from generation.diffusion.model import DiffusionConfig
        return DiffusionConfig

    def make_config(self, preset: str, **overrides: Any):
        from generation.diffusion.model import get_config
        return get_config(preset, **overrides)

    def build(self, config) -> nn.Module:
        from generation.diffusion.model import build_model
        return build_model(config)

    def loss(self, model, batch: Mapping[str, torch.Tensor], *, schedule: str = "loglinear", text_weight: float = 1.0,
             generator: Optional[torch.Generator] = None, **options: Any) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The ELBO-weighted masked loss (:func:`diffusion_loss`) over ``batch["text_ids"]`` and ``batch["ids"]``;
        ``options`` (``mix``, ``t_min``) go to it. Label dropout is the model's own, in training mode."""
        from generation.diffusion.masking import MaskSchedule, diffusion_loss

        if "text_ids" not in batch:
            raise ValueError("the diffusion generator's loss needs batch['text_ids'] [B, Lt] (report tokens) "
                             "besides batch['ids'] and batch['labels']")
        parts = diffusion_loss(model, batch["text_ids"], batch["ids"], batch["labels"], MaskSchedule(schedule),
                               text_weight=text_weight, generator=generator, **options)
        return parts["loss"], {k: float(v.detach()) for k, v in parts.items()}

    def sample(self, model, labels: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               cfg_scale: Optional[float] = None, generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
               amp_dtype: Optional[torch.dtype] = None, steps: int = 16, method: str = "confidence",
               schedule: str = "loglinear", **options: Any) -> torch.Tensor:
        """Image ids of the ``joint`` task (:func:`generation.diffusion.sampler.sample`), ``steps`` unmasking steps."""
        from generation.diffusion.sampler import SamplerOptions, sample

        if options:
            raise TypeError(f"the diffusion generator takes no sampling option(s) {sorted(options)}")
        device = model_device(model)
        labels = labels.to(device)
        null = model.null_label
        if labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be an int tensor [B], got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > null):
            raise ValueError(f"label value(s) outside 0..{null - 1} (and {null} = null label); the model was trained "
                             f"with the labels {list(model.config.condition_names)}")
        sampler_options = SamplerOptions(steps=steps, method=method, temperature=temperature, cfg_scale=cfg_scale,
                                         schedule=schedule, top_k=top_k, top_p=top_p)
        generator = torch_generator(generator, seed, device)
        autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext())
        with autocast:
            _, image_ids = sample(model, task=self.task, labels=labels.long(), options=sampler_options,
                                  generator=generator)
        return image_ids

    def save(self, model, path: PathLike, **extra: Any) -> Path:
        """The trainer's checkpoint format (``format``, ``diffusion_config``, ``model``; ``extra`` e.g.
        ``tokenizer_fingerprint``, ``args``), without an optimiser state; written atomically with its ``.sha256``."""
        from generation.diffusion.loading import CHECKPOINT_FORMAT
        from training.checkpoint_files import atomic_torch_save

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": CHECKPOINT_FORMAT, "diffusion_config": model.config.to_dict(),
                   "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}
        atomic_torch_save(payload, path)
        return path

    def load(self, path: PathLike, device: Union[str, torch.device] = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
        """:func:`load_for_inference` (a checkpoint file, or a run folder: its newest usable checkpoint); ``info``
        adds ``text_codec`` and the decoding tokenizer (``token_cache``: the checkpoint's ``token_cache`` if any, else
        its run's ``--meditok`` or the tokenizer of its ``--cache``)."""
        from generation.diffusion.loading import load_for_inference

        model, codec, payload = load_for_inference(path, device)
        info = {k: v for k, v in payload.items() if k not in ("model", "optimizer", "ema")}
        return model, {**info, "kind": self.name, "label_names": list(model.config.condition_names),
                       "text_codec": codec, "token_cache": self._token_cache(payload)}

    @staticmethod
    def _token_cache(payload: Mapping[str, Any]) -> Dict[str, Any]:
        described = payload.get("token_cache")
        if isinstance(described, Mapping) and described.get("tokenizer_source"):
            return dict(described)
        args = payload.get("args") if isinstance(payload.get("args"), Mapping) else {}
        source, cache_path, img_size = args.get("meditok"), args.get("cache"), None
        if cache_path:
            from generation.token_cache import TokenCache

            try:
                cache = TokenCache(cache_path)
                source, img_size = source or cache.manifest.get("tokenizer_source"), cache.img_size
            except (ValueError, OSError):  # the training cache is gone: pass --tokenizer to decode
                pass
        return {"path": cache_path, "tokenizer_source": source, "img_size": img_size,
                "tokenizer_fingerprint": payload.get("tokenizer_fingerprint")}

    def detect(self, payload_or_path) -> bool:
        found, payload = _format_of(payload_or_path)
        return found in self.formats and "diffusion_config" in payload

    def describe_sampling(self, **settings: Any) -> Dict[str, Any]:
        from dataclasses import asdict

        from generation.diffusion.sampler import SamplerOptions

        names = ("steps", "method", "temperature", "cfg_scale", "schedule", "top_k", "top_p")
        return {"task": self.task, **asdict(SamplerOptions(**{k: v for k, v in settings.items() if k in names}))}


__all__ = ["GENERATORS", "Generator", "UnknownGeneratorError", "generator_for", "generator_for_checkpoint",
           "known_kinds", "register_generator", "sample_ids", "torch_generator"]
