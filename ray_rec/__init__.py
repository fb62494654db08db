"""ray_rec: sequential click prediction trained on Ray, served behind HTTP."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ray_rec.predict import Recommender


def load_model(uri: str, max_model_mb: float | None = None, device: str = "auto") -> Recommender:
    """Load a trained model artifact from a local folder or s3:// URI (see `Recommender`); a model
    larger than ``max_model_mb`` (default 4096) is refused before it is allocated. ``device``:
    where it scores: ``auto`` (the first GPU this process sees, else the CPU), ``cpu``, ``cuda[:N]``."""
    from ray_rec.predict import load_model as _load

    return _load(uri, max_model_mb, device)


__all__ = ["__version__", "load_model"]
