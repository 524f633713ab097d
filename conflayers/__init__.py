"""ConfLayers: training-free self-speculative decoding by confidence-guided layer skipping."""

from .controller import AutoDrafter, build_drafter
from .corpus import CorpusDrafter, SuffixIndex
from .costs import CostSurface
from .drafters import DraftContext, Drafter, FixedSkip, LayerSkipDrafter, NoDrafter, Proposal, StepOutcome
from .engine import Engine, GenerationConfig, Request, RowResult, RowStats
from .layers import capture_sublayers, decoder_layers, skip_layers, validate_skip_set
from .ngram import NgramDrafter
from .router import GroupRouter
from .sampling import SamplingParams
from .search import ConfLayersSearch, SearchConfig, SwiftSearch, make_policy

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
