"""`fastrms.torch.RMSprop`: a drop-in `torch.optim.RMSprop` whose step is one fused kernel call
per param group and dtype.

It is a `torch.optim.Optimizer` with `torch.optim.RMSprop`'s signature, defaults, state
layout and formula (`docs/algorithm.md` with `beta = alpha`, epsilon outside the root,
coupled weight decay, the learning rate outside the momentum buffer):

    g <- -grad if maximize else grad;   g <- g + weight_decay * p
    v <- alpha * v + (1 - alpha) * g^2
    centered: m <- alpha * m + (1 - alpha) * g;   s = max(v - m^2, 0)   else s = v
    u = g / (sqrt(s) + eps)
    momentum: b <- momentum * b + u;   p <- p - lr * b        else p <- p - lr * u

Params, grads and state are CPU tensors of float32 or float64; the kernel reads and writes
their memory in place (no copies), so tensors must be dense: contiguous, or dense in another
memory format (channels-last) with the grad laid out like its param. Params without a grad
are skipped, as torch skips them. `state_dict()` is torch's, key for key, and loads into
`torch.optim.RMSprop` (and the reverse).

The kernel writes through raw pointers, which torch's autograd cannot see, so after each step
the version counters of the params and state are bumped explicitly
(`torch.autograd.graph.increment_version`): a graph that saved a param before the step and
runs backward after it raises torch's usual "modified by an inplace operation" error, as it
would with `torch.optim.RMSprop`.

Importing `fastrms` never imports torch; importing `fastrms.torch` without torch raises
one ImportError saying what to install.
"""

try:
    import torch
except ImportError:  # pragma: no cover - exercised in a subprocess without torch
    raise ImportError(
        "fastrms.torch needs PyTorch; install it with: pip install 'fastrms[torch]' (torch==2.13.0, the CPU build)"
    ) from None


import numpy as np
from torch.optim.optimizer import _get_scalar_dtype

from . import _torch_options, _torch_sparse, _torch_tensors, kernels, runtime, spec
from . import options as O
from . import rows as rows_step
from ._torch_buckets import STATE_NAMES, Bucket

__all__ = ["RMSprop"]

_NUMPY = _torch_tensors.NUMPY
#: torch.optim.RMSprop's `__setstate__` defaults: what an older state dict's groups lack.
_GROUP_DEFAULTS = dict(momentum=0, centered=False, foreach=None, maximize=False, differentiable=False, capturable=False)


