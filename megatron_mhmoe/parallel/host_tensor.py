"""A second device on a CPU-only machine: host tensors that behave as CPU tensors do next to CUDA ones.

On a GPU node a tensor left on the host fails the moment it meets a device tensor ("Expected all tensors to
be on the same device") or an NCCL collective. On CPU every tensor is already "on the device", so a test
suite run there cannot see such a mistake. Under `host_tensor_guard()` (tests turn it on through the
trainer; never in production):
1. every tensor made by a factory (`torch.zeros`, `torch.tensor`, `torch.arange`, ...) without an explicit
   `device=` is a `HostTensor`, and so is every batch the data path hands out;
2. host tensors work with each other (host-side bookkeeping is legal), and results of host-only ops stay
   host tensors;
3. an op that mixes a host tensor of one or more dimensions with any other tensor raises `DeviceMismatch`
   (a 0-dim host tensor is a scalar, which CUDA accepts); so do the collectives (parallel/comm.py);
4. `.to(device)` / `.cuda()` returns a plain tensor: the fix the error message names.
Copies (`copy_`) and indexing with a host index tensor are allowed, as CUDA allows them.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten


class DeviceMismatch(RuntimeError):
    """A host tensor reached device code: it must be created on, or moved to, the engine's device."""


class HostTensor(torch.Tensor):
    """A tensor that stands for host (CPU) memory while the model and collectives run on the device."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MOVES and _moves_to_device(func, args, kwargs):
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            return out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out
        if func not in _CROSS_DEVICE_OK:
            with torch._C.DisableTorchFunctionSubclass():  # dim() below must not come back here
                _check_mixing(func, args, kwargs)
        return super().__torch_function__(func, types, args, kwargs)


_MOVES = {torch.Tensor.to, torch.Tensor.cuda}
_CROSS_DEVICE_OK = {torch.Tensor.copy_, torch.Tensor.__getitem__, torch.Tensor.__setitem__}
_FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.as_tensor, torch.arange,
              torch.linspace, torch.randn, torch.rand, torch.randint, torch.randperm, torch.eye,
              torch.from_numpy}


def _moves_to_device(func, args, kwargs) -> bool:
    if func is torch.Tensor.cuda:
        return True
    if "device" in kwargs:
        return kwargs["device"] is not None
    for a in args[1:]:
        if isinstance(a, (torch.device, str)):
            return True
        if isinstance(a, torch.Tensor):  # .to(other): takes other's device
            return not isinstance(a, HostTensor)
    return False


def is_host(t) -> bool:
    return isinstance(t, HostTensor)


def _check_mixing(func, args, kwargs) -> None:
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    host = [t for t in tensors if isinstance(t, HostTensor) and t.dim() > 0]
    if host and any(not isinstance(t, HostTensor) for t in tensors):
        name = getattr(func, "__name__", str(func))
        raise DeviceMismatch(
            f"{name}: a host tensor of shape {tuple(host[0].shape)} meets a device tensor; on a GPU this fails "
            f"('Expected all tensors to be on the same device'): create it with device=engine.device or move it "
            f"with .to(engine.device)")


class _HostFactories(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES and kwargs.get("device") is None and type(out) is torch.Tensor:
            return out.as_subclass(HostTensor)
        return out


@contextlib.contextmanager
def host_tensor_guard(enabled: bool = True):
    """Within: default-device factory results are HostTensors (module docstring)."""
    if not enabled:
        yield
        return
    with _HostFactories():
        yield


def as_host(t: torch.Tensor) -> torch.Tensor:
    """Mark a tensor as host memory (the data path's batches under the guard)."""
    return t.as_subclass(HostTensor) if type(t) is torch.Tensor else t


def plain(tree):
    """The same nested state with host tensors as ordinary tensors (for torch.save: files hold no subclass)."""
    from torch.utils._pytree import tree_map
    return tree_map(lambda t: t.as_subclass(torch.Tensor) if isinstance(t, HostTensor) else t, tree)
