"""Most-popular baseline (count of training interactions per item)."""

from __future__ import annotations

import numpy as np

from ..data import Interactions, item_popularity
from .base import Recommender


class Popularity(Recommender):
    name = "popularity"

    def _fit(self, data: Interactions) -> None:
        pop = item_popularity(data.matrix())
        # items never seen in training are unscorable, not tied at zero
        self.scores_ = np.where(pop > 0, pop, -np.inf).astype(np.float32)

    def score_users(self, uidx: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.scores_, (len(uidx), len(self.scores_)))

    def _state(self):
        return {"scores": self.scores_}

    def _set_state(self, arrays):
        scores = arrays["scores"]
        if scores.shape != (len(self.item_ids),):
            raise ValueError(f"popularity scores have shape {scores.shape}, expected ({len(self.item_ids)},)")
        self.scores_ = scores
