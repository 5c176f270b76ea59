"""Drafters behind one interface: propose up to k tokens per sequence (+ their distribution, if any)."""

from cluster.drafters.base import DraftProposal, Drafter, DraftRequest
from cluster.drafters.registry import DRAFTERS, build_drafter

__all__ = ["DRAFTERS", "DraftProposal", "DraftRequest", "Drafter", "build_drafter"]
