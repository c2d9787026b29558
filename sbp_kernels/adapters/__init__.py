"""Model-family adapters (DESIGN.md 5): one file per family, one protocol.

An adapter is an object with
- `name`: the family;
- `matches(module) -> bool`: whether a module is one the family converts as a whole (recognised
  by its class, by name, so the libraries stay optional imports);
- `convert(module, name, converter)`: converts it in place (converter.swap, converter.dense for
  what stays dense, converter.visit for children it leaves to other adapters);
- `root_options(root, args, kwargs) -> dict | None`: for a model of the family converted as a
  whole, the step options of one forward call: `layouts` {n: layout} of its positions (a ViT's
  patch grid after its class / register tokens, which are then always kept) and `always_keep`
  positions (the token a classifier reads).
`convert` walks the model top-down and hands each module to the first adapter that matches it,
so adding a family touches one file (and its line in ADAPTERS).
"""
from . import timm_beit, timm_convnext, timm_eva, timm_swin, timm_vit, torch_nn

# Most specific first: a family's blocks before the torch.nn layers inside them.
ADAPTERS = [
    timm_vit.ADAPTER,
    timm_eva.ADAPTER,
    timm_beit.ADAPTER,
    timm_convnext.ADAPTER,
    timm_swin.ADAPTER,
    torch_nn.ADAPTER,
]


class StepOptions:
    """The step options of a converted root's forward call (picklable: adapters by name)."""

    def __init__(self, families, layout, always_keep):
        self.families, self.layout, self.always_keep = families, layout, always_keep

    def __call__(self, root, args, kwargs):
        options = {"layout": self.layout, "always_keep": self.always_keep, "layouts": {}}
        for adapter in ADAPTERS:
            if adapter.name in self.families:
                found = adapter.root_options(root, args, kwargs) or {}
                options["layouts"].update(found.get("layouts", {}))
                options["always_keep"] = tuple(options["always_keep"]) + tuple(found.get("always_keep", ()))
        return options


def step_options(root, layout, always_keep):
    """The StepOptions of a converted root: the families that know the root, the user's layout and
    always-kept positions."""
    families = [a.name for a in ADAPTERS if a.root_options(root, None, None) is not None]
    return StepOptions(families, layout, always_keep)
