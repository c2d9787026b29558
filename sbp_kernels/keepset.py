"""One step, one keep set (DESIGN.md section 2): SBP layers that see the same position count in
one forward pass share the same kept positions, as the paper found best.

`step(...)` opens a Step in which every SBP module asks `keep_idx_for(n, ...)` for its keep set.
A Step draws one seed from its generator (the package's own unless given one: keep-set draws never
touch the global RNG), and the keep set of n positions is a function of that seed and n alone, so
it does not depend on which layer asks first. Models converted with `sbp_kernels.convert` open a
Step at every forward call of the converted root module, unless one is open already.

Recomputation replays the forward's keep sets (DESIGN.md 2):
- inside an open step (the package's recompute mode, or a backward run inside the user's step)
  the step simply answers again;
- torch.utils.checkpoint (reentrant or not) recomputes in backward, after the step has closed.
  Its contract for randomness is that it restores the global RNG state of the forward before
  recomputing (preserve_rng_state=True, the default). So wherever a forward might be recomputed
  (an SBP module in training mode under a saved-tensors hook, as non-reentrant checkpointing
  installs, or under no_grad, as reentrant checkpointing runs), the step is remembered under a
  fingerprint of the global RNG state, and a keep set asked for during backward with no step
  open comes from the step remembered under the current fingerprint. The global RNG is only read,
  never advanced.

Keep sets the package draws are valid by construction; explicit ones (`step(keep_idx=...)`) are
copied when the step opens and validated once per position count, so they are private to the
package: the ops' value checks are skipped for them (validation.py).

A step also caches the gathered kept rows of tensors that several ops read (q / k / v and gate /
up projections of one input, a LoRA adapter beside its base layer, the attention output and the
projection after it), so that they save ONE copy between them (`gather`).
"""
import collections
import contextlib
import math
import numbers
import threading
import weakref

import torch

from . import sampling
from .backend import compiled_autograd_configured
from .validation import check_keep_idx, is_fake, trust, trust_if_valid, values_unavailable


class _Local(threading.local):
    def __init__(self):
        self.stack = []  # the open steps, innermost last


_local = _Local()
_CPU = torch.device("cpu")
_REPLAY_SLOTS = 64  # steps remembered for checkpoint recomputation (a few per training step)


