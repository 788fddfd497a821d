"""LPIPS(VGG) perceptual loss (docs/method.md §2, L_recon weight 1.0), built offline from a local VGG16 file.

The ``lpips`` package ships its learned linear layers (``lpips/weights/v0.1/vgg.pth``) but takes the VGG16
backbone from torchvision, which downloads ``vgg16-397923af.pth``. We build ``lpips.LPIPS(net="vgg",
pnet_rand=True)`` (no download), then load the backbone from ``external/vgg16.pth`` — the same torchvision
file, placed by hand (see ``external/README.md``).

``vgg_path="random"`` keeps a seeded random backbone: only for tests and the CPU quick start (the loss then
means little), and it is logged as a warning every time it is built.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Dict, Union

import torch
import torch.nn as nn

import meditok
from local_openclip.constants import LPIPS_VGG_PATH, RANDOM_WEIGHTS, default_location

logger = logging.getLogger(__name__)

TORCHVISION_VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
#: torchvision checks downloads against this prefix of the file's SHA-256.
TORCHVISION_VGG16_SHA256_PREFIX = "397923af"
_HOW_TO_GET = (
    f"download {TORCHVISION_VGG16_URL} (528 MB; `sha256sum` must start with {TORCHVISION_VGG16_SHA256_PREFIX}) to "
    f"{LPIPS_VGG_PATH}, or on an online machine run `python -c \"import torch, torchvision; torch.save(torchvision."
    f"models.vgg16(weights='IMAGENET1K_V1').state_dict(), 'vgg16.pth')\"` and copy the file there; "
    f"see external/README.md. vgg_path='{RANDOM_WEIGHTS}' gives a random backbone for tests only")


class PerceptualLoss(nn.Module):
    """Frozen LPIPS(VGG16, v0.1): ``forward(x, y)`` with x, y [B, 3, H, W] in [-1, 1] → per-sample distance [B].

    The distance is ≥ 0, exactly 0 for x == y, symmetric, and differentiable w.r.t. both inputs (the
    generator's loss needs gradients to reach x); the network's own weights never receive gradients and the
    module stays in eval mode (no dropout) whatever ``train()`` a parent calls.
    """

    def __init__(self, lpips_net: nn.Module, vgg_source: str):
        super().__init__()
        self.lpips = lpips_net
        self.vgg_source = vgg_source
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two [B, 3, H, W] images in [-1, 1], got {tuple(x.shape)} and {tuple(y.shape)}")
        return self.lpips(x, y, normalize=False).flatten()


def _vgg_features_state_dict(vgg_path: Path, backbone: nn.Module) -> Dict[str, torch.Tensor]:
    """Read a torchvision VGG16 state dict (full, or only its ``features.*`` part) as ``{"N.weight": ...}``, checked
    key by key and shape by shape against lpips' backbone (whose layers keep torchvision's indices as names)."""
    state = meditok.safe_load(vgg_path, what="VGG16 weights")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{vgg_path} does not hold a state dict (got {type(state).__name__}); {_HOW_TO_GET}.")
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    expected = {f"{index}.{name}": tensor.shape for part in _backbone_slices(backbone)
                for index, layer in part.named_children() for name, tensor in layer.state_dict().items()}
    missing = sorted(set(expected) - set(features))
    unexpected = sorted(set(features) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(features) if features[k].shape != expected[k])
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{vgg_path} is not torchvision's VGG16 state dict (keys 'features.N.weight'/'bias'): missing "
            f"{['features.' + k for k in missing][:4]}, unexpected {['features.' + k for k in unexpected][:4]}, "
            f"wrong shape {['features.' + k for k in wrong_shape][:4]}; {_HOW_TO_GET}.")
    return features


def _backbone_slices(backbone: nn.Module):
    # lpips cut torchvision's `features` into slice1..slice5 and kept each layer's index as its name.
    return [getattr(backbone, f"slice{i}") for i in range(1, 6)]


def build_lpips(vgg_path: Union[str, Path, None] = None, device: Union[str, torch.device] = "cpu"
                ) -> PerceptualLoss:
    """LPIPS(VGG) with its shipped linear layers and the VGG16 backbone from ``vgg_path``.

    ``vgg_path``: ``None``/``""`` → ``external/vgg16.pth`` (``MEDITOK_LPIPS_VGG`` overrides); a path to
    torchvision's ``vgg16-397923af.pth`` (or any state dict with its ``features.*`` keys); or ``"random"``
    for a seeded random backbone (tests/quick start only). A missing file raises ``FileNotFoundError``
    naming the file and how to get it.
    """
    import lpips

    if vgg_path is None or str(vgg_path) == "":
        vgg_path = default_location(LPIPS_VGG_PATH)
    random_backbone = str(vgg_path) == RANDOM_WEIGHTS
    if not random_backbone:
        vgg_path = Path(vgg_path).expanduser()
        if not vgg_path.is_file():
            raise FileNotFoundError(f"LPIPS VGG16 weights not found: {vgg_path}; {_HOW_TO_GET}.")

    # pnet_rand=True: build the backbone without torchvision's download; seeded so that the 'random' variant
    # (and the throw-away init before loading) is the same on every run. lpips passes torchvision's
    # deprecated `pretrained=` argument, whose warnings say nothing useful here.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        torch.default_generator.manual_seed(0)  # CPU only (built on CPU): torch.manual_seed would reset
        # the CUDA generators too, and fork_rng(devices=[]) restores only the CPU one
        net = lpips.LPIPS(net="vgg", pnet_rand=True, pretrained=True, verbose=False)
    _check_linear_layers_loaded(net)
    if random_backbone:
        logger.warning("LPIPS uses a RANDOM VGG16 backbone (vgg_path='%s'): for tests and try-outs only, the "
                       "perceptual loss is not LPIPS. For training put torchvision's VGG16 at %s.",
                       RANDOM_WEIGHTS, default_location(LPIPS_VGG_PATH))
        source = RANDOM_WEIGHTS
    else:
        features = _vgg_features_state_dict(vgg_path, net.net)
        for slice_module in _backbone_slices(net.net):
            for index, layer in slice_module.named_children():
                layer_state = {k.split(".", 1)[1]: v for k, v in features.items() if k.split(".", 1)[0] == index}
                if layer_state:
                    layer.load_state_dict(layer_state, strict=True)
        source = str(vgg_path)
        logger.info("LPIPS(VGG16) backbone loaded from %s", vgg_path)
    return PerceptualLoss(net, vgg_source=source).to(device)


def _check_linear_layers_loaded(net: nn.Module) -> None:
    """lpips loads its linear layers with strict=False; make sure every one of them really came from the file."""
    import inspect
    import lpips

    weights_file = Path(inspect.getfile(lpips.LPIPS)).parent / "weights" / "v0.1" / "vgg.pth"
    if not weights_file.is_file():
        raise FileNotFoundError(f"lpips' linear-layer weights are missing: {weights_file}; reinstall lpips "
                                f"(`pip install --force-reinstall lpips==0.1.4`).")
    shipped = meditok.safe_load(weights_file, what="lpips linear-layer weights")
    own = net.state_dict()
    for key, value in shipped.items():
        if key not in own or not torch.equal(own[key], value):
            raise RuntimeError(f"lpips did not load {key} from {weights_file}; the installed lpips is incompatible.")


__all__ = ["PerceptualLoss", "build_lpips", "TORCHVISION_VGG16_URL", "TORCHVISION_VGG16_SHA256_PREFIX"]
