"""Sparse linear transforms for Llama (`--enable_slt --slt_config FILE.json`).

Methods: magnitude (gradual magnitude pruning), supermask (edge-popup), nm (N:M with SR-STE),
sltrain (sparse plus low-rank). See docs/sparse.md.
"""

from slt.config import METHOD_DEFAULTS, PROJECTIONS, SLTConfig, load_slt_config
from slt.layers import (
    MagnitudeLinear,
    NMLinear,
    SLTrainLinear,
    SparseLinear,
    SupermaskLinear,
    nm_mask,
    threshold_for,
)
from slt.patch import patch_llama
from slt.schedule import refresh_due, scheduled_sparsity
from slt.training import SparseTraining

__all__ = [
    "METHOD_DEFAULTS",
    "PROJECTIONS",
    "MagnitudeLinear",
    "NMLinear",
    "SLTConfig",
    "SparseLinear",
    "SLTrainLinear",
    "SparseTraining",
    "SupermaskLinear",
    "load_slt_config",
    "nm_mask",
    "patch_llama",
    "refresh_due",
    "scheduled_sparsity",
    "threshold_for",
]
