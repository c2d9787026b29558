"""sbp_kernels: fused kernels for memory-efficient stochastic backpropagation (SBP).

Forward passes are exact and dense; gradients flow only through a kept subset of positions, and
only the kept activations are saved for backward. See DESIGN.md for the contract.
"""
from . import memory
from ._extension import error as extension_error
from .backend import backends, get_backend, set_backend
from .keepset import step
from .nn.convert import convert
from .ops.attention import attention
from .ops.cross_entropy import linear_cross_entropy
from .ops.dropout import dropout
from .ops.linear import linear
from .ops.mlp import gated_mlp, mlp
from .ops.norm import layer_norm, rms_norm
from .ops.pointwise_conv import pointwise_conv
from .ops.tokenwise import tokenwise
from .sampling import keep_count, manual_seed, sample_keep_indices

__all__ = [
    "attention",
    "backends",
    "convert",
    "dropout",
    "extension_error",
    "gated_mlp",
    "get_backend",
    "keep_count",
    "layer_norm",
    "linear",
    "linear_cross_entropy",
    "manual_seed",
    "memory",
    "mlp",
    "pointwise_conv",
    "rms_norm",
    "sample_keep_indices",
    "set_backend",
    "step",
    "tokenwise",
]
