"""Everything that predicts with a trained model: the batched `Recommender` API (Python and Serve),
catalog ranking in bounded blocks, `ray-rec evaluate` and `ray-rec batch-score`."""

from ray_rec.predict.recommender import Answer, Query, Recommender, load_model

__all__ = ["Answer", "Query", "Recommender", "load_model"]
