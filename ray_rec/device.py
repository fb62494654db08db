"""Where tensors live: choosing the device, moving batches to it, mixed precision.

Every caller that feeds the model (training steps, validation, evaluation, batch scoring, the
Python API and the Serve replica) moves its batch with `to_device`, the one place a batch crosses
from host memory to an accelerator. Models, checkpoints and artifacts are stored on the CPU and
load anywhere; the model is moved once, before its optimizer is built or its state restored.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from typing import TypeVar

import torch
from torch import nn

from ray_rec.checks import check_choice
from ray_rec.config import DEVICE_NAMES, PRECISIONS

T = TypeVar("T", bound=Mapping[str, torch.Tensor])


class DeviceError(ValueError):
    """A device that this machine does not have, or a name that is not one."""


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``"auto"`` (the first GPU when PyTorch sees one, else the CPU), ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"`` -> a device this process can use; a ``torch.device`` is taken as it is.

    Raises:
        DeviceError: the name is not one of those, or names a GPU this process cannot see.
    """
    if isinstance(spec, torch.device):
        return spec
    name = str(spec).strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if re.fullmatch(DEVICE_NAMES, name) is None:
        raise DeviceError(f"device={spec!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"device={spec!r}: this process sees no GPU (PyTorch {torch.__version__}, "
                          f"CUDA {'not built in' if torch.version.cuda is None else 'built in, no device visible'}); "
                          f"use device='cpu' or 'auto'")
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device={spec!r}: this process sees {torch.cuda.device_count()} GPU(s), cuda:0 to "
                          f"cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def device_name(device: torch.device) -> str:
    """A device as logs and benchmark results name it, the card's model for a GPU."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (one device per model)."""
    return next(model.parameters()).device


def to_device(batch: T, device: torch.device) -> T:
    """A batch of tensors on ``device``: unchanged where they are there already; to a GPU through
    pinned host memory with non-blocking copies, so the copy overlaps the work queued before it."""
    if all(t.device == device for t in batch.values()):
        return batch
    if device.type == "cuda":
        return type(batch)({k: (t.pin_memory() if t.device.type == "cpu" else t).to(device, non_blocking=True)  # type: ignore[call-arg]
                            for k, t in batch.items()})
    return type(batch)({k: t.to(device) for k, t in batch.items()})  # type: ignore[call-arg]


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """The forward pass's precision: ``fp32`` as is, ``bf16`` under autocast (matrix products in
    bfloat16; the losses over the catalog cast their logits back to fp32, see `ray_rec.model.losses`)."""
    check_choice("train.precision", precision, PRECISIONS)
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


def full_precision(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """A block that runs in fp32 inside an autocast region (the softmax over the catalog, a recurrence)."""
    if device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)
