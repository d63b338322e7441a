"""Recommenders behind one interface (see :mod:`pipelines.recommenders.base`)."""

from .base import REGISTRY, Recommender, topk
from .popularity import Popularity
from .knn import ItemKNN

__all__ = ["REGISTRY", "Recommender", "topk", "Popularity", "ItemKNN"]
