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


def visible_gpus(device: str = "auto") -> list[str]:
    """The ids (as ``CUDA_VISIBLE_DEVICES`` names them) of the GPUs work on ``device`` may be
    spread over: every visible one for ``auto`` or ``cuda``, none for the CPU or one named GPU."""
    if device not in ("auto", "cuda") or not torch.cuda.is_available():
        return []
    n = torch.cuda.device_count()
    named = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return named[:n] if len(named) >= n else [str(i) for i in range(n)]


# `--precision` choices: bf16 autocast on, off, or None to let :func:`mixed_precision` decide.
PRECISIONS = {"auto": None, "bf16": True, "fp32": False}
PRECISION_HELP = "bf16 autocast (auto: where the hardware does bf16 natively; BUSI_MONAI_AMP=0 makes auto fp32)"


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
        return native and torch.backends.mkldnn.is_available() and not _onednn_capped_below_bf16()
    return False


# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) from which on it has native bf16 kernels.
_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL")


def _onednn_capped_below_bf16() -> bool:
    """True when ONEDNN_MAX_CPU_ISA (or its old name DNNL_MAX_CPU_ISA) holds oneDNN below its
    bf16 kernels: bf16 is then emulated there, many times slower than fp32."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return bool(cap) and cap.strip().upper() not in _BF16_ISAS
