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

import functools

import numpy as np
from torch.optim.optimizer import _get_scalar_dtype

from . import _torch_sparse, kernels, runtime
from . import options as O
from . import rows as rows_step
from ._torch_buckets import STATE_NAMES, Bucket

__all__ = ["RMSprop"]

_NUMPY = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
_STEP_DTYPES = (torch.float32, torch.float64)
#: torch's names for the options it shares with fastrms (the rest are the same name).
_TORCH_NAMES = {"learning_rate": "lr", "beta": "alpha", "epsilon": "eps"}
#: torch.optim.RMSprop's own words for a bad value, kept in front of fastrms's reason.
_TORCH_PHRASES = {
    "lr": "Invalid learning rate: {}",
    "eps": "Invalid epsilon value: {}",
    "momentum": "Invalid momentum value: {}",
    "weight_decay": "Invalid weight_decay value: {}",
    "alpha": "Invalid alpha value: {}",
}
#: torch.optim.RMSprop's `__setstate__` defaults: what an older state dict's groups lack.
_GROUP_DEFAULTS = dict(momentum=0, centered=False, foreach=None, maximize=False, differentiable=False, capturable=False)


def _dense(t):
    """Whether `t`'s elements fill `numel` consecutive slots of memory (contiguous, or a
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


def _first_overlap(starts, ends):
    """`(i, j)`, two of the byte spans `[starts[k], ends[k])` that overlap, or None."""
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    reach = np.maximum.accumulate(e)
    clash = np.flatnonzero(s[1:] < reach[:-1])
    if clash.size == 0:
        return None
    j = int(clash[0]) + 1
    i = int(np.flatnonzero(e[:j] > s[j])[0])
    return int(order[i]), int(order[j])


def _holds(keys, tensors):
    """A check that a state dict still holds `tensors` under `keys` (two to four: the
    state a variant keeps and `step`), written out: a step runs it once per param."""
    if len(keys) == 2:
        (k0, k1), (t0, t1) = keys, tensors
        return lambda d: d.get(k0) is t0 and d.get(k1) is t1
    if len(keys) == 3:
        (k0, k1, k2), (t0, t1, t2) = keys, tensors
        return lambda d: d.get(k0) is t0 and d.get(k1) is t1 and d.get(k2) is t2
    (k0, k1, k2, k3), (t0, t1, t2, t3) = keys, tensors
    return lambda d: d.get(k0) is t0 and d.get(k1) is t1 and d.get(k2) is t2 and d.get(k3) is t3


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
            self._check_param(p, f"{where}['params'][{j}]")
        self._hyperparameters(group, where, tuple(dict.fromkeys(_NUMPY[p.dtype] for p in params)))
        distinct = list(dict.fromkeys(params))
        repeats = len(distinct) != len(params)
        self._check_disjoint(distinct, where)
        buckets = {}
        if self._flatten:
            if repeats:
                raise ValueError(f"{where}: flatten=True cannot hold a param listed twice (torch would step it twice)")
            trained = [p for p in params if p.requires_grad and p not in self._flat_slot]
            self._check_disjoint([*(p for p in self._flat_slot), *trained], "flatten=True")
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

    @staticmethod
    def _check_param(p, name):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name} is a {type(p).__name__}, not a tensor")
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

    @staticmethod
    def _check_disjoint(params, where):
        """Distinct params must not share memory: one kernel call steps them at once."""
        if len(params) < 2:
            return
        starts = np.array([p.data_ptr() for p in params], dtype=np.int64)
        ends = starts + np.array([p.numel() * p.element_size() for p in params], dtype=np.int64)
        keep = ends > starts
        clash = _first_overlap(starts[keep], ends[keep])
        if clash is not None:
            i, j = (np.flatnonzero(keep)[k] for k in clash)
            a, b = sorted((int(i), int(j)))
            raise ValueError(
                f"{where}: params {a} and {b} share memory (views of one storage); fastrms steps a group's "
                "params at once, so they must be separate tensors"
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
                "dense_rows": self._dense_rows,
            }
            try:
                hyper = O.check_hyperparameters(O.resolve(given), dtypes)
            except (TypeError, ValueError) as exc:
                message = str(exc)
                for ours, theirs in _TORCH_NAMES.items():
                    message = message.replace(ours, theirs)
                option = message.split(" ", 1)[0]
                if isinstance(exc, ValueError) and option in _TORCH_PHRASES:
                    value = lr if option == "lr" else group[option]
                    message = f"{_TORCH_PHRASES[option].format(value)} ({message})"
                raise type(exc)(f"{where}: {message}") from None
            if len(self._hyper_cache) > 64:
                self._hyper_cache.clear()
            self._hyper_cache[key] = hyper
        return hyper

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
                self._check_pair(p, g, f"{where}['params'][{j}]")
            dtype = p.dtype
            if names is None or dtype not in _NUMPY:
                if dtype not in _NUMPY:
                    self._check_param(p, f"{where}['params'][{j}]")
                hyper = self._hyperparameters(group, where, (_NUMPY[dtype],))
                names = O.state_names(hyper)
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
                self._check_overlaps(gi, dtype, turn, ptrs, sizes, where)
                members[dtype] = (rows, ptrs, sizes)
        sparse = [self._sparse_table(group, where, f"{where}['params'][{j}]", p, g) for j, p, g in sparse]
        used = [*(d for m in rounds for d in m), *(b.dtype for b in flat), *(s[0].dtype for s in sparse)]
        dtypes = tuple(dict.fromkeys(_NUMPY[d] for d in used))
        return self._hyperparameters(group, where, dtypes), rounds, flat, sparse, lagging

    def _sparse_table(self, group, where, name, p, g):
        """A param with a sparse grad, checked: `(p, rows.Table, row counters, layout)`."""
        self._check_param(p, name)
        _torch_sparse.check(p, g, name)
        hyper = self._hyperparameters(group, where, (_NUMPY[p.dtype],))
        names = O.state_names(hyper)
        entry = self._layout(p, names, p.data_ptr(), name, self.state[p])
        parallel = runtime.parallel_mode() != "serial"
        table, counters = _torch_sparse.table(p, g, entry[10], names, entry[4], self._dense_rows, parallel, name)
        return p, table, counters, entry

    @staticmethod
    def _lagging(p, cached, names, hyper, name):
        """`dense_rows`: the catch-up before a dense grad steps a param stepped by rows."""
        state = cached[4]
        counters = _torch_sparse.counters(state, p.shape[0], name)
        return p, cached[10], names, counters, O.variant_key(hyper), int(float(state["step"])) + 1

    def _run_rows(self, hyper, p, table, counters, entry, bumped):
        """One row step of a param with a sparse grad (its own step count, as torch counts)."""
        state, key, lr = entry[4], O.variant_key(hyper), hyper["learning_rate"]
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

    def _check_overlaps(self, gi, dtype, turn, ptrs, sizes, where):
        """No param or state of one kernel call may overlap another, nor a grad any of them
        (threads would race on shared memory); grads may overlap each other (they are only
        read). Checked again only when an address or size changed."""
        last = self._checked.get((gi, dtype, turn))
        if last is not None and last[1] == sizes and np.array_equal(last[0], ptrs):
            return
        key_sizes = sizes
        sizes = np.array(sizes, dtype=np.int64) * _NUMPY[dtype].itemsize
        written = ptrs[:, [0, 2, 3, 4]]  # the param and its state
        used = (written != 0) & (sizes[:, None] > 0)
        owner = np.broadcast_to(np.arange(len(ptrs))[:, None], written.shape)[used]
        w_start = written[used]
        w_end = w_start + np.broadcast_to(sizes[:, None], written.shape)[used]
        clash = _first_overlap(w_start, w_end)
        culprit = None if clash is None else int(owner[clash[1]])
        if culprit is None and w_start.size:
            order = np.argsort(w_start)
            starts, ends = w_start[order], w_end[order]
            g_start, g_end = ptrs[:, 1], ptrs[:, 1] + sizes
            last_before = np.searchsorted(starts, g_end, side="left") - 1
            hit = (last_before >= 0) & (ends[np.maximum(last_before, 0)] > g_start) & (sizes > 0)
            if hit.any():
                culprit = -1 - int(np.flatnonzero(hit)[0])
        if culprit is not None:
            who = f"the grad of param {-1 - culprit}" if culprit < 0 else f"param {culprit} (or its state)"
            raise ValueError(
                f"{where}: {who} of this dtype shares memory with another param, grad or state stepped in the same "
                "call; fastrms steps them at once, so they must be separate tensors"
            )
        self._checked[(gi, dtype, turn)] = (ptrs, key_sizes)

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
        """The parallel mode's answer for a step of `size` elements: False, True, or
        `"serialized"` (cached until `fastrms.runtime.generation` changes)."""
        states = 1 + bool(hyper["centered"]) + bool(hyper["momentum"])
        return RMSprop._parallel_choice(size, itemsize, states, runtime.generation())

    def _check_pair(self, p, g, name):
        """The slow path: a sparse grad, or a param or grad that is not contiguous."""
        if g.layout != torch.strided:
            raise ValueError(f"{name} has a {g.layout} grad; fastrms steps dense grads and sparse COO grads of rows")
        self._check_param(p, name)
        if g.stride() != p.stride() and p.numel() > 1:
            raise ValueError(
                f"{name}: its grad has strides {tuple(g.stride())}, its param {tuple(p.stride())}; the fused "
                "step reads them element for element, so they must be laid out alike (make both contiguous)"
            )

    def _layout(self, p, names, address, name="a param", state=None):
        """The cached layout of `p` (see `_plan`), made anew: its state created as
        torch creates it (a buffer the options need and the state lacks, after momentum or
        centering is switched on mid-run, starts at zero) and checked to be laid out like
        `p`. The entry holds the state tensors, so they live as long as it is used."""
        state = self.state[p] if state is None else state
        if p.is_inference():
            raise RuntimeError(
                f"{name}: Inplace update to inference tensor outside InferenceMode is not allowed (the param was "
                "made under torch.inference_mode(); torch refuses to step it too)"
            )
        slot = self._flat_slot.get(p)
        if not state:
            state["step"] = torch.zeros((), dtype=_get_scalar_dtype()) if slot is None else slot[0].steps[slot[1]]
        tensors = []
        for state_name in names:
            if state_name not in state:
                if slot is None:
                    state[state_name] = torch.zeros_like(p, memory_format=torch.preserve_format)
                else:
                    state[state_name] = slot[0].state_view(state_name, slot[1])
            t = state[state_name]
            if not isinstance(t, torch.Tensor) or t.dtype != p.dtype or t.shape != p.shape or not t.is_cpu:
                raise ValueError(f"{name}: its state {state_name!r} is not a CPU tensor like the param")
            if t.stride() != p.stride() and p.numel() > 1:
                raise ValueError(f"{name}: its state {state_name!r} is not laid out like the param")
            tensors.append(t)
        ptrs = [0, 0, 0]
        for state_name, t in zip(names, tensors):
            ptrs[STATE_NAMES.index(state_name)] = t.data_ptr()
        step = state["step"]
        if not torch.is_tensor(step):
            step = state["step"] = torch.tensor(float(step), dtype=_get_scalar_dtype())  # as torch's __setstate__
        if not step.is_cpu or step.dtype not in _STEP_DTYPES or step.numel() != 1:
            raise ValueError(
                f"{name}: its state 'step' is a {step.dtype} tensor of shape {tuple(step.shape)} on {step.device}; "
                "fastrms counts steps in a CPU float32 or float64 tensor of one element"
            )
        keys = (*names, "step")
        held = (*tensors, step)
        entry = (
            p,
            address,
            p.shape,
            names,
            state,
            keys,
            _holds(keys, held),
            None if p.is_contiguous() else p.stride(),
            tuple(ptrs),
            p.numel(),
            tensors,
            (step.dtype, step.data_ptr()),
            held,
        )
        self._layouts[id(p)] = entry
        return entry

    def _run(self, hyper, dtype, rows, ptrs, table, bumped, steps):
        """One kernel call for the rows (`_plan`) of one group, dtype and round."""
        key = O.variant_key(hyper)
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
