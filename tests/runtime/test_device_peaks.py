"""MFU peaks: every listed GPU by its exact CUDA name, the substring traps that a `key in name` lookup
falls into, and unknown names (None, never a neighbour's number)."""
from __future__ import annotations

import pytest
import torch

from megatron_mhmoe.runtime import device_peaks
from megatron_mhmoe.runtime.device_peaks import PEAK_BF16_TFLOPS, current_device_peak, peak_bf16_tflops

# Dense bf16 TFLOPS, written out independently of the module's table.
EXPECTED = {
    "NVIDIA H100 80GB HBM3": 989.4,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.5,
    "NVIDIA H200": 989.4,
    "NVIDIA H200 NVL": 835.5,
    "NVIDIA GH200 480GB": 989.4,
    "NVIDIA GH200 144G HBM3e": 989.4,
    "NVIDIA B200": 2250.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A10": 125.0,
    "NVIDIA A10G": 70.0,
    "NVIDIA L40S": 362.05,
    "NVIDIA L40": 181.05,
    "NVIDIA L4": 121.0,
}


def test_table_is_exactly_the_expected_entries():
    assert PEAK_BF16_TFLOPS == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_entry_by_exact_name(name):
    assert peak_bf16_tflops(name) == EXPECTED[name]
    # The same name as drivers or logs may space it: runs of whitespace and padding are not a new GPU.
    assert peak_bf16_tflops(f"  {name.replace(' ', '   ')}\n") == EXPECTED[name]


@pytest.mark.parametrize("name,peak,not_peak", [
    ("NVIDIA A10G", 70.0, 125.0),            # contains "A10"
    ("NVIDIA A10", 125.0, 70.0),
    ("NVIDIA H100 PCIe", 756.0, 989.4),      # contains "H100"
    ("NVIDIA H100 NVL", 835.5, 989.4),
    ("NVIDIA L4", 121.0, 362.05),            # a prefix of "NVIDIA L40S"
    ("NVIDIA L40", 181.05, 362.05),          # a prefix of "NVIDIA L40S"
    ("NVIDIA H200 NVL", 835.5, 989.4),       # contains "NVIDIA H200"
])
def test_substring_traps(name, peak, not_peak):
    got = peak_bf16_tflops(name)
    assert got == peak, f"{name!r} got {got}: the peak of a GPU whose name overlaps it is {not_peak}"


@pytest.mark.parametrize("name", [
    "", "H100", "A100", "NVIDIA H100", "NVIDIA A100", "nvidia h100 pcie",  # partial or differently cased
    "NVIDIA H100 PCIe 80GB", "NVIDIA A10G-extra", "NVIDIA L40S-2",         # a listed name plus more
    "Tesla V100-SXM2-32GB", "Tesla T4", "NVIDIA GeForce RTX 4090",         # no entry (no bf16, or not listed)
    "NVIDIA H800", "NVIDIA H20", "AMD Instinct MI300X",
])
def test_unknown_names_give_none(name):
    assert peak_bf16_tflops(name) is None


def test_current_device_peak_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: pytest.fail("must not ask for a name"))
    assert current_device_peak() is None


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 PCIe", 756.0), ("NVIDIA A10G", 70.0),
                                       ("NVIDIA RTX 6000 Ada Generation", None)])
def test_current_device_peak_reads_the_current_device(monkeypatch, name, peak):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: asked.append(device) or name)
    assert current_device_peak() == peak
    assert asked == [3]
    assert device_peaks.peak_bf16_tflops(name) == peak
