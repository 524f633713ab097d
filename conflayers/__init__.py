"""ConfLayers: training-free self-speculative decoding by confidence-guided layer skipping."""

from .costs.surface import CostSurface
from .drafts.auto import AutoDrafter, build_drafter
from .drafts.corpus import CorpusDrafter, SuffixIndex
from .drafts.layerskip import FixedSkip, LayerSkipDrafter
from .drafts.ngram import NgramDrafter
from .drafts.router import GroupRouter
from .drafts.seam import DraftContext, Drafter, NoDrafter, Proposal, StepOutcome
from .engine import Engine, GenerationConfig, Request, RowResult, RowStats
from .layers import capture_sublayers, decoder_layers, skip_layers, validate_skip_set
from .sampling import SamplingParams
from .search.conflayers import ConfLayersSearch, SearchConfig
from .search.policy import make_policy
from .search.swift import SwiftSearch

__all__ = [
    "AutoDrafter",
    "CorpusDrafter",
    "CostSurface",
    "NgramDrafter",
    "build_drafter",
    "DraftContext",
    "Drafter",
    "Engine",
    "FixedSkip",
    "GenerationConfig",
    "GroupRouter",
    "LayerSkipDrafter",
    "NoDrafter",
    "Proposal",
    "Request",
    "RowResult",
    "RowStats",
    "SamplingParams",
    "SuffixIndex",
    "StepOutcome",
    "ConfLayersSearch",
    "SearchConfig",
    "SwiftSearch",
    "capture_sublayers",
    "decoder_layers",
    "make_policy",
    "skip_layers",
    "validate_skip_set",
]
