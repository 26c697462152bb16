"""``fastrms.torch.RMSprop``: a drop-in ``torch.optim.RMSprop`` whose step is one fused kernel call
per param group and dtype.

It is a ``torch.optim.Optimizer`` with ``torch.optim.RMSprop``'s signature, defaults, state
layout and formula (``docs/algorithm.md`` with ``beta = alpha``, epsilon outside the root,
coupled weight decay, the learning rate outside the momentum buffer)::

    g <- -grad if maximize else grad;   g <- g + weight_decay * p
    v <- alpha * v + (1 - alpha) * g^2
    centered: m <- alpha * m + (1 - alpha) * g;   s = max(v - m^2, 0)   else s = v
    u = g / (sqrt(s) + eps)
    momentum: b <- momentum * b + u;   p <- p - lr * b        else p <- p - lr * u

Params, grads and state are CPU tensors of float32 or float64; the kernel reads and writes
their memory in place (no copies), so tensors must be dense: contiguous, or dense in another
memory format (channels-last) with the grad laid out like its param. Params without a grad
are skipped, as torch skips them. ``state_dict()`` is torch's, key for key, and loads into
``torch.optim.RMSprop`` (and the reverse).

The kernel writes through raw pointers, which torch's autograd cannot see, so after each step
the version counters of the params and state are bumped explicitly
(``torch.autograd.graph.increment_version``): a graph that saved a param before the step and
runs backward after it raises torch's usual "modified by an inplace operation" error, as it
would with ``torch.optim.RMSprop``.

Importing ``fastrms`` never imports torch; importing ``fastrms.torch`` without torch raises
one ImportError saying what to install.
"""

try:
    import torch
except ImportError:  # pragma: no cover - exercised in a subprocess without torch
    raise ImportError(
        "fastrms.torch needs PyTorch; install it with: pip install 'fastrms[torch]' (torch==2.13.0, the CPU build)"
    ) from None

import functools
import operator

import numpy as np

from . import kernels, runtime
from . import options as O

__all__ = ["RMSprop"]

_NUMPY = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
_GRAD = operator.attrgetter("grad")
_DATA_PTR = torch.Tensor.data_ptr
#: torch's names for the options it shares with fastrms (the rest are the same name).
_TORCH_NAMES = {"learning_rate": "lr", "beta": "alpha", "epsilon": "eps"}


