"""SBP modules: drop-in replacements for torch layers whose backward keeps only sampled positions,
and the class swap convert uses to turn a model's own modules into them (base.swap; restore
undoes a convert)."""
from .attention import SBPMultiheadAttention  # noqa: F401
from .backdrop import AugmentedDropout, Backdrop  # noqa: F401
from .base import SBPModule, swap  # noqa: F401
from .convert import restore  # noqa: F401
from .intercept import SBPIntercepted  # noqa: F401
from .linear import SBPConv1x1, SBPLinear  # noqa: F401
from .mlp import SBPGatedMlp, SBPMlp  # noqa: F401
from .tokenwise import SBPDropout, SBPLayerNorm, SBPRMSNorm, SBPTokenwise  # noqa: F401
from .transformer import SBPTransformerEncoderLayer  # noqa: F401
