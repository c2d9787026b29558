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
from . import (
    hf_bert, hf_gemma, hf_gpt2, hf_llama, hf_mistral, hf_qwen2, hf_qwen3, hf_vit, peft_lora, timm_beit,
    timm_convnext, timm_eva, timm_swin, timm_vit, torch_nn,
)

# Most specific first: a family's blocks before the torch.nn layers inside them.
ADAPTERS = [
    timm_vit.ADAPTER,
    timm_eva.ADAPTER,
    timm_beit.ADAPTER,
    timm_convnext.ADAPTER,
    timm_swin.ADAPTER,
    hf_llama.ADAPTER,
    hf_qwen2.ADAPTER,
    hf_qwen3.ADAPTER,
    hf_mistral.ADAPTER,
    hf_gemma.ADAPTER,
    hf_gpt2.ADAPTER,
    hf_bert.ADAPTER,
    hf_vit.ADAPTER,
    peft_lora.ADAPTER,
    torch_nn.ADAPTER,
]


class StepOptions:
    """The step options of a converted root's forward call (picklable: adapters by name, the
    family's model by its path inside the root, e.g. a Hugging Face model inside a PEFT wrapper)."""

    def __init__(self, found, layout, always_keep):
        self.found, self.layout, self.always_keep = found, layout, always_keep

    def __call__(self, root, args, kwargs):
        options = {"layout": self.layout, "always_keep": tuple(self.always_keep), "layouts": {}}
        for adapter in ADAPTERS:
            if adapter.name in self.found:
                model = root.get_submodule(self.found[adapter.name])
                found = adapter.root_options(model, args, kwargs) or {}
                options["layouts"].update(found.get("layouts", {}))
                options["always_keep"] += tuple(found.get("always_keep", ()))
        return options


def step_options(root, layout, always_keep):
    """The StepOptions of a converted root: for each family, the outermost model of it inside the
    root (the root itself, usually), and the user's layout and always-kept positions."""
    found = {}
    for path, m in root.named_modules():
        for adapter in ADAPTERS:
            if adapter.name not in found and adapter.root_options(m, None, None) is not None:
                found[adapter.name] = path
    return StepOptions(found, layout, always_keep)
