"""What the adapters share: recognising a library class by name, and converting the usual parts
of a block (norms, MLPs, dropout, layer scale, any other position-wise module)."""
from torch import nn

from ..nn.linear import SBPLinear, SBPMlp, check_pointwise, dropout_p
from ..nn.tokenwise import SBPDropout, SBPLayerNorm, SBPRMSNorm, SBPTokenwise, layer_norm_like, rms_form


def is_class(m, *qualnames):
    """Whether m's class is one of the named library classes ("timm.models.vision_transformer.Block"),
    or a subclass of one that does not override its forward."""
    for cls in type(m).__mro__:
        if f"{cls.__module__}.{cls.__qualname__}" in qualnames:
            return type(m).forward is cls.forward or issubclass(type(m), _sbp_classes())
    return False


def _sbp_classes():
    from ..nn.base import SBPModule

    return SBPModule


def convert_norm(m, name, converter, positions="rows"):
    """A norm (position-wise): the fused LayerNorm / RMSNorm op when it computes one exactly, else
    tokenwise."""
    if isinstance(m, (nn.Identity, SBPTokenwise, SBPLayerNorm, SBPRMSNorm)):
        return
    if layer_norm_like(m, positions):
        cls = SBPLayerNorm
    elif rms_form(m) is not None and positions != "channels_first":
        m.rms_form = rms_form(m)
        cls = SBPRMSNorm
    else:
        cls = SBPTokenwise
    converter.swap(m, cls).positions = positions


def convert_positionwise(m, name, converter, positions="rows"):
    """Any position-wise module: tokenwise (exact forward, a graph for the kept rows only)."""
    if not isinstance(m, (nn.Identity, SBPTokenwise)):
        converter.swap(m, SBPTokenwise).positions = positions


def convert_dropout(m, name, converter):
    if isinstance(m, nn.Dropout) and dropout_p(m) is not None and dropout_p(m) > 0:
        converter.swap(m, SBPDropout)


def convert_mlp(m, name, converter, positions="rows"):
    """An fc1 -> act -> fc2 MLP (timm's Mlp and alike): the fused SBP MLP when it is plain, else
    tokenwise (named in a warning: it saves more than the fused op)."""
    reason = SBPMlp.unsupported(m)
    if reason is None:
        converter.swap(m, SBPMlp)
        return
    converter.swap(m, SBPTokenwise).positions = positions
    converter.dense(name, m, f"the fused MLP op does not apply ({reason}); it runs tokenwise instead")


def convert_linear(m, name, converter):
    """A plain nn.Linear, or a plain 1x1 nn.Conv2d."""
    from ..nn.linear import SBPConv1x1

    if isinstance(m, nn.Linear) and type(m).forward in (nn.Linear.forward, SBPLinear.forward):
        converter.swap(m, SBPLinear)
        return True
    if isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward:
        try:
            check_pointwise(m)
        except ValueError:
            return False
        converter.swap(m, SBPConv1x1)
        return True
    return False
