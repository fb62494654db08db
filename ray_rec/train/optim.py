"""The optimizer: Adam (lazy on a sparse item table), weight decay on matrices, gradient clipping."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ray_rec.config import ModelConfig, TrainConfig


class LazyAdam(torch.optim.Adam):
    """Adam that also takes sparse gradients, updating only the rows they hold.

    A parameter with a dense gradient gets plain Adam. One with a sparse gradient (the item table's,
    see `sparse_item_gradients`) is updated on its gradient's rows alone: the second moment kept
    exact (a row's ``exp_avg_sq`` decays by beta2 for every step since its last update), the first
    moment folded into the update, which moves the row at once by the whole distance Adam's
    momentum would move it, lr * (1 - beta1) / (1 - beta1 / sqrt(beta2)) * g / sqrt(v). (Plain lazy
    Adam moves a row read once a tenth as far as dense Adam; BENCHMARKS.md "sparse items" measures
    both.) L2 weight decay is added on the rows present.
    """

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: ANN401 (torch's signature)
        sparse = [(group, p, p.grad) for group in self.param_groups for p in group["params"]
                  if p.grad is not None and p.grad.is_sparse]
        for _, p, _ in sparse:
            p.grad = None  # plain Adam refuses sparse gradients: it steps the dense ones only
        for group in self.param_groups:  # a dense gradient again (a checkpoint resumed with dense updates)
            for p in group["params"]:
                if p.grad is not None and not p.grad.is_sparse and self.state[p].pop("last_step", None) is not None:
                    self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        try:
            loss = super().step(closure)
        finally:
            for _, p, grad in sparse:
                p.grad = grad
        for group, p, grad in sparse:
            self._sparse_step(group, p, grad)
        return loss

    def _sparse_step(self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor) -> None:
        grad = grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
        if group["weight_decay"]:
            values = values + group["weight_decay"] * p[rows]
        state = self.state[p]
        if "last_step" not in state:  # new, or dense Adam's state from a checkpoint: every row current
            state.pop("exp_avg", None)  # folded into the update from here on (N x D numbers freed)
            state.setdefault("step", torch.tensor(0.0))
            state.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))
            state["last_step"] = torch.full((p.shape[0],), float(state["step"]), dtype=p.dtype, device=p.device)  # as a checkpoint reloads it
        state["step"] += 1
        t = int(state["step"])
        beta1, beta2 = group["betas"]
        idle = (t - state["last_step"][rows]).unsqueeze(1)  # steps since each row's last update
        v = state["exp_avg_sq"][rows].mul_(beta2**idle).addcmul_(values, values, value=1 - beta2)
        state["exp_avg_sq"][rows] = v
        state["last_step"][rows] = t
        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
        momentum = (1 - beta1) / (1 - beta1 / math.sqrt(beta2))
        p.index_add_(0, rows, values / denom, alpha=-group["lr"] * momentum)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam with the betas SASRec uses; weight decay only on matrices, not on norms or biases.
    (`LazyAdam`: plain Adam while the gradients are dense, see `sparse_item_gradients`.)"""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return LazyAdam(groups, lr=cfg.lr, betas=(0.9, 0.98))


def sparse_item_gradients(model: ModelConfig, train: TrainConfig, on_gpu: bool) -> bool:
    """Whether training gives the item table sparse gradients (set ``features.item.sparse`` before
    DDP wraps the model: DDP reads the flag when it starts). Only on CPU (NCCL has no sparse
    all-reduce that DDP uses, and a GPU's dense update is cheap) and when no training loss reads
    the whole catalog (`ModelConfig.reads_item_sample`: sampled softmax, bce)."""
    return train.sparse_items and not on_gpu and model.reads_item_sample


def sparse_items_line(model: ModelConfig, train: TrainConfig, on_gpu: bool) -> str | None:
    """What training says about the item table's gradients when they are sparse (`sparse_item_gradients`),
    or would be but for the GPU; None when nothing is worth a line."""
    if sparse_item_gradients(model, train, on_gpu):
        return (f"item table: sparse gradients, Adam updating only the rows a step reads (the {model.loss_text()} loss "
                "reads a sample of the catalog; train.sparse_items=false for dense updates)")
    if on_gpu and train.sparse_items and model.reads_item_sample:
        return "item table: dense gradients on GPU (DDP's NCCL all-reduce takes no sparse gradients; a dense update is cheap there)"
    return None


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float) -> None:
    """`torch.nn.utils.clip_grad_norm_`, which also takes sparse gradients (by their values)."""
    params = [p for p in params if p.grad is not None]
    if not any(p.grad.is_sparse for p in params):  # type: ignore[union-attr]
        nn.utils.clip_grad_norm_(params, max_norm)
        return
    grads: list[torch.Tensor] = []
    for p in params:
        grad: torch.Tensor = p.grad  # type: ignore[assignment]
        if grad.is_sparse:
            p.grad = grad = grad.coalesce()  # a row read twice holds one summed value
        grads.append(grad.values() if grad.is_sparse else grad)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef)


