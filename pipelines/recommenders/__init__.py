"""Recommenders behind one interface (see :mod:`pipelines.recommenders.base`)."""

from .base import REGISTRY, Recommender, topk
from .ease import EASE
from .knn import ItemKNN
from .mf import ALS, BPR
from .popularity import Popularity
from .seqknn import SeqKNN
from .userknn import UserKNN

__all__ = ["REGISTRY", "Recommender", "topk", "Popularity", "ItemKNN", "UserKNN", "EASE", "ALS", "BPR", "SeqKNN"]
