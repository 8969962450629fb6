"""Host<->device copies that do not stall the compute stream.

On CUDA a :class:`HostCopy` copies a device tensor into pinned host memory
on a side stream that first waits for the work queued so far on the
current (compute) stream; the forward of the next batch can be queued at
once, and only :meth:`HostCopy.get` waits, for this copy alone.  On CPU it
is a no-op wrapper, so the same code runs everywhere.

:func:`to_device_async` is the other direction: pinned memory,
``non_blocking`` on a copy stream, and an event the compute stream waits
on before it reads the tensor.
"""

from __future__ import annotations

import threading

import torch

_streams: dict[tuple[str, int, int], torch.cuda.Stream] = {}
_lock = threading.Lock()


def side_stream(device: torch.device, role: str) -> "torch.cuda.Stream":
    """One lazily created CUDA stream per (device, role, thread)."""
    key = (role, device.index or 0, threading.get_ident())
    with _lock:
        stream = _streams.get(key)
        if stream is None:
            stream = _streams[key] = torch.cuda.Stream(device=device)
    return stream


class HostCopy:
    """A tensor on its way to host memory; :meth:`get` returns the host tensor."""

    def __init__(self, tensor: torch.Tensor):
        self.event = None
        if tensor.device.type != "cuda":
            self.host = tensor
            return
        stream = side_stream(tensor.device, "d2h")
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(stream)
        tensor.record_stream(stream)

    def get(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.host


class DeviceTensor:
    """A host tensor on its way to ``device``; :meth:`get` makes the current stream wait for it."""

    def __init__(self, tensor: torch.Tensor, device: torch.device):
        self.event = None
        if device.type != "cuda":
            self.tensor = tensor.to(device)
            return
        if tensor.device.type == "cuda":  # already there (decoded on the GPU)
            self.tensor = tensor
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(device))
            return
        stream = side_stream(device, "h2d")
        with torch.cuda.stream(stream):
            src = tensor if tensor.is_pinned() else tensor.pin_memory()
            self.tensor = src.to(device, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(stream)

    def get(self) -> torch.Tensor:
        if self.event is not None:
            current = torch.cuda.current_stream(self.tensor.device)
            current.wait_event(self.event)
            self.tensor.record_stream(current)
        return self.tensor
