"""SBP modules: drop-in replacements for torch layers whose backward keeps only sampled positions."""
from .attention import SBPMultiheadAttention, SBPSelfAttention  # noqa: F401
from .backdrop import AugmentedDropout, Backdrop  # noqa: F401
from .base import SBPModule  # noqa: F401
from .linear import SBPConv1x1, SBPLinear, SBPMlp  # noqa: F401
from .tokenwise import SBPChannelsLastMlp, SBPTokenwise  # noqa: F401
from .transformer import SBPTransformerEncoderLayer  # noqa: F401
