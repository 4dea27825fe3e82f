"""Turn a user's device argument into a ``torch.device`` that exists, or refuse it clearly.

Without this check a CPU-only torch answers ``device="cuda"`` with ``AssertionError: Torch not
compiled with CUDA enabled`` from deep inside the first allocation, and ``cuda:7`` on a one-GPU
machine with a CUDA runtime error.
"""

from __future__ import annotations

from typing import Union

import torch

from .errors import DeviceUnavailableError

DeviceLike = Union[str, torch.device, int, None]


def parse_device(device: DeviceLike, what: str = "device") -> torch.device:
    """``torch.device(device)`` with a ``ValueError`` naming the argument when it is not a device."""
    if isinstance(device, bool):  # torch.device(True) would be cuda:1
        raise ValueError(f"{what}={device!r} is not a valid torch device")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{what}={device!r} is not a valid torch device ({e})") from None


def resolve_device(device: DeviceLike, what: str = "device") -> torch.device:
    """A ``torch.device`` that this process can allocate on; ``DeviceUnavailableError`` otherwise.

    ``cpu`` and ``meta`` always exist. CUDA must be available and the index below the device
    count. Other accelerators (mps, xpu, ...) are probed with an empty allocation.
    """
    dev = parse_device(device, what)
    if dev.type in ("cpu", "meta"):
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
            raise DeviceUnavailableError(
                f"{what}={str(dev)!r} requested but CUDA is not available ({build}; torch {torch.__version__}); "
                "use device='cpu' or device='meta'"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceUnavailableError(
                f"{what}={str(dev)!r} requested but this machine has {count} CUDA device(s) "
                f"(valid: {', '.join(f'cuda:{i}' for i in range(count))})"
            )
        return dev
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailableError(f"{what}={str(dev)!r} requested but MPS (Apple Metal) is not available here")
    try:
        torch.empty(0, device=dev)
    except Exception as e:  # AssertionError / RuntimeError / NotImplementedError, depending on the backend
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        first = first if len(first) <= 160 else first[:157] + "..."
        raise DeviceUnavailableError(f"{what}={str(dev)!r} is not available in this torch build ({first})") from None
    return dev


__all__ = ["DeviceLike", "parse_device", "resolve_device"]
