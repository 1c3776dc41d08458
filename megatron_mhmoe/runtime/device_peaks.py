"""Dense bf16 tensor-core peak TFLOPS per GPU, keyed by the exact `torch.cuda.get_device_name()` string.

MFU divides achieved FLOPS by this peak, so a wrong peak is a wrong MFU. Names are matched exactly (after
collapsing whitespace), never by substring: "NVIDIA H100 PCIe" contains "H100" but peaks at 756, not the
SXM part's 989; "NVIDIA A10G" contains "A10" but peaks at 70, not 125; "NVIDIA GH200 480GB" contains
"H200". A name not in the table gives None (MFU is then not reported) rather than a neighbour's number.

The values are dense: NVIDIA datasheets headline bf16 "with sparsity" (2:4 structured sparsity, which
training does not use); the dense figure is half of it. GPUs without bf16 tensor cores (V100, T4) are
absent on purpose.

Sources, by document name:
- H100 SXM / PCIe / NVL: "NVIDIA H100 Tensor Core GPU" datasheet (BF16 1,979 / 1,513 / 1,671 TFLOPS
  with sparsity; the NVL figure is per GPU in the current datasheet).
- H200 SXM / NVL: "NVIDIA H200 Tensor Core GPU" datasheet (1,979 / 1,671 with sparsity).
- GH200 (either memory version): "NVIDIA GH200 Grace Hopper Superchip" datasheet (1,979 with sparsity).
- B200: "NVIDIA DGX B200" / "HGX B200" specifications (FP16/BF16 4.5 PFLOPS per GPU with sparsity).
- A100 (all four SKUs): "NVIDIA A100 Tensor Core GPU" datasheet (BF16 312, 624 with sparsity).
- L40S: "NVIDIA L40S" datasheet (733 with sparsity); L40: "NVIDIA L40" datasheet (362.1 with sparsity).
- L4: "NVIDIA L4 Tensor Core GPU" datasheet (242 with sparsity).
- A10: "NVIDIA A10 Tensor Core GPU" datasheet (125, 250 with sparsity).
- A10G (AWS G5 only; NVIDIA publishes no datasheet): Baseten, "NVIDIA A10 vs A10G for ML model
  inference" (70 TFLOPS bf16 tensor), the figure MosaicML Composer's speed monitor also uses.
"""
from __future__ import annotations

from typing import Optional

PEAK_BF16_TFLOPS: dict[str, float] = {
    # Hopper
    "NVIDIA H100 80GB HBM3": 989.4,  # SXM5
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.5,
    "NVIDIA H200": 989.4,  # SXM
    "NVIDIA H200 NVL": 835.5,
    "NVIDIA GH200 480GB": 989.4,  # 96 GB HBM3
    "NVIDIA GH200 144G HBM3e": 989.4,
    # Blackwell
    "NVIDIA B200": 2250.0,
    # Ampere
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A10": 125.0,
    "NVIDIA A10G": 70.0,
    # Ada
    "NVIDIA L40S": 362.05,
    "NVIDIA L40": 181.05,
    "NVIDIA L4": 121.0,
}


def _normalise(name: str) -> str:
    return " ".join(name.split())


def peak_bf16_tflops(device_name: str) -> Optional[float]:
    """Dense bf16 peak of the GPU called `device_name` (as torch.cuda.get_device_name() spells it), or
    None when the name is not in the table."""
    return PEAK_BF16_TFLOPS.get(_normalise(device_name or ""))


def current_device_peak() -> Optional[float]:
    """peak_bf16_tflops() of the current CUDA device; None without CUDA or for an unlisted GPU."""
    import torch
    if not torch.cuda.is_available():
        return None
    return peak_bf16_tflops(torch.cuda.get_device_name(torch.cuda.current_device()))
