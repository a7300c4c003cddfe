"""synpo-kernels: fused GPU/CPU kernels for SynPO and related preference losses.

Public API (see README): ``token_logprobs``, ``sequence_logprobs``, ``synpo_loss``,
``preference_loss`` and their modules; the losses in ``LOSSES`` (one registry entry per loss: formula,
options, defaults; ``register_loss`` adds one). ``HAS_CPP_EXT`` / ``HAS_CUDA_KERNELS`` say which
compiled kernels are in use (the package imports and works without them, on a PyTorch fallback).
"""

from synpo_kernels._ext import EXT_IMPORT_ERROR, HAS_CPP_EXT, HAS_CUDA_KERNELS
from synpo_kernels.loss_registry import (
    LOSSES,
    LossContext,
    LossDef,
    register_loss,
    registered_loss,
    unregister_loss,
)
from synpo_kernels.losses import PreferenceStats
from synpo_kernels.ops.fused_linear_preference import (
    FusedLinearPreferenceLoss,
    FusedLinearSynPOLoss,
    fused_linear_preference_loss,
    fused_linear_synpo_loss,
)
from synpo_kernels.ops.fused_linear_token_logprobs import (
    FusedLinearTokenLogprobs,
    fused_linear_sequence_logprobs,
    fused_linear_token_logprobs,
)
from synpo_kernels.ops.sequence import (
    PreferenceLoss,
    SynPOLoss,
    preference_loss,
    row_stats,
    sequence_logprobs,
    synpo_loss,
)
from synpo_kernels.ops.token_logprobs import TokenLogprobs, token_logprobs
from synpo_kernels.reference import IGNORE_INDEX, PREFERENCE_LOSSES, RowStats

__version__ = "0.1.0"

__all__ = [
    "EXT_IMPORT_ERROR",
    "HAS_CPP_EXT",
    "HAS_CUDA_KERNELS",
    "IGNORE_INDEX",
    "LOSSES",
    "PREFERENCE_LOSSES",
    "FusedLinearPreferenceLoss",
    "FusedLinearSynPOLoss",
    "FusedLinearTokenLogprobs",
    "LossContext",
    "LossDef",
    "PreferenceLoss",
    "PreferenceStats",
    "RowStats",
    "SynPOLoss",
    "TokenLogprobs",
    "fused_linear_preference_loss",
    "fused_linear_sequence_logprobs",
    "fused_linear_synpo_loss",
    "fused_linear_token_logprobs",
    "preference_loss",
    "register_loss",
    "registered_loss",
    "row_stats",
    "sequence_logprobs",
    "synpo_loss",
    "token_logprobs",
    "unregister_loss",
]