def _dense(t):
    """Whether ``t``'s elements fill ``numel`` consecutive slots of memory (contiguous, or a
    permutation of a contiguous layout such as channels-last), with no overlap."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda pair: pair[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


class RMSprop(torch.optim.Optimizer):
    """``torch.optim.RMSprop``, fused: one Numba kernel call per param group and dtype.

    Parameters are torch's: ``lr`` (float or a 1-element tensor), ``alpha``, ``eps``,
    ``weight_decay``, ``momentum``, ``centered``, ``maximize``, each per param group.
    ``capturable=True`` and ``differentiable=True`` are refused (CUDA graphs and a
    differentiable step are not what a fused CPU kernel does); ``foreach`` is accepted and
    ignored: the step is fused anyway.

    Each ``step`` checks every grad first (sparse, non-CPU, float16/bfloat16/complex, a
    dtype, shape or layout unlike its param raise a TypeError/ValueError naming the param),
    then steps: a rejected step changes nothing.

    ``flatten=True`` (keyword-only, fastrms's own) moves the params of each group and dtype
    that require grad into one contiguous buffer (each ``p.data`` becomes a view of it, so a
    channels-last param becomes contiguous), gives each a grad that is a view of one grad
    buffer, and keeps the state in flat buffers too, as DeepSpeed's and apex's contiguous
    gradients do. Backward then accumulates straight into the grad buffer, and a step is one
    dense kernel call over it: one flat array's cost. ``zero_grad`` zeroes the grad buffer in
    place whatever ``set_to_none`` says (a grad set to None would end that). If a grad is
    replaced by another tensor anyway, the step notices and takes the per-tensor path.
    """

    def __init__(
        self,
        params,
        lr: "float | torch.Tensor" = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: "bool | None" = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        flatten: bool = False,
    ) -> None:
        if not isinstance(flatten, bool):
            raise TypeError(f"flatten must be True or False, got {type(flatten).__name__}")
        self._flatten = flatten
        self._buckets = []  # per param group: the flat buffers of its params, by dtype (flatten=True)
        self._flat_slot = {}  # param -> (bucket, index), for the params that live in a bucket
        self._loose = []  # per param group: (index, param) of the params in no bucket
        defaults = dict(
            lr=lr,
            momentum=momentum,
            alpha=alpha,
            eps=eps,
            centered=centered,
            weight_decay=weight_decay,
            capturable=capturable,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
        )
        self._hyper_cache = {}
        self._tables = {}
        self._layouts = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group``, with the group's options and params checked here."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param_groups[{len(self.param_groups) - 1}]"
        for j, p in enumerate(group["params"]):
            self._check_param(p, f"{where}['params'][{j}]")
        self._hyperparameters(group, where, tuple(dict.fromkeys(_NUMPY[p.dtype] for p in group["params"])))
        buckets = {}
        if self._flatten:
            trained = [p for p in group["params"] if p.requires_grad and p not in self._flat_slot]
            for dtype in dict.fromkeys(p.dtype for p in trained):
                bucket = buckets[dtype] = _Bucket([p for p in trained if p.dtype == dtype])
                for i, p in enumerate(bucket.params):
                    self._flat_slot[p] = (bucket, i)
        self._buckets.append(buckets)
        self._loose.append([(j, p) for j, p in enumerate(group["params"]) if p not in self._flat_slot])

    # ------------------------------------------------------------------ checks

    @staticmethod
    def _check_param(p, name):
        if p.device.type != "cpu":
            raise ValueError(f"{name} is on {p.device}; fastrms.torch.RMSprop steps CPU tensors only")
        if p.dtype not in _NUMPY:
            raise TypeError(
                f"{name} has dtype {p.dtype}; fastrms.torch.RMSprop steps float32 and float64 tensors "
                "(float16, bfloat16 and complex are not supported)"
            )
        if not _dense(p):
            raise ValueError(
                f"{name} is not dense in memory (strides {tuple(p.stride())} for shape {tuple(p.shape)}); "
                "the fused step writes a param's memory in place: make it contiguous first"
            )

    def _hyperparameters(self, group, where, dtypes):
        """The group's options as fastrms's, checked (cached per distinct set)."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError(f"{where}: Tensor lr must be 1-element")
            lr = lr.item()
        if group["capturable"]:
            raise ValueError(f"{where}: capturable=True (CUDA graphs) is not supported by the fused CPU step")
        if group["differentiable"]:
            raise ValueError(f"{where}: differentiable=True is not supported: the fused step is not differentiable")
        key = (lr, group["alpha"], group["eps"], group["weight_decay"], group["momentum"], group["centered"],
               group["maximize"], dtypes)  # fmt: skip
        hyper = self._hyper_cache.get(key)
        if hyper is None:
            given = {
                "learning_rate": lr,
                "beta": group["alpha"],
                "epsilon": group["eps"],
                "weight_decay": group["weight_decay"],
                "momentum": group["momentum"],
                "centered": group["centered"],
                "maximize": group["maximize"],
            }
            try:
                hyper = O.check_hyperparameters(O.resolve(given), dtypes)
            except (TypeError, ValueError) as exc:
                message = str(exc)
                for ours, theirs in _TORCH_NAMES.items():
                    message = message.replace(ours, theirs)
                raise type(exc)(f"{where}: {message}") from None
            if len(self._hyper_cache) > 64:
                self._hyper_cache.clear()
            self._hyper_cache[key] = hyper
        return hyper

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure=None):
        """One fused step over every param that has a grad; returns ``closure()``'s loss (the
        closure is called with grad enabled, as torch does) or None."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = [self._plan(i, group) for i, group in enumerate(self.param_groups)]  # every check first
        bumped, steps = [], []
        for hyper, members, flat in plans:
            for bucket in flat:
                bucket.step(hyper, self._parallel, bumped)
            for dtype, rows in members.items():
                self._run(hyper, dtype, rows, bumped, steps)
        if steps:
            kernels.increment_float32(np.array(steps, dtype=np.int64))  # each param's float32 ``step`` += 1
        if bumped:
            torch.autograd.graph.increment_version(bumped)
        return loss

    def _plan(self, gi, group):
        """The group's checked options and, per dtype, the rows ``(pointers, size, tensors to
        bump, step tensor address)`` of its params that have a grad. The common case (dense
        grad and param, both contiguous) costs a few C calls per param; torch itself keeps a
        grad's dtype, shape and device equal to its param's, and the size is checked again."""
        members = {}
        names = None
        flat = []  # flatten=True: whole buckets whose params and grads are still the buffers' views
        for bucket in self._buckets[gi].values():
            if bucket.tiles():
                hyper = self._hyperparameters(group, f"param_groups[{gi}]", (_NUMPY[bucket.dtype],))
                bucket.prepare(hyper, self._layout)
                flat.append(bucket)
        if len(flat) == len(self._buckets[gi]):  # every bucket tiles: only the params outside them remain
            candidates = self._loose[gi]
        else:
            skip = {id(p) for bucket in flat for p in bucket.params}
            candidates = [(j, p) for j, p in enumerate(group["params"]) if id(p) not in skip]
        for j, p in candidates:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse or not (g.is_contiguous() and p.is_contiguous()):
                self._check_pair(p, g, f"param_groups[{gi}]['params'][{j}]")
            rows = members.get(p.dtype)
            if rows is None:
                if p.dtype not in _NUMPY or p.device.type != "cpu":
                    self._check_param(p, f"param_groups[{gi}]['params'][{j}]")
                rows = members[p.dtype] = []
                if names is None:
                    hyper = self._hyperparameters(group, f"param_groups[{gi}]", (_NUMPY[p.dtype],))
                    names = O.state_names(hyper)
            address = p.data_ptr()
            state_ptrs, tensors, step, numel = self._layout(p, names, address)
            if g.dtype is not p.dtype or g.numel() != numel:
                raise ValueError(
                    f"param_groups[{gi}]['params'][{j}]: its grad is {g.dtype} {tuple(g.shape)}, "
                    f"the param {p.dtype} {tuple(p.shape)}"
                )
            rows.append(((address, g.data_ptr(), *state_ptrs), numel, p, tensors, step))
        dtypes = tuple(dict.fromkeys([*(_NUMPY[d] for d in members), *(_NUMPY[b.dtype] for b in flat)]))
        return self._hyperparameters(group, f"param_groups[{gi}]", dtypes), members, flat

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def _parallel_choice(size, itemsize, state_arrays, generation):
        big = kernels.step_bytes(size, itemsize, state_arrays) >= kernels.PARALLEL_MIN_BYTES
        if not big:
            return False
        mode = runtime.parallel_mode()
        return False if mode == "serial" else ("serialized" if mode == "serialized" else True)

    @staticmethod
    def _parallel(size, itemsize, hyper):
        """The parallel mode's answer for a step of ``size`` elements: False, True, or
        ``"serialized"`` (cached until :func:`fastrms.runtime.generation` changes)."""
        states = 1 + bool(hyper["centered"]) + bool(hyper["momentum"])
        return RMSprop._parallel_choice(size, itemsize, states, runtime.generation())

    def _check_pair(self, p, g, name):
        """The slow path: a sparse grad, or a param or grad that is not contiguous."""
        if g.is_sparse or g.layout != torch.strided:
            raise ValueError(f"{name} has a sparse grad; RMSprop does not support sparse gradients")
        self._check_param(p, name)
        if g.stride() != p.stride() and p.numel() > 1:
            raise ValueError(
                f"{name}: its grad has strides {tuple(g.stride())}, its param {tuple(p.stride())}; the fused "
                "step reads them element for element, so they must be laid out alike (make both contiguous)"
            )

    def _layout(self, p, names, address):
        """``(state pointers, state tensors, step tensor, numel)`` of ``p``: its state created
        as torch creates it (a buffer the options need and the state lacks, after momentum or
        centering is switched on mid-run, starts at zero) and checked to be laid out like
        ``p``; cached until the state is replaced (:meth:`load_state_dict`) or ``p.data`` is."""
        cached = self._layouts.get(p)
        if cached is not None and cached[0] == names and cached[1] == address:
            return cached[2]
        state = self.state[p]
        slot = self._flat_slot.get(p)
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32) if slot is None else slot[0].steps[slot[1]]
        tensors = []
        for name in names:
            if name not in state:
                if slot is None:
                    state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
                else:
                    state[name] = slot[0].state_view(name, slot[1])
            t = state[name]
            if not isinstance(t, torch.Tensor) or t.dtype != p.dtype or t.shape != p.shape or t.device != p.device:
                raise ValueError(f"the state {name!r} of a param of shape {tuple(p.shape)} is not a tensor like it")
            if t.stride() != p.stride() and p.numel() > 1:
                raise ValueError(f"the state {name!r} of a param of shape {tuple(p.shape)} is not laid out like it")
            tensors.append(t)
        ptrs = [0, 0, 0]
        for name, t in zip(names, tensors):
            ptrs[("square_avg", "grad_avg", "momentum_buffer").index(name)] = t.data_ptr()
        step = state["step"]
        if not (isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.numel() == 1):
            step = state["step"] = torch.tensor(float(step), dtype=torch.float32)  # as torch's __setstate__
        layout = (tuple(ptrs), tensors, step.data_ptr(), p.numel())
        self._layouts[p] = (names, address, layout)
        return layout

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict`` (a ``torch.optim.RMSprop`` state dict loads as is). With
        ``flatten=True`` the loaded values are copied into the flat state buffers."""
        super().load_state_dict(state_dict)
        self._layouts.clear()
        for p, (bucket, i) in self._flat_slot.items():
            state = self.state.get(p)
            if state:
                bucket.adopt(i, state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; the grads of flattened params (``flatten=True``) are zeroed
        in place in their buffer, and a grad replaced since is made a view of it again."""
        if not self._flat_slot:
            return super().zero_grad(set_to_none)
        for buckets in self._buckets:
            for bucket in buckets.values():
                bucket.zero_grads()
        for group in self.param_groups:
            for p in group["params"]:
                if p not in self._flat_slot and p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().zero_()

    def _run(self, hyper, dtype, rows, bumped, steps):
        """One kernel call for the rows (:meth:`_plan`) of one group and dtype."""
        key = O.variant_key(hyper)
        ptrs = np.array([row[0] for row in rows], dtype=np.int64)
        table = tuple(row[1] for row in rows)
        sizes = np.array(table, dtype=np.int64)
        for _, _, p, tensors, step in rows:
            bumped.append(p)
            bumped.extend(tensors)
            steps.append(step)
        chunks = self._tables.get(table)
        if chunks is None:
            if len(self._tables) > 256:
                self._tables.clear()
            chunks = self._tables[table] = kernels.chunk_table(sizes)
        witness = np.empty(0, dtype=_NUMPY[dtype])
        parallel = self._parallel(int(sizes.sum()), witness.itemsize, hyper)
        shell = kernels.segments(key, bool(parallel))
        if parallel == "serialized":
            shell = runtime.serialized(shell)
        shell(witness, ptrs, sizes, chunks, *O.scalars(hyper, hyper["learning_rate"], 1))


class _Bucket:
    """The params of one group and dtype in one flat buffer (``flatten=True``): each
    ``p.data`` and ``p.grad`` a view of the param and grad buffers, the state flat buffers
    whose views are the per-param state torch's ``state_dict`` holds, and the per-param
    ``step`` counters views of one float32 vector."""

    def __init__(self, params):
        self.params = params
        self.dtype = params[0].dtype
        self.sizes = [p.numel() for p in params]
        self.offsets = np.concatenate(([0], np.cumsum(self.sizes)[:-1])).astype(int).tolist()
        n = sum(self.sizes)
        self.param_flat = torch.empty(n, dtype=self.dtype)
        self.grad_flat = torch.zeros(n, dtype=self.dtype)
        self.grads = []
        with torch.no_grad():
            for p, o, k in zip(params, self.offsets, self.sizes):
                view = self.param_flat[o : o + k].view(p.shape)
                view.copy_(p)
                p.data = view
                grad = self.grad_flat[o : o + k].view(p.shape)
                if p.grad is not None:
                    grad.copy_(p.grad)
                p.grad = grad
                self.grads.append(grad)
        self.addresses = [p.data_ptr() for p in params]
        self.param_np, self.grad_np = self.param_flat.numpy(), self.grad_flat.numpy()
        self.state, self.state_np = {}, {}
        self.steps = torch.zeros(len(params), dtype=torch.float32)
        self.steps_np = self.steps.numpy()
        self.names = self.hyper = self.key = self.scalars = None

    def tiles(self):
        """Whether every param and grad is still the view this bucket made (two reads per
        param: the grad object and the data address)."""
        params = self.params
        return all(map(operator.is_, map(_GRAD, params), self.grads)) and list(map(_DATA_PTR, params)) == self.addresses

    def state_view(self, name, i):
        """Param ``i``'s view of state buffer ``name`` (zeros, as torch starts it)."""
        if name not in self.state:
            self.state[name] = torch.zeros(self.param_flat.numel(), dtype=self.dtype)
            self.state_np[name] = self.state[name].numpy()
        o, k = self.offsets[i], self.sizes[i]
        return self.state[name][o : o + k].view(self.params[i].shape)

    def prepare(self, hyper, layout):
        """Make sure every param's state exists as views of the buffers (once per set of
        options; ``layout`` is the optimizer's, which creates and checks it)."""
        if hyper is self.hyper:  # the optimizer caches each distinct set of options: one object
            return
        names = O.state_names(hyper)
        if self.names != names:
            for p in self.params:
                layout(p, names, p.data_ptr())
            self.names = names
        self.hyper, self.key = hyper, O.variant_key(hyper)
        self.scalars = O.scalars(hyper, hyper["learning_rate"], 1)

    def adopt(self, i, state):
        """After ``load_state_dict``: copy param ``i``'s loaded state into the buffers and
        point the state at their views again."""
        with torch.no_grad():
            for name in ("square_avg", "grad_avg", "momentum_buffer"):
                if name in state:
                    view = self.state_view(name, i)
                    view.copy_(state[name])
                    state[name] = view
            if "step" in state:
                self.steps[i] = float(state["step"])
                state["step"] = self.steps[i]
        self.names = self.hyper = None

    def zero_grads(self):
        self.grad_flat.zero_()
        for p, grad in zip(self.params, self.grads):
            if p.grad is not grad:
                p.grad = grad

    def step(self, hyper, parallel_mode, bumped):
        """One dense kernel call over the whole bucket (after :meth:`prepare`)."""
        key = self.key
        parallel = parallel_mode(self.param_np.size, self.param_np.itemsize, hyper)
        empty = self.param_np[:0]
        arrays = (
            self.param_np,
            self.grad_np,
            self.state_np["square_avg"],
            self.state_np.get("grad_avg", empty) if key.uses_grad_avg else empty,
            self.state_np.get("momentum_buffer", empty) if key.uses_momentum_buffer else empty,
        )
        shell = kernels.dense(key, bool(parallel))
        if parallel == "serialized":
            shell = runtime.serialized(shell)
        shell(*arrays, *self.scalars)
        self.steps_np += np.float32(1.0)
        bumped.append(self.param_flat)  # views share their base's version counter
        bumped.extend(self.state[name] for name in self.names)
