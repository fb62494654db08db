"""ray_rec: sequential click prediction trained on Ray, served behind HTTP."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ray_rec.model.artifact import Recommender


def load_model(uri: str) -> Recommender:
    """Load a trained model artifact from a local folder or s3:// URI (see `Recommender`)."""
    from ray_rec.model.artifact import load_model as _load

    return _load(uri)


__all__ = ["__version__", "load_model"]
