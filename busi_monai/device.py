"""Which device to run on, and whether to train in bf16 there."""

from __future__ import annotations

import os

import torch


class DeviceError(ValueError):
    """A device that was asked for and is not there."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(device)


def mixed_precision(dev: torch.device) -> bool:
    """Train in bf16 autocast where the hardware does bf16 natively: CUDA GPUs that support it,
    and CPUs with AVX-512 BF16 or AMX (oneDNN), where bf16 with channels-last is faster per core
    than fp32 (BENCHMARKS.md). ``BUSI_MONAI_AMP=0`` turns it off; ``fit(amp=...)`` decides per run."""
    if os.environ.get("BUSI_MONAI_AMP", "").lower() in ("0", "false", "off", "no"):
        return False
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        try:  # private helpers, present since torch 2.3; without them, stay in fp32
            native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        except AttributeError:
            return False
        return native and torch.backends.mkldnn.is_available()
    return False
