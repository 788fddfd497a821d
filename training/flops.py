"""Model-FLOPs utilisation: the dense bf16 peak of the accelerators we know, for the MFU every trainer logs."""
from __future__ import annotations

from typing import Optional

import torch

# Dense bf16 peak (TFLOP/s, no sparsity) from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_flops(device: torch.device, override_tflops: float = 0.0, bf16: bool = True) -> Optional[float]:
    """FLOP/s to divide by for the MFU: ``override_tflops`` when > 0 (an accelerator not in the table), else the
    table's entry for this CUDA device under bf16; None when unknown (a CPU, another GPU, fp32)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None
