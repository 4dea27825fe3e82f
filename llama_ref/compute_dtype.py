"""The compute dtype of a model's activations (interim: the lead's placeholder until the per-machine rule lands)."""

from __future__ import annotations

import torch


def resolve_compute_dtype(requested, device: torch.device, weight_dtype: torch.dtype) -> tuple[torch.dtype, str]:
    if isinstance(requested, torch.dtype):
        return requested, "given explicitly"
    if device.type == "cpu":
        return torch.float32, "fp32 on the CPU"
    return weight_dtype, f"the weight dtype on {device.type}"
