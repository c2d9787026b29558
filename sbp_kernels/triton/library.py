"""How the Triton launchers become torch.library ops (`kernel_op`), are called (`call`) and launch
their kernels (`traceable`).

Where the kernels compile (a GPU), a launcher is a `torch.library.triton_op`: under torch.compile,
where AOTAutograd traces a call of the launcher (the backward formulas, the row gathers the forward
saves), its launches go through `torch.library.wrap_triton` and become part of the graph, so
inductor sees the Triton kernels themselves and calls them from its generated code, with no custom
op dispatched from Python in between. (A launcher called inside an opaque forward op, e.g.
sbp::attention_forward's, runs eagerly there.) Under TRITON_INTERPRET=1 (the CPU tests) interpreted
kernels cannot be traced (wrap_triton passes them through as they are), so there the launcher is a
plain `torch.library.custom_op`, opaque to the compiler. Either way the fake kernel registered on
the op gives the output shapes: fake-tensor propagation never runs a launcher.

Eagerly, on plain tensors outside any trace or dispatch mode, nothing needs to see the op: `call`
runs the launcher directly, which skips the custom-op dispatch (about 6 us a call, paid at each
launch of an eager GPU step), and `traceable` hands out the kernel itself.
"""
import torch
from torch.library import wrap_triton

from ..backend import triton_interpreted

_launchers = {}  # op -> its launcher


def kernel_op(name):
    """Decorator: the launcher `fn` as the torch.library op `name` (see the module docstring), which
    mutates nothing but the outputs it allocates; returns the op (register its fake kernel on it)."""

    def declare(fn):
        declare_op = torch.library.custom_op if triton_interpreted() else torch.library.triton_op
        op = declare_op(name, fn, mutates_args=())
        _launchers[op] = fn
        return op

    return declare


def call(op, *args):
    """op(*args) for an op of kernel_op; its launcher directly where nothing needs to see the op."""
    if torch._C._len_torch_dispatch_stack() == 0 and not torch.compiler.is_compiling() and _plain(args):
        return _launchers[op](*args)
    return op(*args)


def _plain(args):
    """No argument is a tensor subclass (a fake or functional tensor) or a meta tensor."""
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) is not torch.Tensor or a.is_meta):
            return False
    return True


def traceable(kernel):
    """The kernel a launcher launches: wrap_triton(kernel) while AOTAutograd functionalizes the
    launcher (the launch becomes a node of the graph), else the kernel itself."""
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FUNCTIONAL) is None:
        return kernel
    return wrap_triton(kernel)
