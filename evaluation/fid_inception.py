"""The standard FID network (pytorch-fid's InceptionV3, pool3 features) with its weights from a local file.

pytorch-fid builds its network and then downloads ``pt_inception-2015-12-05-6726825d.pth`` (the
TensorFlow FID Inception ported to PyTorch). We never download at run time: the same network is built
with pytorch-fid's own classes, and the state dict is read from ``external/`` with
``torch.load(weights_only=True)``. The suffix ``6726825d`` is, by torch.hub's naming convention, the
first 8 hex digits of the file's SHA-256, which we check before loading.

For smoke tests only, ``random_weights=True`` builds the same network with seeded random weights;
rFID computed with it is NOT comparable to any published number.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Optional, Union
from unittest import mock

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
FID_INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_INCEPTION_SHA256_PREFIX = "6726825d"
FID_INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_INCEPTION_FILENAME
)
DEFAULT_INCEPTION_WEIGHTS = REPO_ROOT / "external" / FID_INCEPTION_FILENAME
FEATURE_DIM = 2048
RANDOM_INCEPTION_WARNING = (
    "rFID WAS COMPUTED WITH A RANDOMLY INITIALISED INCEPTION (--random-inception): a smoke test only; "
    "the rFID values are NOT comparable to the paper or to any other FID"
)


class InceptionWeightsError(FileNotFoundError):
    """The FID Inception weights are missing or are not the expected file; the message says how to get them."""


def how_to_get_weights(path: Path) -> str:
    return (
        f"Download {FID_INCEPTION_FILENAME} (~91 MB, the FID InceptionV3 weights used by pytorch-fid) from\n"
        f"  {FID_INCEPTION_URL}\n"
        f"on a machine with internet access and place it at {path}\n"
        f"(e.g. `wget -P {path.parent} {FID_INCEPTION_URL}`); see external/README.md. "
        f"Check it with `sha256sum {path}`: the digest must start with {FID_INCEPTION_SHA256_PREFIX}.\n"
        f"For a smoke test without the file, pass --random-inception (rFID then is NOT comparable)."
    )


def sha256_of(path: Union[str, Path], chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_inception_state_dict(path: Union[str, Path], sha256_prefix: Optional[str] = FID_INCEPTION_SHA256_PREFIX):
    """Read the FID Inception state dict from a local file, checking its SHA-256 prefix (None: no check)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InceptionWeightsError(
            f"FID Inception weights not found: {path.resolve()} does not exist.\n" + how_to_get_weights(path))
    if sha256_prefix:
        digest = sha256_of(path)
        if not digest.startswith(sha256_prefix):
            raise InceptionWeightsError(
                f"{path}: SHA-256 {digest} does not start with {sha256_prefix}, so this is not pytorch-fid's "
                f"{FID_INCEPTION_FILENAME} (truncated download, or another Inception such as torchvision's).\n"
                + how_to_get_weights(path))
    import meditok
    return meditok.safe_load(path, what="FID Inception weights")


def random_inception_state_dict(seed: int = 0):
    """Seeded random weights (a fresh copy each call) with the FID Inception's parameter names and shapes."""
    return {name: tensor.clone() for name, tensor in _random_inception_state_dict(seed).items()}


@functools.lru_cache(maxsize=2)
def _random_inception_state_dict(seed: int):
    """Cached: drawing 24 M weights takes seconds on a small CPU, and smoke tests build this network often.

    pytorch-fid's FID blocks subclass torchvision's Inception blocks with the same constructor
    arguments (only ``forward`` differs), so torchvision's InceptionV3 with 1008 classes and no aux
    head has exactly the FID network's state-dict layout.
    """
    import torchvision

    network = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    state_dict = network.state_dict()
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in state_dict.items():
        if name.endswith("conv.weight"):
            # He-normal: every conv is followed by an identity-initialised BatchNorm and a ReLU, so this
            # keeps activations O(1) through the 94 convolutions (torchvision's std-0.1 init overflows
            # to ~1e10 and its default init vanishes), giving features a covariance worth computing.
            fan_in = tensor[0].numel()
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
    return state_dict


def build_fid_inception(weights: Union[str, Path, None] = DEFAULT_INCEPTION_WEIGHTS, *, random_weights: bool = False,
                        seed: int = 0, sha256_prefix: Optional[str] = FID_INCEPTION_SHA256_PREFIX,
                        device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    """pytorch-fid's ``InceptionV3([3])`` (2048-d pool3 features), eval mode, weights from a local file.

    Args:
        weights: path to ``pt_inception-2015-12-05-6726825d.pth``; ignored with ``random_weights``.
        random_weights: seeded random weights (smoke tests only; see :data:`RANDOM_INCEPTION_WARNING`).
        sha256_prefix: expected start of the file's SHA-256 (None skips the check).

    Raises:
        InceptionWeightsError: the file is missing or has the wrong checksum (message: where it is
            expected and how to get it).
    """
    from pytorch_fid import inception as pytorch_fid_inception

    # load_state_dict copies, so the cached random tensors are never modified.
    state_dict = _random_inception_state_dict(seed) if random_weights else read_inception_state_dict(weights, sha256_prefix)

    def local_state_dict(url, *args, **kwargs):
        if not url.endswith(FID_INCEPTION_FILENAME):  # a pytorch-fid version asking for other weights
            raise RuntimeError(f"pytorch-fid asked for {url}; this code only provides {FID_INCEPTION_FILENAME}")
        return state_dict

    # pytorch-fid's constructor fetches the weights through this module-level function; serving them
    # from memory keeps its network definition (and its TensorFlow-compatible blocks) untouched.
    with mock.patch.object(pytorch_fid_inception, "load_state_dict_from_url", local_state_dict):
        network = pytorch_fid_inception.InceptionV3([pytorch_fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]],
                                                    resize_input=True, normalize_input=True)
    return network.eval().to(device)


@torch.no_grad()
def inception_features(network: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pool3 features of images in [0, 1].

    pytorch-fid resizes every input to 299 × 299 (bilinear, align_corners=False, no antialiasing) and
    maps [0, 1] to [-1, 1] inside the network, identically for originals and reconstructions.

    Args:
        images: [B, 3, H, W] float in [0, 1] (after :func:`evaluation.metrics.quantize_to_unit`).

    Returns:
        float32 [B, 2048] on the CPU.
    """
    device = next(network.parameters()).device
    features = network(images.to(device, torch.float32))[0]
    return features.flatten(1).float().cpu()


def describe(weights: Union[str, Path, None], random_weights: bool) -> dict:
    """What the outputs record about the FID network."""
    if random_weights:
        return {"network": "pytorch-fid InceptionV3 pool3 (2048-d)", "weights": "RANDOM (smoke test)",
                "comparable": False, "warning": RANDOM_INCEPTION_WARNING}
    return {"network": "pytorch-fid InceptionV3 pool3 (2048-d)", "weights": str(weights),
            "sha256_prefix_checked": FID_INCEPTION_SHA256_PREFIX, "comparable": True,
            "preprocessing": "uint8-quantised [0,1] images, bilinear resize to 299x299 inside pytorch-fid"}


__all__ = [
    "DEFAULT_INCEPTION_WEIGHTS", "FEATURE_DIM", "FID_INCEPTION_FILENAME", "FID_INCEPTION_SHA256_PREFIX",
    "FID_INCEPTION_URL", "InceptionWeightsError", "RANDOM_INCEPTION_WARNING", "build_fid_inception",
    "inception_features", "random_inception_state_dict", "read_inception_state_dict", "sha256_of",
]
