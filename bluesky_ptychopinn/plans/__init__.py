"""Bluesky plans: ``ptycho_scan`` and ``ptycho_scan_with_feedback`` with its recommenders."""

from ._feedback import FeedbackState, ptycho_scan_with_feedback
from ._ptycho_scan import ptycho_scan, scan_points
from ._recommenders import (
    FeatureRecommender,
    OptimizerRecommender,
    Recommender,
    ReconstructionView,
    UncertaintyRecommender,
    deviation_rms,
    make_recommender,
    structure_map,
)

__all__ = [
    "FeatureRecommender",
    "FeedbackState",
    "OptimizerRecommender",
    "ReconstructionView",
    "Recommender",
    "UncertaintyRecommender",
    "deviation_rms",
    "make_recommender",
    "ptycho_scan",
    "ptycho_scan_with_feedback",
    "scan_points",
    "structure_map",
]
