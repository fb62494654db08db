"""A stand-in accelerator for tests on a machine without one: tensors that say they are on another
device (PyTorch's ``meta``) while their values live in host memory.

Inside `OtherDevice`, every PyTorch operation runs for real on the host values, but first checks
the devices of its tensor arguments as CUDA would: a tensor of the model's device beside a host
tensor (other than a 0-dim scalar) fails with `Misplaced`, and so does a CPU random generator
drawing for the device. Copies between the two (``.to``, ``.cpu()``, reading a scalar, ``tolist``)
work as they do on a GPU, and ``.numpy()`` on a device tensor fails as it does there. So a batch,
mask, index or buffer left on the host while the model is on the device fails here as it would on
a GPU, and a correct path runs to the end with real values.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

DEVICE = torch.device("meta")  # what the stand-in tensors report (no real meta tensor is ever made)


class Misplaced(RuntimeError):
    """An operation mixed tensors of the device and of the host."""


class OnDevice(torch.Tensor):
    """A host tensor that reports `DEVICE` (``held`` holds its values)."""

    held: torch.Tensor

    @staticmethod
    def __new__(cls, held: torch.Tensor) -> OnDevice:
        out = torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, held.shape, strides=held.stride(), storage_offset=held.storage_offset(), dtype=held.dtype,
            layout=held.layout, device=DEVICE, requires_grad=held.requires_grad)
        out.held = held
        return out

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # noqa: ANN401
        return f"OnDevice({self.held!r})"

    def tolist(self) -> Any:  # noqa: ANN401  (a device-to-host copy, as on a GPU)
        return self.held.tolist()

    def numpy(self, *, force: bool = False) -> Any:  # noqa: ANN401
        raise TypeError("can't convert a device tensor to numpy: copy it to the host first (Tensor.cpu())")

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # noqa: ANN401
        raise RuntimeError(f"{func} on a stand-in device tensor outside `OtherDevice`")


def _on_device(device: Any) -> bool:  # noqa: ANN401
    return device is not None and torch.device(device) == DEVICE


_COPIES = {torch.ops.aten._to_copy.default}
# Operations that take some arguments on the host by design, on a GPU too: packed sequences keep
# their lengths and batch sizes there (packing returns them there, beside the data on the device).
_PACK = torch.ops.aten._pack_padded_sequence.default
# Indexing a device tensor takes host indices too (a Python list of rows, say).
_HOST_ARGUMENTS = {_PACK, torch.ops.aten._pad_packed_sequence.default, torch.ops.aten.gru.data, torch.ops.aten.lstm.data,
                   torch.ops.aten.rnn_tanh.data, torch.ops.aten.rnn_relu.data}
_INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
             torch.ops.aten._index_put_impl_.default}
_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_pinned.default}


class _NoGrad:
    """Stands in for ``torch._C._InferenceMode`` inside `OtherDevice`: a wrapper tensor cannot be an
    inference tensor (PyTorch refuses its views' version counters), and no_grad computes the same values."""

    def __init__(self, mode: bool) -> None:
        self.context = torch.no_grad() if mode else contextlib.nullcontext()

    def __enter__(self) -> None:
        self.context.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.context.__exit__(*exc)


class OtherDevice(TorchDispatchMode):
    """While active, `DEVICE` is a working device whose tensors must not meet host tensors."""

    def __enter__(self) -> OtherDevice:
        self._inference_mode = torch._C._InferenceMode
        torch._C._InferenceMode = _NoGrad  # type: ignore[misc,assignment]
        return super().__enter__()  # type: ignore[no-any-return]

    def __exit__(self, *exc: object) -> None:
        torch._C._InferenceMode = self._inference_mode  # type: ignore[misc]
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # noqa: ANN401
        kwargs = kwargs or {}
        places: set[str] = set()

        def unwrap(x: Any) -> Any:  # noqa: ANN401
            if isinstance(x, OnDevice):
                places.add("device")
                return x.held
            if isinstance(x, torch.Tensor) and x.device == DEVICE:  # made by PyTorch past this mode: no values
                raise Misplaced(f"{func}: a tensor PyTorch built on the device by itself (a Python list used as an "
                                "index of a device tensor, say); build it on the host and move it with the batch")
            if isinstance(x, torch.Tensor) and x.dim() > 0:  # a 0-dim host tensor mixes with any device
                places.add("host")
            return x

        plain_args = tree_map(unwrap, args)
        plain_kwargs = tree_map(unwrap, {k: v for k, v in kwargs.items() if k != "device"})
        target = kwargs.get("device")
        if func in _READS:
            return func(*plain_args, **plain_kwargs)
        if func is torch.ops.aten._pin_memory.default:
            return args[0]
        if func in _COPIES:
            if target is not None:
                plain_kwargs["device"] = "cpu"
            out = func(*plain_args, **plain_kwargs)
            to_device = _on_device(target) if target is not None else isinstance(args[0], OnDevice)
            return OnDevice(out) if to_device else out
        if func is torch.ops.aten.copy_.default:  # copies across devices are allowed
            func(*plain_args, **plain_kwargs)
            return args[0]
        host_indices = func in _INDEXING and isinstance(args[0], OnDevice)
        if len(places) > 1 and func not in _HOST_ARGUMENTS and not host_indices:
            raise Misplaced(f"{func}: tensors on the device and on the host in one operation")
        device = "device" in places or _on_device(target)
        if target is not None:
            plain_kwargs["device"] = "cpu" if _on_device(target) else target
        if device and isinstance(kwargs.get("generator"), torch.Generator):
            raise Misplaced(f"{func}: a host random generator drawing for the device")
        out = func(*plain_args, **plain_kwargs)
        if not device:
            return out
        if func is _PACK:  # (data, batch_sizes): the batch sizes stay on the host
            return OnDevice(out[0]), out[1]
        return tree_map(lambda x: OnDevice(x) if isinstance(x, torch.Tensor) and not isinstance(x, OnDevice) else x, out)
