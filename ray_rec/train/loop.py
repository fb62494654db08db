"""The plain PyTorch parts of training: one step, evaluation. No Ray here; the Ray Train worker
loop and the single-process baseline both call these."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ray_rec.config import ModelConfig, TrainConfig
from ray_rec.metrics import DEFAULT_KS, RankingMetrics, full_ranks, sample_negatives, sampled_ranks
from ray_rec.model.artifact import catalog_blocks
from ray_rec.model.interest_model import InterestModel


class Progress:
    """Paces progress lines inside long work: ``due`` says when one is due, at most one every
    ``every_s`` seconds and the first ``every_s`` after the start (work shorter than that says
    nothing; 0 = every call).

    Example:
        >>> p = Progress(60.0, iter([0.0, 30.0, 61.0, 62.0]).__next__)
        >>> [p.due() for _ in range(3)]
        [None, 61.0, None]
    """

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self.clock = every_s, clock
        self.start = self.last = clock()

    def due(self) -> float | None:
        """Seconds since the start if a line is due now (the next is then ``every_s`` away), else None."""
        now = self.clock()
        if now - self.last < self.every_s:
            return None
        self.last = now
        return max(now - self.start, 1e-9)

    def users(self, batches: Iterable[dict[str, Any]], emit: Callable[[str], None], what: str = "",
              scale: int = 1, key: str = "targets") -> Iterator[dict[str, Any]]:
        """``batches`` of one row per user (``key`` counts them), passed through; when due, ``emit``
        gets a line on the users done so far, after ``what``: (times ``scale``: one worker's count
        times the workers, for the whole)."""
        done, prefix = 0, f"{what}: " if what else ""
        for batch in batches:
            yield batch
            done += len(batch[key]) * scale
            if (seconds := self.due()) is not None:
                emit(prefix + users_line(done, seconds))


def users_line(done: int, seconds: float, verb: str = "ranked") -> str:
    """The users-done progress line of validation, `ray-rec evaluate` and `ray-rec batch-score`."""
    return f"{done:,} users {verb} in {seconds:,.0f} s ({done / seconds:,.0f}/s)"


def steps_line(epoch: str, steps: int, windows: int, seconds: float, wait_s: float, loss: float) -> str:
    """A progress line inside an epoch. The time waiting for data shows why a run's first line is
    slow: it holds Ray Data's start-up before the first batch."""
    return (f"epoch {epoch}: {steps:,} step{'' if steps == 1 else 's'}, about {windows:,} windows in {seconds:,.0f} s "
            f"({windows / seconds:,.0f}/s; {wait_s:,.0f} s of it waiting for data), loss {loss:.4f} so far")


