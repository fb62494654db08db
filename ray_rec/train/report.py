"""The metrics file (JSON lines) and the PNG plot of the training curves."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from ray_rec import storage

logger = logging.getLogger(__name__)


def plot_curves(history: list[dict[str, Any]]) -> bytes:
    """Loss and the validation metrics (every HR@k and NDCG@k recorded, and MRR) per epoch, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["loss"] for r in history], marker="o")
    ax_loss.set(title="training loss", xlabel="epoch")
    evaluated = [r for r in history if "eval_users" in r]
    names = [k for k in (evaluated[-1] if evaluated else {}) if k.startswith("val_")]
    for name in names:
        ax_val.plot([r["epoch"] for r in evaluated], [r[name] for r in evaluated], marker=".", label=name[4:])
    ax_val.set(title="validation (full ranking)", xlabel="epoch")
    ax_val.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def write_metrics_files(output: str, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` and ``metrics.png`` in the output folder from the full history."""
    lines = "".join(json.dumps(row) + "\n" for row in history)
    storage.write_bytes(storage.join(output, "metrics.jsonl"), lines.encode())
    try:
        storage.write_bytes(storage.join(output, "metrics.png"), plot_curves(history))
    except ImportError:
        logger.warning("matplotlib is not installed: no metrics.png")
