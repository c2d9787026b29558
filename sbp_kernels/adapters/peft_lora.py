"""PEFT LoRA layers (peft.tuners.lora: Linear around a base nn.Linear, with lora_A / lora_B per
adapter and an optional dropout), around any converted family's projections.

The layer's own forward runs (adapters, scaling, DoRA checks and all); its parts are SBP: the
base layer, whose weight is frozen, saves NOTHING for backward (its input gradient needs only the
weight) and computes no weight gradient; lora_A saves the kept rows of its input (shared with any
other reader of the same tensor in the step), lora_B the kept rows of the rank-r activation; the
dropout saves its kept rows' mask. A DoRA layer (use_dora) stays dense: its magnitude term reads
the whole weight and input.
"""
from .common import convert_dropout, convert_linear, is_class

LAYERS = ("peft.tuners.lora.layer.Linear",)


class PeftLora:
    name = "peft.lora"

    def matches(self, m):
        return is_class(m, *LAYERS)

    def convert(self, m, name, converter):
        if any(getattr(m, "use_dora", {}).values()):
            converter.dense(name, m, "DoRA's magnitude term reads the whole weight and input")
            return
        if not convert_linear(m.base_layer, f"{name}.base_layer", converter):
            converter.dense(f"{name}.base_layer", m.base_layer, f"{type(m.base_layer).__name__} is not a plain Linear")
        for adapter_name in m.lora_A:
            convert_linear(m.lora_A[adapter_name], f"{name}.lora_A.{adapter_name}", converter)
            convert_linear(m.lora_B[adapter_name], f"{name}.lora_B.{adapter_name}", converter)
            convert_dropout(m.lora_dropout[adapter_name], f"{name}.lora_dropout.{adapter_name}", converter)

    def root_options(self, root, args, kwargs):
        return None


ADAPTER = PeftLora()
