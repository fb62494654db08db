"""The interest model in pure PyTorch: no Ray, no boto3."""

from ray_rec.model.artifact import ArtifactError, Recommender, load_model, save_model
from ray_rec.model.interest_model import InterestModel

__all__ = ["ArtifactError", "InterestModel", "Recommender", "load_model", "save_model"]