class RMSprop(torch.optim.Optimizer):
    """`torch.optim.RMSprop`, fused: one Numba kernel call per param group and dtype.

    Parameters are torch's: `lr` (float or a 1-element tensor), `alpha`, `eps`,
    `weight_decay`, `momentum`, `centered`, `maximize`, each per param group.
    `capturable=True` and `differentiable=True` are refused (CUDA graphs and a
    differentiable step are not what a fused CPU kernel does); `foreach` is accepted and
    ignored: the step is fused anyway.

    Each `step` checks every param and grad first (CPU, dtype, shape, layout, memory shared
    with another param or state), then steps: a rejected step changes nothing. A param listed
    twice in a group is stepped twice, as torch steps it (torch warns); distinct params that
    share memory are refused.

    `flatten=True` (keyword-only, fastrms's own) moves the params of each group and dtype
    that require grad into one contiguous buffer (each `p.data` becomes a view of it, so a
    channels-last param becomes contiguous), gives each a grad that is a view of one grad
    buffer, and keeps the state in flat buffers too, as DeepSpeed's and apex's contiguous
    gradients do. Backward then accumulates straight into the grad buffer, and a step is one
    dense kernel call over it: one flat array's cost. A param has a grad when backward
    reached it since `zero_grad` (as in torch, the others neither move nor get state), but
    `zero_grad(set_to_none=True)` zeroes its grad view in place instead of setting it to
    None, so that backward keeps writing into the buffer. If a grad is replaced by another
    tensor, the step notices and takes the per-tensor path.

    Sparse grads of rows (`nn.Embedding(sparse=True)`: a 2-D param, a COO grad with one
    sparse and one dense dimension), which torch refuses, are stepped on the rows they name
    through the row kernel (`fastrms._torch_sparse`); every other row stays bitwise
    unchanged. `dense_rows` (keyword-only, fastrms's own) chooses what an untouched row
    does: with False (lazy) its state does not decay; with True each row keeps the step that
    last touched it (`row_step` in the state) and catches up the zero-gradient steps it
    missed when next touched, so the run equals torch's dense one up to rounding (without
    momentum; with momentum the forward pass reads rows where they were left).
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
        dense_rows: bool = False,
    ) -> None:
        for name, value in (("flatten", flatten), ("dense_rows", dense_rows)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
        self._flatten, self._dense_rows = flatten, dense_rows
        self._buckets: list = []  # per param group: the flat buffers of its params, by dtype (flatten=True)
        self._flat_slot: dict = {}  # param -> (bucket, index), for the params that live in a bucket
        self._loose: list = []  # per param group: (index, param) of the params in no bucket
        self._repeats: list = []  # per param group: whether a param is listed twice
        self._caches()
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
        super().__init__(params, defaults)

    def _caches(self):
        self._hyper_cache = {}
        self._tables = {}
        self._layouts = {}
        self._checked = {}  # (group, dtype, round) -> the pointer table last checked for overlaps

    def __repr__(self) -> str:
        mode = f"flatten={self._flatten}, dense_rows={self._dense_rows};"
        return super().__repr__().replace("RMSprop (", f"fastrms.torch.RMSprop ({mode}", 1)

    def add_param_group(self, param_group: dict) -> None:
        """torch's `add_param_group`, with the group's options and params checked here."""
        super().add_param_group(param_group)
        try:
            self._adopt_group(len(self.param_groups) - 1)
        except (TypeError, ValueError):
            self.param_groups.pop()  # nothing of a refused group stays
            raise

    def _adopt_group(self, gi):
        group = self.param_groups[gi]
        where = f"param_groups[{gi}]"
        params = group["params"]
        for j, p in enumerate(params):
            _torch_tensors.check_param(p, f"{where}['params'][{j}]")
        self._hyperparameters(group, where, tuple(dict.fromkeys(_NUMPY[p.dtype] for p in params)))
        distinct = list(dict.fromkeys(params))
        repeats = len(distinct) != len(params)
        _torch_tensors.check_disjoint(distinct, where)
        buckets = {}
        if self._flatten:
            if repeats:
                raise ValueError(f"{where}: flatten=True cannot hold a param listed twice (torch would step it twice)")
            trained = [p for p in params if p.requires_grad and p not in self._flat_slot]
            _torch_tensors.check_disjoint([*(p for p in self._flat_slot), *trained], "flatten=True")
            for dtype in dict.fromkeys(p.dtype for p in trained):
                bucket = buckets[dtype] = Bucket([p for p in trained if p.dtype == dtype])
                for i, p in enumerate(bucket.params):
                    self._flat_slot[p] = (bucket, i)
        self._buckets.append(buckets)
        self._loose.append([(j, p) for j, p in enumerate(params) if p not in self._flat_slot])
        self._repeats.append(repeats)

    # ------------------------------------------------------------------ pickling, state dicts

    def __getstate__(self):
        state = super().__getstate__()
        state["fastrms"] = {
            "flatten": self._flatten,
            "dense_rows": self._dense_rows,
            "buckets": [[bucket.params for bucket in buckets.values()] for buckets in self._buckets],
        }
        return state

    def __setstate__(self, state: dict) -> None:
        """torch's, with torch.optim.RMSprop's defaults for older groups and `step` values;
        after unpickling or `copy.deepcopy`, the flat buffers are built anew."""
        ours = state.pop("fastrms", None)
        super().__setstate__(state)
        for group in self.param_groups:
            for name, value in _GROUP_DEFAULTS.items():
                group.setdefault(name, value)
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state and "step" in p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=_get_scalar_dtype())
        if ours is None:
            return
        self._flatten = ours["flatten"]
        self._dense_rows = ours.get("dense_rows", False)
        self._caches()
        self._buckets, self._flat_slot, self._loose, self._repeats = [], {}, [], []
        for group, bucketed in zip(self.param_groups, ours["buckets"]):
            buckets = {}
            for params in bucketed:
                bucket = buckets[params[0].dtype] = Bucket(params)
                for i, p in enumerate(params):
                    self._flat_slot[p] = (bucket, i)
                    if self.state.get(p):
                        bucket.adopt(i, self.state[p])
            self._buckets.append(buckets)
            self._loose.append([(j, p) for j, p in enumerate(group["params"]) if p not in self._flat_slot])
            self._repeats.append(len(set(group["params"])) != len(group["params"]))

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's `load_state_dict` (a `torch.optim.RMSprop` state dict loads as is; so do
        older ones, as torch loads them). Every state tensor must have its param's number of
        elements, or nothing is loaded; the given dict is never written to, now or by later
        steps (its tensors are copied). With `flatten=True` the values go into the flat
        state buffers."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        saved = state_dict.get("state") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or not isinstance(saved, dict):
            raise ValueError("a state dict has 'state' (a dict) and 'param_groups' (a list)")
        ids = [i for g in groups for i in g.get("params", ())]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(ids, params)) if len(ids) == len(params) else {}
        copied = {}
        for key, value in saved.items():
            p = by_id.get(key)
            if not isinstance(value, dict):
                raise ValueError(f"state[{key!r}] must be a dict, got {type(value).__name__}")
            for name, t in value.items():
                if not torch.is_tensor(t):
                    continue
                if name in STATE_NAMES and p is not None and t.numel() != p.numel():
                    raise ValueError(
                        f"state[{key!r}][{name!r}] has shape {tuple(t.shape)}, its param {tuple(p.shape)}: "
                        "this state dict is not this model's"
                    )
                if name == "step" and t.numel() != 1:
                    raise ValueError(f"state[{key!r}]['step'] must hold one number, got shape {tuple(t.shape)}")
            copied[key] = {n: t.clone() if torch.is_tensor(t) else t for n, t in value.items()}
        super().load_state_dict({**state_dict, "state": copied})
        self._caches()
        for p, (bucket, i) in self._flat_slot.items():
            state = self.state.get(p)
            if state:
                bucket.adopt(i, state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's `zero_grad`; the grads of flattened params (`flatten=True`) are zeroed
        in place in their buffer (`set_to_none=True` then means the param has no grad until
        backward reaches it), and a grad replaced since is made a view of it again."""
        if not self._flat_slot:
            return super().zero_grad(set_to_none)
        for buckets in self._buckets:
            for bucket in buckets.values():
                bucket.zero_grads(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                if p not in self._flat_slot and p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().zero_()

    # ------------------------------------------------------------------ checks

    def _hyperparameters(self, group, where, dtypes):
        """The group's options as fastrms's, checked (`fastrms._torch_options`)."""
        return _torch_options.hyperparameters(self._hyper_cache, group, where, dtypes, self._dense_rows)

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure=None):
        """One fused step over every param that has a grad; returns `closure()`'s loss (the
        closure is called with grad enabled, as torch does) or None."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = [self._plan(i, group) for i, group in enumerate(self.param_groups)]  # every check first
        bumped, steps = [], {}
        for hyper, rounds, flat, sparse, lagging in plans:
            for args in lagging:  # dense_rows: rows stepped sparsely before, now a dense grad
                _torch_sparse.catch_up(*args, hyper, hyper["learning_rate"])
            for bucket in flat:
                bucket.step(hyper, self._parallel, bumped)
            for members in rounds:
                for dtype, (rows, ptrs, sizes) in members.items():
                    self._run(hyper, dtype, rows, ptrs, sizes, bumped, steps)
            for p, table, counters, entry in sparse:
                self._run_rows(hyper, p, table, counters, entry, bumped)
        for dtype, addresses in steps.items():  # each param's `step` += 1, one call per dtype
            kernels.increment(np.array(addresses, dtype=np.int64), np.empty(0, dtype))
        if bumped:
            torch.autograd.graph.increment_version(bumped)
        return loss

    def _plan(self, gi, group):
        """The group's checked options, the rounds of its params that have a grad (per dtype,
        rows `(pointers, size, param, tensors to bump, step tensor)`; a param listed twice
        goes again in a later round) and its buckets that still tile. The common case (dense
        CPU grad and param, both contiguous) costs a few C calls per param."""
        where = f"param_groups[{gi}]"
        names = None
        sparse, lagging = [], []  # params with a sparse grad; dense_rows params to catch up first
        dense_rows = self._dense_rows
        flat = []  # flatten=True: whole buckets whose params and grads are still the buffers' views
        for bucket in self._buckets[gi].values():
            if bucket.tiles():
                hyper = self._hyperparameters(group, where, (_NUMPY[bucket.dtype],))
                bucket.prepare(hyper, self._layout)
                flat.append(bucket)
        if len(flat) == len(self._buckets[gi]):  # every bucket tiles: only the params outside them remain
            candidates = self._loose[gi]
        else:
            skip = {id(p) for bucket in flat for p in bucket.params}
            candidates = [(j, p) for j, p in enumerate(group["params"]) if id(p) not in skip]
        rounds = [{}]
        seen = {} if self._repeats[gi] else None
        flat_slot, layouts, state_of = self._flat_slot, self._layouts, self.state
        for j, p in candidates:
            g = p.grad
            if g is None:
                continue
            if flat_slot:
                slot = flat_slot.get(p)
                if slot is not None and g is slot[0].grads[slot[1]] and not slot[0].active[slot[1]]:
                    continue  # its buffer's zeroed view: no grad since zero_grad(set_to_none=True)
            if not g.is_cpu:
                raise ValueError(f"{where}['params'][{j}]: its grad is on {g.device}; fastrms steps CPU tensors only")
            if g.is_sparse:
                sparse.append((j, p, g))
                continue
            if not (g.is_contiguous() and p.is_contiguous()):
                _torch_tensors.check_pair(p, g, f"{where}['params'][{j}]")
            dtype = p.dtype
            if names is None or dtype not in _NUMPY:
                if dtype not in _NUMPY:
                    _torch_tensors.check_param(p, f"{where}['params'][{j}]")
                hyper = self._hyperparameters(group, where, (_NUMPY[dtype],))
                names = spec.of(hyper).names
            if g.dtype is not dtype:
                raise ValueError(f"{where}['params'][{j}]: its grad is {g.dtype}, the param {dtype}")
            address, shape = p.data_ptr(), p.shape
            cached = layouts.get(id(p))
            if (  # the cached layout holds while the param, its address, shape and state tensors do
                cached is None
                or cached[0] is not p
                or cached[1] != address
                or cached[2] != shape
                or cached[3] != names
                or not cached[6](cached[4])
                or (cached[7] is not None and cached[7] != p.stride())
            ):
                name = f"{where}['params'][{j}]"
                if not p.is_cpu:  # a param moved or swapped (torch.utils.swap_tensors) off the CPU
                    raise ValueError(f"{name} is on {p.device}; fastrms.torch.RMSprop steps CPU tensors only")
                if g.shape != shape:  # torch keeps a grad's shape its param's, unless p.data was replaced
                    raise ValueError(f"{name}: its grad has shape {tuple(g.shape)}, the param {tuple(shape)}")
                cached = self._layout(p, names, address, name, state_of[p])
            if g.numel() != cached[9]:
                raise ValueError(f"{where}['params'][{j}]: its grad has {g.numel()} elements, the param {cached[9]}")
            if dense_rows and _torch_sparse.ROW_STEP in cached[4]:
                lagging.append(self._lagging(p, cached, names, hyper, f"{where}['params'][{j}]"))
            turn = 0
            if seen is not None:
                turn = seen[id(p)] = seen.get(id(p), -1) + 1
                if turn == len(rounds):
                    rounds.append({})
            members = rounds[turn]
            rows = members.get(dtype)
            if rows is None:
                rows = members[dtype] = []
            rows.append(((address, g.data_ptr(), *cached[8]), cached[9], p, cached[10], cached[11]))
        for turn, members in enumerate(rounds):
            for dtype, rows in members.items():
                ptrs = np.array([row[0] for row in rows], dtype=np.int64)
                sizes = tuple(row[1] for row in rows)
                _torch_tensors.check_overlaps(self._checked, (gi, dtype, turn), dtype, ptrs, sizes, where)
                members[dtype] = (rows, ptrs, sizes)
        sparse = [self._sparse_table(group, where, f"{where}['params'][{j}]", p, g) for j, p, g in sparse]
        used = [*(d for m in rounds for d in m), *(b.dtype for b in flat), *(s[0].dtype for s in sparse)]
        dtypes = tuple(dict.fromkeys(_NUMPY[d] for d in used))
        return self._hyperparameters(group, where, dtypes), rounds, flat, sparse, lagging

    def _sparse_table(self, group, where, name, p, g):
        """A param with a sparse grad, checked: `(p, rows.Table, row counters, layout)`."""
        _torch_tensors.check_param(p, name)
        _torch_sparse.check(p, g, name)
        hyper = self._hyperparameters(group, where, (_NUMPY[p.dtype],))
        names = spec.of(hyper).names
        entry = self._layout(p, names, p.data_ptr(), name, self.state[p])
        parallel = runtime.parallel_mode() != "serial"
        table, counters = _torch_sparse.table(p, g, entry[10], names, entry[4], self._dense_rows, parallel, name)
        return p, table, counters, entry

    @staticmethod
    def _lagging(p, cached, names, hyper, name):
        """`dense_rows`: the catch-up before a dense grad steps a param stepped by rows."""
        state = cached[4]
        counters = _torch_sparse.counters(state, p.shape[0], name)
        return p, cached[10], names, counters, spec.of(hyper).variant, int(float(state["step"])) + 1

    def _run_rows(self, hyper, p, table, counters, entry, bumped):
        """One row step of a param with a sparse grad (its own step count, as torch counts)."""
        state, key, lr = entry[4], spec.of(hyper).variant, hyper["learning_rate"]
        if counters is not None:
            state[_torch_sparse.ROW_STEP] = counters
        step = state["step"]
        t = int(float(step)) + 1
        rows_step.step([table], t, hyper["dense_rows"], O.scalars(hyper, lr, t),
                       rows_step.catch_up_constants(hyper, key, lr),
                       lambda make, parallel: runtime.shell(make, key, parallel))  # fmt: skip
        step.add_(1)
        bumped.append(p)
        bumped.extend(entry[10])

    @staticmethod
    def _parallel(size, itemsize, hyper):
        """Whether a step of `size` elements runs on the parallel kernels here."""
        return runtime.parallel_for(size, itemsize, 1 + bool(hyper["centered"]) + bool(hyper["momentum"]))

    def _layout(self, p, names, address, name="a param", state=None):
        """The cached layout of `p` (see `_plan` and `fastrms._torch_tensors.layout`), made anew."""
        entry = _torch_tensors.layout(p, names, address, name, self.state[p] if state is None else state,
                                      self._flat_slot.get(p))  # fmt: skip
        self._layouts[id(p)] = entry
        return entry

    def _run(self, hyper, dtype, rows, ptrs, table, bumped, steps):
        """One kernel call for the rows (`_plan`) of one group, dtype and round."""
        key = spec.of(hyper).variant
        sizes = np.array(table, dtype=np.int64)
        for _, _, p, tensors, (step_dtype, step_address) in rows:
            bumped.append(p)
            bumped.extend(tensors)
            steps.setdefault(_NUMPY[step_dtype], []).append(step_address)
        chunks = self._tables.get(table)
        if chunks is None:
            if len(self._tables) > 256:
                self._tables.clear()
            chunks = self._tables[table] = kernels.chunk_table(sizes)
        witness = np.empty(0, dtype=_NUMPY[dtype])
        parallel = self._parallel(int(sizes.sum()), witness.itemsize, hyper)
        shell = runtime.shell(kernels.segments, key, parallel)
        shell(witness, ptrs, sizes, chunks, *O.scalars(hyper, hyper["learning_rate"], 1))
