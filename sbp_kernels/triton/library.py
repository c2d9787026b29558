"""How the Triton launchers become torch.library ops (`kernel_op`).

Where the kernels compile (a GPU), a launcher is a `torch.library.triton_op` whose launches go
through `torch.library.wrap_triton`: under torch.compile, where AOTAutograd traces a call of the
launcher (the backward formulas, the row gathers the forward saves), the launches become part of
the graph, so inductor sees the Triton kernels themselves and calls them from its generated code,
with no custom op dispatched from Python in between; eagerly the op launches them directly. (A
launcher called inside an opaque forward op, e.g. sbp::attention_forward's, runs eagerly there.) Under
TRITON_INTERPRET=1 (the CPU tests) interpreted kernels cannot be traced (wrap_triton passes them
through as they are), so there the launcher is a plain `torch.library.custom_op`, opaque to the
compiler. Either way the fake kernel registered on the op gives the output shapes: fake-tensor
propagation never runs a launcher.
"""
import torch

from ..backend import triton_interpreted


def kernel_op(name):
    """Decorator: the launcher `fn` as the torch.library op sbp::<...> `name` (see the module
    docstring); mutates nothing but the outputs it allocates."""

    def declare(fn):
        if triton_interpreted():
            return torch.library.custom_op(name, fn, mutates_args=())
        return torch.library.triton_op(name, fn, mutates_args=())

    return declare