class LazyAdam(torch.optim.Adam):
    """Adam that also takes sparse gradients, updating only the rows they hold.

    A parameter with a dense gradient gets plain Adam. One with a sparse gradient (the item table's,
    see `sparse_item_gradients`) is updated on the rows in its gradient alone, with Adam's second
    moment kept exact (each row's ``exp_avg_sq`` decays by beta2 for every step since the row's
    last update, as dense Adam decays it) and the first moment folded into the update: a gradient
    moves its row at once by the whole distance Adam's momentum would move it over the following
    steps if no other gradient came, lr * (1 - beta1) / (1 - beta1 / sqrt(beta2)) * g / sqrt(v).
    Plain lazy Adam (`torch.optim.SparseAdam`) moves a row only on the steps that read it, so a
    row read once moves (1 - beta1) = a tenth of what dense Adam moves it; on Beauty with sampled
    softmax that cost 4% of test NDCG@10 on one seed (README "Training on large catalogs"). L2
    weight decay is added on the rows present.

    Why at all: at 1M items a dense gradient made the step 2.7x as slow with one worker and 3.7x
    with two (`python -m bench.sparse_items`), for the 1.5% of rows a sampled-softmax step reads.
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
            state["last_step"] = torch.full((p.shape[0],), float(state["step"]), dtype=p.dtype)  # as a checkpoint reloads it
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


def worker_batch(batch_size: int, workers: int) -> int:
    """Windows each of ``workers`` data-parallel workers takes a step. ``train.batch_size`` is the
    whole step's (all workers together), split evenly and rounded up where the workers do not
    divide it, so the worker count leaves the optimisation as it is: the same batch, learning
    rate and steps an epoch. On Amazon Beauty two workers of 128 windows each (a batch of 256,
    half the steps) reached a best validation NDCG@10 4% below one worker's, also with the rate
    scaled for the batch; two of 64 did not (README, Training throughput).

    Example:
        >>> worker_batch(128, 2), worker_batch(128, 3), worker_batch(2, 4)
        (64, 43, 1)
    """
    return -(-batch_size // workers)


def batch_line(batch_size: int, workers: int) -> str:
    """The first-lines note on how a step's batch is split over the workers.

    Example:
        >>> batch_line(128, 3)
        'batch: 129 windows a step, 43 on each of 3 workers (train.batch_size=128, rounded up to a multiple of 3)'
    """
    each = worker_batch(batch_size, workers)
    if workers == 1:
        return f"batch: {batch_size} windows a step (1 worker)"
    rounded = f", rounded up to a multiple of {workers}" if each * workers != batch_size else ""
    return f"batch: {each * workers} windows a step, {each} on each of {workers} workers (train.batch_size={batch_size}{rounded})"


def sparse_item_gradients(model: ModelConfig, train: TrainConfig, on_gpu: bool) -> bool:
    """Whether training gives the item table sparse gradients (set ``features.item.sparse`` before
    DDP wraps the model: DDP reads the flag when it starts). Only on CPU (NCCL has no sparse
    all-reduce that DDP uses, and a GPU's dense update is cheap) and when no training loss reads
    the whole catalog (`ModelConfig.reads_item_sample`: sampled softmax, bce)."""
    return train.sparse_items and not on_gpu and model.reads_item_sample


def sparse_items_line(model: ModelConfig) -> str:
    """What training says when `sparse_item_gradients` holds."""
    return (f"item table: sparse gradients, Adam updating only the rows a step reads (the {model.loss_text()} loss "
            "reads a sample of the catalog; train.sparse_items=false for dense updates)")


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


def train_step(
    model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, grad_clip: float
) -> dict[str, float]:
    """One optimisation step; returns the losses as floats."""
    model.train()
    losses = model(batch)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if grad_clip > 0:
        clip_gradients(model.parameters(), grad_clip)
    optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}


@torch.inference_mode()
def rank_targets(
    model: InterestModel, batch: dict[str, torch.Tensor], negatives: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each user's target rank over the full catalog (seen items excluded) and, given ``negatives``
    (B, n), among those: (B,) each, 0 = best.

    Users are scored in `catalog_blocks`, so memory stays flat however large the catalog: at 1M
    items a batch of 512 users in one block held 2 GB of scores, and the process peaked at about
    9 GB (README "Top-k at catalog scale": `python -m bench.recommend_many --call evaluate`).
    """
    full, sampled = [], []
    for rows in catalog_blocks(len(batch["targets"]), model.config.num_items):
        items, targets, seen = batch["items"][rows], batch["targets"][rows], batch["seen"][rows]
        buckets = batch.get("time_buckets")
        scores = model.score_catalog(items, None if buckets is None else buckets[rows])  # (b, N + 1)
        full.append(full_ranks(scores, targets, seen))
        if negatives is not None:
            target_scores = scores.gather(1, targets.unsqueeze(1)).squeeze(1)
            sampled.append(sampled_ranks(target_scores, scores.gather(1, negatives[rows])))
    return torch.cat(full), None if negatives is None else torch.cat(sampled)


def evaluate(
    model: InterestModel,
    batches: Iterable[dict[str, torch.Tensor]],
    ks: tuple[int, ...] = DEFAULT_KS,
    sampled_negatives: int = 0,
    seed: int = 0,
) -> tuple[RankingMetrics, RankingMetrics | None]:
    """Full-catalog ranking (seen items excluded) and, optionally, ranking among sampled negatives.

    Args:
        batches: evaluation batches from ``ray_rec.data.examples.evaluation_examples``.
        sampled_negatives: 0 to skip, else the number of uniformly sampled negatives per user.

    Returns:
        (full ranking metrics, sampled metrics or None), as accumulators (mergeable sums).
    """
    model.eval()
    full = RankingMetrics(ks)
    sampled = RankingMetrics(ks) if sampled_negatives else None
    generator = torch.Generator().manual_seed(seed)
    for batch in batches:
        negatives = None
        if sampled_negatives:
            negatives = sample_negatives(model.config.num_items, batch["targets"], batch["seen"], sampled_negatives, generator)
        ranks, negative_ranks = rank_targets(model, batch, negatives)
        full.add(ranks)
        if sampled is not None and negative_ranks is not None:
            sampled.add(negative_ranks)
    return full, sampled
