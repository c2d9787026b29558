"""What the adapters share: recognising a library class by name, and converting the usual parts
of a block (norms, MLPs, dropout, layer scale, any other position-wise module)."""
from torch import nn

from ..nn.linear import SBPConv1D, SBPConv1x1, SBPLinear, check_pointwise, plain_linear
from ..nn.mlp import SBPGatedMlp, SBPMlp, activation_name, dropout_p
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
    if isinstance(m, nn.Identity):
        return
    if isinstance(m, (SBPTokenwise, SBPLayerNorm, SBPRMSNorm)):  # converted before: the new settings apply
        converter.swap(m, type(m))
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
    if isinstance(m, SBPTokenwise):  # converted before: the new settings apply
        converter.swap(m, type(m))
    elif not isinstance(m, nn.Identity):
        converter.swap(m, SBPTokenwise).positions = positions


def convert_dropout(m, name, converter):
    if isinstance(m, nn.Dropout) and dropout_p(m) is not None and dropout_p(m) > 0:
        converter.swap(m, SBPDropout)


def convert_mlp(m, name, converter, positions="rows", names=SBPMlp.mlp_names):
    """An fc1 -> act -> fc2 MLP (timm's Mlp and alike, parts named `names`, see SBPMlp.mlp_names):
    the fused SBP MLP when it is plain, else tokenwise."""
    if SBPMlp.unsupported(m, names) is None:
        converter.swap(m, SBPMlp).mlp_names = names
        m.__dict__["_sbp_activation"] = activation_name(getattr(m, names[1]))  # not while tracing
        return
    converter.swap(m, SBPTokenwise).positions = positions


def convert_gated_mlp(m, name, converter, names=SBPGatedMlp.gated_names):
    """A gated MLP with parts named `names` (gate, up, down, act): the fused gated op when it is
    plain; returns False (nothing done) when its parts are not there at all."""
    if not all(hasattr(m, n) for n in names):
        return False
    if SBPGatedMlp.unsupported(m, names) is None:
        converter.swap(m, SBPGatedMlp).gated_names = names
        m.__dict__["_sbp_activation"] = activation_name(getattr(m, names[3]))  # not while tracing
    else:
        converter.swap(m, SBPTokenwise).positions = "rows"
    return True


def convert_linear(m, name, converter):
    """A plain nn.Linear, Hugging Face's Conv1D or a plain 1x1 nn.Conv2d; False when m is none."""
    if plain_linear(m):
        converter.swap(m, SBPLinear if isinstance(m, nn.Linear) else SBPConv1D)
        return True
    if isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward:
        try:
            check_pointwise(m)
        except ValueError:
            return False
        converter.swap(m, SBPConv1x1)
        return True
    return False


def scale_rows(module, x, gamma, positions="rows"):
    """gamma * x for a layer-scale parameter gamma [C] (a block's forward multiplies by it):
    tokenwise, so only x's kept rows are saved for gamma's gradient."""
    from ..nn.tokenwise import rows_view
    from ..ops import tokenwise as tokenwise_op

    rows, n, layout, back = rows_view(x, positions)
    keep_idx = module._keep_idx(n, x.device, layout=layout)
    return back(tokenwise_op.apply(lambda t: gamma * t, rows, keep_idx, -2))


def forward_signature_is(cls, names):
    """Whether cls.forward takes exactly these parameters (after self): a block whose forward an
    adapter mirrors is converted only while the library's forward still has the signature the
    adapter was written for."""
    import inspect

    return tuple(inspect.signature(cls.forward).parameters)[1:] == tuple(names)


def library_class(m, qualnames):
    """The class of m's MRO named in qualnames, or None."""
    for cls in type(m).__mro__:
        if f"{cls.__module__}.{cls.__qualname__}" in qualnames:
            return cls
    return None
