"""Which precision training picks on a CPU: bf16 only where oneDNN runs it natively."""

from __future__ import annotations

import pytest
import torch

from busi_monai.device import DeviceError, mixed_precision, resolve_device

CPU = torch.device("cpu")


def _native_bf16() -> bool:
    return (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()) and torch.backends.mkldnn.is_available()


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("BUSI_MONAI_AMP", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_cpu_follows_the_hardware(clean_env):
    assert mixed_precision(CPU) is _native_bf16()


@pytest.mark.parametrize("name", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
@pytest.mark.parametrize("cap", ["AVX2", "avx512_core", "SSE41"])
def test_onednn_capped_below_bf16_means_fp32(clean_env, name, cap):
    """`make test ISA=avx2` caps oneDNN at AVX2: bf16 would be emulated there, so fp32."""
    clean_env.setenv(name, cap)
    assert mixed_precision(CPU) is False


@pytest.mark.parametrize("cap", ["AVX512_CORE_BF16", "avx512_core_amx", "ALL"])
def test_a_cap_that_keeps_bf16_changes_nothing(clean_env, cap):
    clean_env.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert mixed_precision(CPU) is _native_bf16()


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_busi_monai_amp_off_means_fp32(clean_env, value):
    clean_env.setenv("BUSI_MONAI_AMP", value)
    assert mixed_precision(CPU) is False


def test_cuda_without_a_gpu_names_the_problem():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == CPU
