"""Activation offloading: tensors saved for backward wait in (pinned) CPU memory instead of the GPU.

    with OffloadActivations():          # around the forward (and, harmlessly, the backward)
        loss = objective(model, batch)
    loss.backward()

Why: a training forward keeps every layer's saved activations on the GPU until backward. With gradient
checkpointing only each decoder layer's input stays, B x T x hidden values per layer (an 8B model at 32k
tokens: 32 layers x 32k x 4096 x 2 bytes = 8 GiB), and this moves those to host memory as well.

How (the design of torchtune's OffloadActivations, in fewer lines): `torch.autograd.graph.saved_tensors_hooks`
hands every tensor autograd saves to `pack`, which copies it into pinned CPU memory and returns a handle; in
backward `unpack` brings it back. On CUDA the copies run on a side stream: in forward the compute stream never
waits for a device-to-host copy (`record_stream` keeps the activation's memory from being reused until its copy
is done), and in backward each unpack also starts bringing back the next `prefetch` tensors backward will ask
for (it unpacks roughly in the reverse of pack order), so a copy overlaps the layers before it. On CPU pack is a
plain copy, which makes the bookkeeping testable: gradients are bit-identical with and without it.

Not offloaded: weights and views of weights (`nn.Parameter`s: a linear layer saves its weight's transpose, and
copying an 8B model's weights every step would be pure waste), tensors under `min_bytes` and expanded tensors
(stride 0: a copy would be larger than what they hold). A tensor saved again while it is alive and unchanged
(the rotary cos/sin and the mask every checkpointed layer saves) is copied once. Tensors
saved inside a gradient-checkpointed layer never reach these hooks (the checkpoint's own hooks take them and
keep nothing); the layer's inputs, which the checkpoint saves, do.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn


class _Saved:
    """One offloaded tensor: its host copy and, on CUDA, the device copy a prefetch is bringing back."""

    __slots__ = ("host", "device", "ready", "order", "index", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, order: list, index: int):
        self.host, self.device, self.order, self.index = host, device, order, index  # order[index] is this one
        self.ready = None  # (device tensor, event) once a fetch has started


def _is_weight(t: torch.Tensor) -> bool:
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Saved activations to CPU in forward, back in backward (see the module docstring).

    min_bytes: smaller tensors stay where they are (not worth a copy); pin_memory: pinned host buffers on CUDA
    (asynchronous copies; torch's host caching allocator reuses them); prefetch: how many tensors ahead backward
    fetches. `offloaded_bytes` counts what went to the host, for tests and the memory estimate.
    """

    def __init__(self, min_bytes: int = 1024, pin_memory: bool = True, prefetch: int = 2):
        self.min_bytes, self.pin_memory, self.prefetch = min_bytes, pin_memory, prefetch
        self.offloaded = 0  # tensors moved to the host since the context was entered
        self.offloaded_bytes = 0
        self._order: list[weakref.ref] = []  # the packed handles, in pack order, for prefetching
        self._seen: dict[int, tuple] = {}  # id(tensor) -> weakrefs to it and its handle, and its version
        self._stream = None  # the side stream, created on the first CUDA tensor
        super().__init__(self._pack, self._unpack)

    def __enter__(self):
        self.offloaded = self.offloaded_bytes = 0
        self._order, self._seen = [], {}
        return super().__enter__()

    def __exit__(self, *exc):
        self._seen = {}  # (the pack order stays: backward prefetches by it)
        return super().__exit__(*exc)

    # -- forward ------------------------------------------------------------------------------

    def _offloads(self, t: torch.Tensor) -> bool:
        nbytes = t.numel() * t.element_size()
        return nbytes >= self.min_bytes and t.layout == torch.strided and 0 not in t.stride() and not _is_weight(t)

    def _pack(self, t: torch.Tensor):
        if not self._offloads(t):
            return t
        ref, version, handle = self._seen.get(id(t), (None, None, None))
        saved = handle() if handle is not None else None
        if saved is not None and ref() is t and version == t._version:  # the same tensor, unchanged: one copy
            return saved
        if t.device.type == "cuda":
            host = self._to_host_async(t)
        else:  # CPU: a copy, so that the bookkeeping runs (and is tested) everywhere
            host = torch.empty_like(t, device="cpu")
            host.copy_(t)
        saved = _Saved(host, t.device, self._order, len(self._order))
        self._order.append(weakref.ref(saved))
        self._seen[id(t)] = (weakref.ref(t), t._version, weakref.ref(saved))
        self.offloaded += 1
        self.offloaded_bytes += t.numel() * t.element_size()
        return saved

    def _to_host_async(self, t: torch.Tensor) -> torch.Tensor:
        compute = torch.cuda.current_stream(t.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(t.device)
        self._stream.wait_stream(compute)  # the copy starts once `t` is computed
        with torch.cuda.stream(self._stream):
            host = torch.empty_like(t, device="cpu", pin_memory=self.pin_memory)
            host.copy_(t, non_blocking=True)
        t.record_stream(self._stream)  # its memory is not handed out again before the copy has read it
        return host

    # -- backward -----------------------------------------------------------------------------

    def _unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        if saved.device.type != "cuda":
            return saved.host
        if saved.ready is None:
            self._fetch(saved)
        for i in range(saved.index - 1, max(saved.index - 1 - self.prefetch, -1), -1):  # backward's next ones
            ahead = saved.order[i]()
            if ahead is not None and ahead.ready is None:
                self._fetch(ahead)
        t, event = saved.ready
        saved.ready = None  # our reference goes; autograd frees `t` after its use
        compute = torch.cuda.current_stream(t.device)
        compute.wait_event(event)
        t.record_stream(compute)  # allocated on the side stream, used on the compute stream
        return t

    def _fetch(self, saved: _Saved) -> None:
        with torch.cuda.stream(self._stream):
            t = saved.host.to(saved.device, non_blocking=True)
            saved.ready = (t, self._stream.record_event())


def offloading(enabled: bool):
    """`OffloadActivations()` when enabled, else a context that does nothing."""
    import contextlib

    return OffloadActivations() if enabled else contextlib.nullcontext()
