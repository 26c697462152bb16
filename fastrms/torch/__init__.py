"""`fastrms.torch.RMSprop`: a drop-in `torch.optim.RMSprop` whose step is one fused kernel call
per param group and dtype.

It is a `torch.optim.Optimizer` with `torch.optim.RMSprop`'s signature, defaults, state
layout and formula ([docs/algorithm.md](algorithm.md) with `beta = alpha`, epsilon outside the root,
coupled weight decay, the learning rate outside the momentum buffer):

    g <- -grad if maximize else grad;   g <- g + weight_decay * p
    v <- alpha * v + (1 - alpha) * g^2
    centered: m <- alpha * m + (1 - alpha) * g;   s = max(v - m^2, 0)   else s = v
    u = g / (sqrt(s) + eps)
    momentum: b <- momentum * b + u;   p <- p - lr * b        else p <- p - lr * u

Params, grads and state are CPU tensors of float32 or float64; the kernel reads and writes
their memory in place (no copies), so tensors must be dense: contiguous, or dense in another
memory format (channels-last) with the grad laid out like its param.

bfloat16 and float16 params (a model trained in 16 bits) get a float32 master copy in their
state (`state[p]["master_param"]`, made from the param at its first step, as apex and
DeepSpeed keep master weights) and float32 state: the kernel reads the 16-bit grad, steps the
master in float32 and writes the param back, rounded to nearest even, in the same pass (no
second pass for the copy). The masters are in `state_dict()` and come back with
`load_state_dict` (a state dict without them, say `torch.optim.RMSprop`'s, makes them anew from
the params).

`stochastic_rounding=True` (keyword-only, fastrms's own, with `seed`) keeps bfloat16 params
without a master copy: each step widens the param, steps it in float32 and stores it rounded
stochastically (up with probability the bits dropped / 2^16: the param is the float32 result
on average, torchao's `bf16_stochastic_round`), with random bits from a counter-based hash of
`seed`, the param's place (group, index), its step and the element's index: the same bits
serial or parallel, and a run resumed from a state dict (in an optimizer built with the same
`seed`) continues bit for bit. 6 bytes a parameter instead of 10. Params without a grad
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
        "fastrms.torch needs PyTorch; install it with: pip install torch==2.13.0 (the CPU build)"
    ) from None


import inspect

from ..core import options as O
from . import _state, _steps, _tensors
from ._buckets import Bucket

__all__ = ["RMSprop"]

_NUMPY = _tensors.NUMPY


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

    `param_groups` is read at every step, as torch.optim reads it: groups or params swapped,
    appended or removed between steps (DeepSpeed ZeRO's patterns) are what the next step
    steps. DTensor params (FSDP2) are stepped on their local shards, their state DTensors
    placed like them; every other tensor subclass is refused.

    `clip_global_norm` (a float, or None) and `skip_nonfinite` (keyword-only, fastrms's own)
    guard the step before anything is written: `coef = min(1, max_norm / (norm + 1e-6))`
    scales every grad as the kernel reads it (the norm over every grad the step reads,
    summed over a DTensor's mesh), and a NaN or an infinity in any grad skips the step
    (`skipped_steps`); `last_grad_norm` is the last norm measured.

    `state_storage` ("native", "bfloat16" or "8bit") and `state_layout` ("elementwise" or
    "rowwise") (keyword-only, fastrms's own) keep the state as `fastrms.RMSprop` keeps it with
    the same options, under torch's key names: bfloat16 tensors of the param's shape, 1-D
    uint8 tensors of 8-bit blocks (256 codes and a float32 scale a block), or `square_avg`
    with one value a row of the first axis.

    Sparse grads of rows (`nn.Embedding(sparse=True)`: a 2-D param, a COO grad with one
    sparse and one dense dimension), which torch refuses, are stepped on the rows they name
    through the row kernel (`fastrms.torch._sparse`); every other row stays bitwise
    unchanged. `dense_rows` (keyword-only, fastrms's own) chooses what an untouched row
    does: with False (lazy) its state does not decay; with True each row keeps the step that
    last touched it (`row_step` in the state) and catches up the zero-gradient steps it
    missed when next touched, so the run equals torch's dense one up to rounding (without
    momentum; with momentum the forward pass reads rows where they were left).
    """

    def __new__(cls, *args, **kwargs):
        # an unknown keyword gets the closest option's name (Python's own error names none)
        unknown = [name for name in kwargs if name not in _OPTIONS]
        if unknown:
            name = unknown[0]
            hint = O.closest(name, _OPTIONS, _FOREIGN)
            said = f" Did you mean {hint!r}?" if hint else ""
            raise TypeError(f"RMSprop() got an unexpected keyword argument {name!r}.{said} Options are {_OPTIONS}")
        return super().__new__(cls)

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
        stochastic_rounding: bool = False,
        seed: int = 0,
        clip_global_norm: "float | None" = None,
        skip_nonfinite: bool = False,
        state_storage: str = "native",
        state_layout: str = "elementwise",
    ) -> None:
        for name, value in (("flatten", flatten), ("dense_rows", dense_rows),
                            ("stochastic_rounding", stochastic_rounding)):  # fmt: skip
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise TypeError(f"seed must be an int in [0, 2**64), got {seed!r}")
        self._flatten, self._dense_rows = flatten, dense_rows
        self._stochastic = seed if stochastic_rounding else None  # the seed of stochastic rounding, or None
        self._lean = _lean_options(state_storage, state_layout, flatten, stochastic_rounding)
        self._guard = _guard_options(clip_global_norm, skip_nonfinite)
        self._bucketing = _state.Layout()  # which params live in flat buffers (flatten=True)
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
        self._steps.hyperparameters(defaults, "RMSprop", ())  # torch checks the options before the params
        super().__init__(params, defaults)

    def _caches(self):
        # the step's checks, layouts and kernel calls (the guard's record carried over)
        old = getattr(self, "_steps", None)
        own = {"dense_rows": self._dense_rows, **self._lean}
        self._steps = _steps.Steps(own, self._stochastic, self._guard)
        if old is not None:
            self._steps.last_norm, self._steps.skipped = old.last_norm, old.skipped

    @property
    def last_grad_norm(self) -> "float | None":
        """The global norm of the grads the last guarded step measured (`clip_global_norm`),
        before clipping; None before the first."""
        return self._steps.last_norm

    @property
    def state_nbytes(self) -> int:
        """Bytes the optimizer's state takes on this process: every tensor in `state` (a
        DTensor's local shard; a 16-bit param's float32 master and state; the `step`
        counters), each counted once (with `flatten=True`, views of the flat buffers)."""
        seen, total = set(), 0
        for p_state in self.state.values():
            for t in p_state.values():
                if torch.is_tensor(t) and id(t) not in seen:
                    seen.add(id(t))
                    shard = _tensors.local(t, "a state tensor")
                    total += shard.numel() * shard.element_size()
        return total

    @property
    def skipped_steps(self) -> int:
        """The steps `skip_nonfinite=True` refused (a NaN or an infinity in a grad), in this
        process."""
        return self._steps.skipped

    def __repr__(self) -> str:
        lean = "".join(f", {k}={v!r}" for k, v in self._lean.items() if v not in ("native", "elementwise"))
        mode = f"flatten={self._flatten}, dense_rows={self._dense_rows}{lean};"
        return super().__repr__().replace("RMSprop (", f"fastrms.torch.RMSprop ({mode}", 1)

    def add_param_group(self, param_group: dict) -> None:
        """torch's `add_param_group`, with the group's options and params checked here."""
        super().add_param_group(param_group)
        try:
            self._adopt_group(len(self.param_groups) - 1)
        except (TypeError, ValueError):
            self.param_groups.pop()  # nothing of a refused group stays
            raise

    def _check_params(self, gi, params):
        """The params of group `gi`: each a tensor the fused step takes, distinct ones not
        sharing memory."""
        where = f"param_groups[{gi}]"
        for j, p in enumerate(params):
            _tensors.check_param(p, f"{where}['params'][{j}]")
            if self._stochastic is not None and p.dtype == torch.float16:
                raise TypeError(
                    f"{where}['params'][{j}] is torch.float16: stochastic_rounding=True rounds bfloat16 params "
                    "(float16 ones are stepped over a float32 master: stochastic_rounding=False)"
                )
            if self._flatten and _tensors.local(p, where) is not p:
                raise TypeError(
                    f"{where}['params'][{j}] is a DTensor: flatten=True moves plain params into one buffer (FSDP2 "
                    "already keeps its shards in one; use flatten=False)"
                )
            if self._steps.form.codec.block or self._steps.form.rowwise:
                if _tensors.local(p, where) is not p:
                    raise TypeError(
                        f"{where}['params'][{j}] is a DTensor: state_storage='8bit' and state_layout='rowwise' keep "
                        "1-D state tensors a DTensor cannot place like its param (use 'bfloat16' or 'native')"
                    )
            if self._steps.form.rowwise and p.dtype in _tensors.LOW:
                raise TypeError(
                    f"{where}['params'][{j}] is {p.dtype}: state_layout='rowwise' steps float32 and float64 params "
                    "(the row kernels write no 16-bit copy of a master)"
                )
        _tensors.check_disjoint(list(dict.fromkeys(params)), where)

    def _adopt_group(self, gi):
        group = self.param_groups[gi]
        where = f"param_groups[{gi}]"
        params = group["params"]
        self._check_params(gi, params)
        self._steps.hyperparameters(group, where, tuple(dict.fromkeys(_NUMPY[p.dtype] for p in params)))
        buckets = []
        if self._flatten:
            if len(set(params)) != len(params):
                raise ValueError(f"{where}: flatten=True cannot hold a param listed twice (torch would step it twice)")
            held = self._bucketing.flat_slot
            trained = [p for p in params if p.requires_grad and p not in held]
            _tensors.check_disjoint([*held, *trained], "flatten=True")
            place = {p: (gi << 24) + j for j, p in enumerate(params)}  # each param's noise key's ident
            for dtype in dict.fromkeys(p.dtype for p in trained):
                members = [p for p in trained if p.dtype == dtype]
                buckets.append(Bucket(members, self._stochastic, [place[p] for p in members]))
        self._bucketing.register(buckets)

    # ------------------------------------------------------------------ pickling, state dicts

    def __getstate__(self):
        state = super().__getstate__()
        state["fastrms"] = {"flatten": self._flatten, "dense_rows": self._dense_rows, "stochastic": self._stochastic,
                            "guard": self._guard, "lean": self._lean, "buckets": self._bucketing.pickled()}  # fmt: skip
        return state

    def __setstate__(self, state: dict) -> None:
        """torch's, with torch.optim.RMSprop's defaults for older groups and `step` values;
        after unpickling or `copy.deepcopy`, the flat buffers are built anew."""
        ours = state.pop("fastrms", None)
        super().__setstate__(state)
        _state.upgrade(self.param_groups, self.state)
        if ours is None:
            return
        self._flatten = ours["flatten"]
        self._dense_rows = ours.get("dense_rows", False)
        self._stochastic = ours.get("stochastic")
        self._guard = ours.get("guard")
        self._lean = ours.get("lean", _lean_options("native", "elementwise", False, False))
        self._caches()
        buckets = ours["buckets"]
        self._bucketing = _state.Layout.unpickled(self.param_groups, buckets, self.state, self._stochastic)

    def state_dict(self) -> dict:
        """torch's `state_dict`; with `flatten=True` the state of a bucketed param is copied out
        of the flat buffers, so that saving one param's state writes its own elements, not
        the whole buffer's."""
        out = super().state_dict()
        if self._bucketing.flat_slot:
            out["state"] = {
                key: {name: t.clone() if torch.is_tensor(t) and t._is_view() else t for name, t in value.items()}
                for key, value in out["state"].items()
            }
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's `load_state_dict` (a `torch.optim.RMSprop` state dict loads as is; so do
        older ones, as torch loads them). Every state tensor must have its param's shape, or
        nothing is loaded; the given dict is never written to, now or by later
        steps (its tensors are copied). With `flatten=True` the values go into the flat
        state buffers."""
        form = self._steps.form
        copied = _state.copied(state_dict, self.param_groups, form)
        super().load_state_dict({**state_dict, "state": copied})
        _state.kept_forms(
            copied, state_dict, self.param_groups, self.state, form
        )  # torch cast them to the param's dtype
        self._caches()
        for p, (bucket, i) in self._bucketing.flat_slot.items():
            state = self.state.get(p)
            if state:
                bucket.adopt(i, state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's `zero_grad`; the grads of flattened params (`flatten=True`) are zeroed
        in place in their buffer (`set_to_none=True` then means the param has no grad until
        backward reaches it), and a grad replaced since is made a view of it again."""
        held = self._bucketing
        if not held.flat_slot:
            return super().zero_grad(set_to_none)
        held.sync(self.param_groups, self._check_params)
        for buckets in held.buckets:
            for bucket in buckets.values():
                bucket.zero_grads(set_to_none)
        for loose in held.loose:
            for _, p in loose:
                slot = held.flat_slot.get(p)
                if slot is not None:  # its bucket is split across groups: its view alone
                    slot[0].zero_grad_of(slot[1], set_to_none)
                elif p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().zero_()

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure=None):
        """One fused step over every param that has a grad; returns `closure()`'s loss (the
        closure is called with grad enabled, as torch does) or None."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._bucketing.sync(self.param_groups, self._check_params)  # param_groups as they are now
        self._steps.step(self.param_groups, self.state, self._bucketing)
        return loss


def _lean_options(state_storage, state_layout, flatten, stochastic_rounding):
    """`state_storage` and `state_layout` checked as the NumPy front end checks them, and
    against the options fastrms.torch cannot combine them with."""
    checked = O.check_hyperparameters(O.resolve({"state_storage": state_storage, "state_layout": state_layout}))
    lean = {"state_storage": checked["state_storage"], "state_layout": checked["state_layout"]}
    if lean != {"state_storage": "native", "state_layout": "elementwise"}:
        if flatten:
            raise ValueError(
                f"flatten=True keeps the state in flat buffers in the params' dtype; state_storage="
                f"{state_storage!r} and state_layout={state_layout!r} keep it per param (use flatten=False)"
            )
        if stochastic_rounding and (lean["state_storage"] == "8bit" or lean["state_layout"] == "rowwise"):
            raise ValueError(
                "stochastic_rounding=True steps bfloat16 params with state kept element by element in float32 or "
                f"bfloat16; state_storage={state_storage!r}, state_layout={state_layout!r} is not among them"
            )
    return lean


def _guard_options(clip_global_norm, skip_nonfinite):
    """`clip_global_norm` and `skip_nonfinite` checked as the NumPy front end checks them, or
    None when neither is asked for."""
    if clip_global_norm is None and skip_nonfinite is False:
        return None
    given = {"clip_global_norm": clip_global_norm, "skip_nonfinite": skip_nonfinite}
    checked = O.check_hyperparameters(O.resolve(given))
    return {"clip_global_norm": checked["clip_global_norm"], "skip_nonfinite": checked["skip_nonfinite"]}


#: The keywords `RMSprop` takes, and fastrms's or other libraries' names for some of them.
_OPTIONS = [name for name in inspect.signature(RMSprop.__init__).parameters if name not in ("self", "params")]
_FOREIGN = {"learning_rate": "lr", "beta": "alpha", "rho": "alpha", "decay": "alpha", "epsilon": "eps",
            "nesterov": "momentum", "decoupled_weight_decay": "weight_decay"}  # fmt: skip