class Step:
    """The keep sets of one step, drawn lazily per position count (see the module docstring)."""

    def __init__(self, keep_ratio=None, strategy=None, layout=None, generator=None, keep_idx=None,
                 always_keep=(), layouts=None):
        if keep_ratio is not None:
            sampling.check_ratio(keep_ratio)
        if strategy is not None and strategy not in sampling.SETTING_STRATEGIES:
            raise ValueError(f"strategy must be one of {sampling.SETTING_STRATEGIES}, got {strategy!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.keep_ratio, self.strategy = keep_ratio, strategy
        self.layout = None if layout is None else sampling.check_layout(layout)
        self.layouts = dict(layouts or {})  # n -> layout of exactly those n positions (a model's own)
        self.fixed = _copy_fixed(keep_idx)
        self.always_keep = check_positions(always_keep, "always_keep")
        self._generator = generator
        self._seed = None
        self._sets = {}  # (n, torch.device) -> keep_idx
        self._gathers = {}  # see gather()
        self.compiled_autograd = compiled_autograd_configured()  # asked once (ops/_common.cpp_eager)
        self._gathered_from = {}  # id(x) -> (weak ref to x, keep_idx, dim, version, shape, kept): see gather()

    def get(self, n, device, keep_ratio, strategy="grid", layout=None):
        """The keep set of n positions on `device` (the module's keep_ratio / strategy / layout
        serve unless the step fixes them)."""
        key = (n, device)
        keep = self._sets.get(key)
        if keep is None:
            with _real_tensors():
                fixed = self._fixed(n)
                if fixed is not None and fixed.device == device:
                    # Served as it is (trusted since the step opened): a compiled graph takes it as an
                    # input, and no op reads its values (validation.trust).
                    source = fixed
                else:
                    source = self._sets.get((n, _CPU))
                    if source is None:
                        source = fixed.cpu() if fixed is not None else self._draw(n, keep_ratio, strategy, layout)
                        self._sets[(n, _CPU)] = _trusted_on_cpu(source)
            keep = self._sets[key] = source.to(device)
            if keep is not source and source.is_cpu:
                _trusted_on_cpu(source, keep)
        return keep

    def _fixed(self, n):
        """The step's copy of the caller's keep set for n positions, checked for n; None without one."""
        if self.fixed is None:
            return None
        keep = self.fixed.get(n) if isinstance(self.fixed, dict) else self.fixed
        if keep is None:
            raise ValueError(
                f"keep_idx gives keep sets for {sorted(self.fixed)} positions, but a layer has n={n} positions"
            )
        check_keep_idx(keep, n, keep.device)
        return keep

    def _draw(self, n, keep_ratio, strategy, layout):
        keep_ratio = self.keep_ratio if self.keep_ratio is not None else keep_ratio
        strategy = self.strategy if self.strategy is not None else strategy
        if layout is None:
            layout = self.layouts.get(n)
        if layout is None and self.layout is not None and _fits(self.layout, n):
            layout = self.layout
        generator = torch.Generator().manual_seed(hash((self.seed(), n)) & (2**63 - 1))
        keep = draw(n, keep_ratio, strategy, layout, generator)
        return _with_always_kept(keep, self.always_keep, n)

    def adopt(self, options):
        """Takes a converted model's layouts and always-kept tokens into a step the user opened
        (what the user set, a layout or fixed keep sets, still wins)."""
        for n, layout in options.get("layouts", {}).items():
            self.layouts.setdefault(n, layout)
        extra = tuple(p for p in options.get("always_keep", ()) if p not in self.always_keep)
        self.always_keep += extra

    def seed(self):
        """The step's seed, drawn once from its generator (the package's own by default)."""
        if self._seed is None:
            generator = self._generator or sampling.default_generator()
            self._seed = int(torch.randint(2**62, (1,), generator=generator))
        return self._seed

    def gather(self, x, keep_idx, dim, gather_fn):
        """x's kept rows along dim, computed once per step for each (tensor, keep set).

        The same tensor object again (q / k / v projections of one input) is found by identity.
        Views with the same storage, offset, shape and strides hit the same entry (the attention
        output and the projection's input are two views of one buffer). An entry is valid while
        the tensor it was taken from is alive and unchanged (weak reference and version); nothing
        here keeps an activation alive.
        """
        same = self._gathered_from.get(id(x))
        if (same is not None and same[0]() is x and same[1] is keep_idx and same[2] == dim
                and same[3] == x._version and same[4] == x.shape):
            return same[5]
        if not _cacheable(x):
            return gather_fn(x, keep_idx, dim)
        base = x if x._base is None else x._base
        key = (id(base), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype, dim % x.dim(), id(keep_idx))
        hit = self._gathers.get(key)
        if hit is not None and hit[0]() is base and hit[1]() is keep_idx and hit[2] == base._version:
            kept = hit[3]
        else:
            kept = gather_fn(x, keep_idx, dim)
            self._gathers[key] = (weakref.ref(base), weakref.ref(keep_idx), base._version, kept)
        # The shape too: `x.data = ...` swaps the data of the same object without a new version.
        self._gathered_from[id(x)] = (weakref.ref(x), keep_idx, dim, x._version, x.shape, kept)
        return kept

    def close(self):
        self._gathers.clear()  # kept rows live on in the autograd graph only
        self._gathered_from.clear()


def _trusted_on_cpu(cpu, keep=None):
    """trust(keep) (cpu itself by default), a keep set of the package's own known valid, with the
    largest position read off its CPU copy; nothing where values cannot be read (tracing, fake
    tensors). Returns cpu."""
    if not values_unavailable(cpu):
        with _real_tensors():  # its value, also in a step under FakeTensorMode
            last = int(cpu[-1])
        trust(cpu if keep is None else keep, last)
    return cpu


def _real_tensors():
    """Keep sets are drawn with real tensors (their values are read as Python ints), also when the
    step runs under FakeTensorMode (a simulated step at full shapes, bench/simulate.py). (A
    compiled graph's keep sets are fixed by a step opened outside it: nothing to unset there.)"""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch._subclasses.fake_tensor.unset_fake_temporarily()


def _cacheable(x):
    if torch.compiler.is_compiling() or x.is_meta or x.is_inference():
        return False
    # A fake tensor outside a graph trace is an eager step under FakeTensorMode (a simulated step,
    # bench/simulate.py): it shares gathers as the real step does.
    return not is_fake(x) or not _tracing()


def _tracing():
    """Whether a graph is being traced (make_fx / AOTAutograd: a proxy or functional mode is on)."""
    keys = torch._C._TorchDispatchModeKey
    return any(torch._C._get_dispatch_mode(k) is not None for k in (keys.PROXY, keys.FUNCTIONAL))


def _copy_fixed(keep_idx):
    """A private copy of explicit keep sets: a tensor, or {position count: tensor}."""
    if keep_idx is None:
        return None
    if isinstance(keep_idx, dict):
        fixed = {}
        for n, idx in keep_idx.items():
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
                raise ValueError(f"keep_idx keys must be positive position counts, got {n!r}")
            fixed[int(n)] = _copy_fixed(idx)
        return fixed
    if not isinstance(keep_idx, torch.Tensor):
        raise TypeError(f"keep_idx must be a tensor, a dict {{n: tensor}} or None, got {type(keep_idx).__name__}")
    return trust_if_valid(keep_idx.detach().clone())


def check_positions(positions, name):
    if isinstance(positions, numbers.Integral) and not isinstance(positions, bool):
        positions = (positions,)
    try:
        positions = tuple(positions)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of int positions, got {type(positions).__name__}") from None
    if not all(isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in positions):
        raise TypeError(f"{name} must hold int positions, got {positions!r}")
    return tuple(int(p) for p in positions)


def _with_always_kept(keep, positions, n):
    """keep plus the given positions (negative ones count from n), those inside [0, n)."""
    extra = [p % n for p in positions if -n <= p < n]
    if not extra:
        return keep
    return torch.cat([keep, torch.tensor(extra, dtype=keep.dtype)]).unique(sorted=True)


def _fits(layout, n):
    """A step's layout serves n positions when they are its positions plus fewer prefix tokens
    (a ViT's class / register tokens): other position counts (a convnet's other stages) do not
    use it."""
    m = math.prod(layout)
    return m <= n < 2 * m


def draw(n, keep_ratio, strategy, layout=None, generator=None, device=None):
    """A keep set of n positions. With a layout of m <= n positions, the first n - m tokens (a
    ViT's class / register tokens) are always kept and the layout's positions follow them.
    strategy "auto": grid with a layout, random without (see sampling.SETTING_STRATEGIES)."""
    if strategy == "auto":
        strategy = "random" if layout is None else "grid"
    if layout is None:
        return sampling.sample_keep_indices((n,), keep_ratio, strategy, generator, device)
    if isinstance(layout, sampling.Windowed):
        return sampling.sample_windowed(layout, keep_ratio, strategy, generator, device)
    prefix = n - math.prod(layout)
    idx = sampling.sample_keep_indices(layout, keep_ratio, strategy, generator, device)
    if prefix == 0:
        return idx
    return torch.cat([torch.arange(prefix, device=idx.device), idx + prefix])


def current():
    """The innermost open Step, or None."""
    stack = _local.stack
    return stack[-1] if stack else None


@contextlib.contextmanager
def step(keep_ratio=None, strategy=None, layout=None, generator=None, keep_idx=None, always_keep=()):
    """Shares one keep set per position count among all SBP layers run inside the block.

    keep_ratio / strategy override the modules' own; layout ((H, W) or (T, H, W)) lays out the
    last prod(layout) tokens for grid sampling of any position count n with
    prod(layout) <= n < 2 prod(layout), the n - prod(layout) tokens before them are always kept
    (a ViT's class token); generator: the CPU torch.Generator of this step's draws (default: the
    package's, see sampling.default_generator); keep_idx fixes the indices themselves: one tensor
    for every position count, or {n: tensor} per position count (a multi-stage model, fixed keep
    sets under torch.compile); it is copied when the step opens. always_keep: positions (negative
    ones from the end) added to every drawn keep set, e.g. the token a classifier reads.
    """
    with enter(Step(keep_ratio, strategy, layout, generator, keep_idx, always_keep)) as s:
        yield s


@contextlib.contextmanager
def enter(s):
    """Makes the Step s current for the block (a step may be entered again, e.g. to recompute)."""
    stack = _local.stack
    stack.append(s)
    try:
        yield s
    finally:
        stack.pop()
        if s not in stack:
            s.close()


def keep_idx_for(n, device, keep_ratio, strategy="grid", layout=None):
    """The keep set an SBP module uses for n positions: the open step's; during a recomputation
    in backward, the step of the forward being recomputed; else a fresh draw.

    layout: the module's own knowledge of how the n positions are laid out (a 1x1 conv knows its
    (H, W)); it takes precedence over the step's layout.
    """
    s = current()
    if s is None:
        s = replayed_step()
        if s is None:
            return draw(n, keep_ratio, strategy, layout, device=device)
    elif _may_be_recomputed():
        remember_for_replay(s)
    return s.get(n, device, keep_ratio, strategy, layout)


# --- checkpoint recomputation ----------------------------------------------------------------

_replay = collections.OrderedDict()  # RNG fingerprint -> Step, the newest last
_replay_lock = threading.Lock()


def _rng_fingerprint():
    with _real_tensors():  # the generators' real states, also under FakeTensorMode
        state = torch.get_rng_state().numpy().tobytes()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state += torch.cuda.get_rng_state().numpy().tobytes()
    return hash(state)


def _may_be_recomputed():
    """A forward under a saved-tensors hook (non-reentrant checkpointing) may be recomputed.
    (Not while tracing: a compiled graph's keep sets are fixed by the step opened outside it.)"""
    if torch.compiler.is_compiling():
        return False
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def remember_for_replay(s=None):
    """Remembers the open step under the current RNG fingerprint (see the module docstring).
    Called where a forward may be recomputed by torch.utils.checkpoint."""
    s = s or current()
    if s is None:
        return
    key = _rng_fingerprint()
    with _replay_lock:
        _replay[key] = s
        _replay.move_to_end(key)
        while len(_replay) > _REPLAY_SLOTS:
            _replay.popitem(last=False)


def replayed_step():
    """During backward (a checkpoint recomputation), the step remembered under the current RNG
    fingerprint, else None."""
    if torch.compiler.is_compiling() or torch._C._current_autograd_node() is None:
        return None
    with _replay_lock:
        return _replay.get(_rng_fingerprint())


def open_step_unless_open(options):
    """What convert's root hooks enter: None when a step is open already (the user's, which then
    learns the model's layouts and always-kept tokens, see Step.adopt); during a checkpoint
    recomputation the forward's step again; else a new Step(**options())."""
    s = current()
    if s is not None:
        s.adopt(options())
        return None
    return replayed_step() or Step(**options())
