"""Which device and precision training picks: the hardware probes are faked, so every branch
runs with a known answer on any machine (bf16-capable CPU or not, GPU or not)."""

from __future__ import annotations

import pytest
import torch

from busi_monai.device import DeviceError, mixed_precision, resolve_device

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture
def hw(monkeypatch):
    """Set the probes: ``hw(avx512_bf16=, amx=, mkldnn=, cuda=, cuda_bf16=)``; the defaults are a
    plain CPU with oneDNN and no GPU. The environment that caps or disables bf16 is cleared."""
    for name in ("BUSI_MONAI_AMP", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)

    def set_probes(avx512_bf16=False, amx=False, mkldnn=True, cuda=False, cuda_bf16=False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: mkldnn)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
        return monkeypatch

    return set_probes


# (AVX-512 BF16, AMX, oneDNN) -> bf16 on the CPU: either native bf16 ISA, and only with oneDNN.
CPU_TABLE = [
    (False, False, True, False),
    (True, False, True, True),
    (False, True, True, True),
    (True, True, True, True),
    (True, True, False, False),  # no oneDNN: bf16 would not run on its kernels
    (False, False, False, False),
]


@pytest.mark.parametrize(("avx512_bf16", "amx", "mkldnn", "expected"), CPU_TABLE)
def test_cpu_precision_follows_the_probes(hw, avx512_bf16, amx, mkldnn, expected):
    hw(avx512_bf16=avx512_bf16, amx=amx, mkldnn=mkldnn)
    assert mixed_precision(CPU) is expected


def test_a_torch_without_the_private_cpu_probes_stays_in_fp32(hw):
    mp = hw(avx512_bf16=True, amx=True)
    mp.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert mixed_precision(CPU) is False


@pytest.mark.parametrize("name", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
@pytest.mark.parametrize("cap", ["AVX2", "avx512_core", "SSE41"])
def test_onednn_capped_below_bf16_means_fp32(hw, name, cap):
    """`make test ISA=avx2` caps oneDNN at AVX2: bf16 would be emulated there, so fp32, even on
    a CPU that has it (faked here, so the cap is what turns it off)."""
    hw(avx512_bf16=True, amx=True).setenv(name, cap)
    assert mixed_precision(CPU) is False


@pytest.mark.parametrize("cap", ["AVX512_CORE_BF16", "avx512_core_amx", " ALL ", "avx10_1_512"])
def test_a_cap_that_keeps_bf16_changes_nothing(hw, cap):
    hw(avx512_bf16=True).setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert mixed_precision(CPU) is True
    hw(avx512_bf16=False).setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert mixed_precision(CPU) is False  # a cap never turns bf16 on


def test_an_empty_cap_is_no_cap(hw):
    hw(amx=True).setenv("ONEDNN_MAX_CPU_ISA", "")
    assert mixed_precision(CPU) is True


@pytest.mark.parametrize("value", ["0", "off", "False", "no"])
def test_busi_monai_amp_off_means_fp32_on_cpu_and_gpu(hw, value):
    hw(avx512_bf16=True, amx=True, cuda=True, cuda_bf16=True).setenv("BUSI_MONAI_AMP", value)
    assert mixed_precision(CPU) is False
    assert mixed_precision(CUDA) is False


@pytest.mark.parametrize("value", ["1", "on", ""])
def test_busi_monai_amp_on_leaves_the_hardware_to_decide(hw, value):
    hw(amx=True).setenv("BUSI_MONAI_AMP", value)
    assert mixed_precision(CPU) is True


@pytest.mark.parametrize(("cuda_bf16", "expected"), [(True, True), (False, False)])
def test_cuda_precision_follows_the_gpu_not_the_cpu(hw, cuda_bf16, expected):
    # The CPU probes say the opposite, so taking the CPU branch for a GPU fails.
    hw(avx512_bf16=not cuda_bf16, amx=not cuda_bf16, cuda=True, cuda_bf16=cuda_bf16)
    assert mixed_precision(CUDA) is expected


def test_other_devices_train_in_fp32(hw):
    hw(avx512_bf16=True, amx=True, cuda=True, cuda_bf16=True)
    assert mixed_precision(torch.device("meta")) is False


def test_cuda_without_a_gpu_names_the_problem(hw):
    hw(cuda=False)
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device("cuda:1")
    assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU


def test_with_a_gpu_auto_and_cuda_pick_it(hw):
    hw(cuda=True)
    assert resolve_device("auto") == CUDA
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == CPU  # asked for by name: kept
