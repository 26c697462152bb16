"""The comparison table behind the benchmarks, `fastrms bench` and their correctness tests.

Each implementation in `IMPLEMENTATIONS` turns a `Problem` (params, a gradient,
a variant's options) into a zero-argument `step` callable that performs one optimizer step
in place:

- `fastrms`: `fastrms.RMSprop`'s `step`, validation included;
- `numpy_seed`: `fastrms.reference`, the seed article's NumPy with its temporaries;
- `numpy_out`: NumPy with preallocated `out=` buffers, what a careful user writes;
- `torch_foreach`: `torch.optim.RMSprop(foreach=True)` on the same memory (when torch is
  installed and the variant exists in torch);
- `jax_optax`: `optax.rmsprop` under `jax.jit` with donated buffers (when JAX and
  optax are installed and optax has the variant);
- `traffic`: the same-traffic kernel, which reads and writes exactly the arrays the
  variant's step reads and writes and does no arithmetic: the memory-bandwidth limit;
- `bespoke`: the variant's own formula as the shortest Numba loop, with its options and
  hyperparameters folded in as constants: what a user could hand-write for that one
  variant, and the floor when the arrays sit in cache (where the square root and the
  division, not memory, bound the step).

The **limit** of a step is the slower of `traffic` and `bespoke`.
"""

from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange

from .. import kernels, reference
from ..core import spec
from ..core.options import BY_NAME, DEFAULTS, resolve
from ..optimizer import RMSprop

#: The hyperparameters every benchmark case uses (the seed's): the options table's defaults.
DEFAULT_HYPER = {k: DEFAULTS[k] for k in ("learning_rate", "beta", "epsilon")}


@dataclass
class Problem:
    """Arrays and options for one benchmark case; `fresh()` gives independent copies."""

    n: int
    dtype: np.dtype
    options: dict = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        self.dtype = np.dtype(self.dtype)
        self.param = rng.standard_normal(self.n, dtype=np.float64).astype(self.dtype)
        self.grad = rng.standard_normal(self.n, dtype=np.float64).astype(self.dtype)

    def fresh(self):
        return self.param.copy(), self.grad.copy()

    @property
    def hyper(self):
        return {**DEFAULT_HYPER, **self.options}

    @property
    def options_in_full(self):
        """Every option's value for this case (the table's defaults, the case's options)."""
        return resolve({**DEFAULT_HYPER, **self.options}, "Problem")

    @property
    def state_arrays(self):
        """How many state arrays the variant keeps (square_avg, grad_avg, momentum_buffer)."""
        return len(spec.of(self.options_in_full).names)

    @property
    def bytes_per_step(self):
        """Bytes a fused step must move: read param, grad and each state; write param and each state."""
        k = self.state_arrays
        return self.n * self.dtype.itemsize * ((2 + k) + (1 + k))


# ------------------------------------------------------------------ implementations


def _fastrms(problem):
    p, g = problem.fresh()
    opt = RMSprop(p, **problem.hyper)
    return lambda: opt.step(g), opt


def _numpy_seed(problem):
    p, g = problem.fresh()
    opt = reference.RMSprop(p, **problem.hyper)
    return lambda: opt.step(g), opt


def _numpy_out(problem):
    """Every variant with NumPy ufuncs writing into preallocated buffers (two scratch arrays)."""
    p, g = problem.fresh()
    h = problem.options_in_full
    T = p.dtype.type
    lr, beta, omb, eps = T(h["learning_rate"]), T(h["beta"]), T(1.0 - h["beta"]), T(h["epsilon"])
    wd, mu = T(h["weight_decay"]), T(h["momentum"])
    centered, nesterov = h["centered"], h["nesterov"]
    lr_in = h["lr_in_momentum"]
    decoupled = h["decoupled_weight_decay"]
    v = np.full_like(p, h["initial_scale"])
    m = np.zeros_like(p) if centered else None
    b = np.zeros_like(p) if mu else None
    geff, tmp = np.empty_like(p), np.empty_like(p)
    state = {"square_avg": v, "grad_avg": m, "momentum_buffer": b}

    skip = h["skip_nonfinite"]

    def step():
        if skip and not np.isfinite(g).all():
            return
        if wd and not decoupled:
            np.multiply(p, wd, out=geff)
            np.add(geff, g, out=geff)
            gg = geff
        else:
            gg = g
        if wd and decoupled:
            np.multiply(p, T(h["learning_rate"] * h["weight_decay"]), out=tmp)
            np.subtract(p, tmp, out=p)
        np.multiply(v, beta, out=v)
        np.multiply(gg, gg, out=tmp)
        np.multiply(tmp, omb, out=tmp)
        np.add(v, tmp, out=v)
        if centered:
            np.multiply(m, beta, out=m)
            np.multiply(gg, omb, out=tmp)
            np.add(m, tmp, out=m)
            np.multiply(m, m, out=tmp)
            np.subtract(v, tmp, out=tmp)
            np.maximum(tmp, T(0), out=tmp)
            np.sqrt(tmp, out=tmp)
        else:
            np.sqrt(v, out=tmp)
        np.add(tmp, eps, out=tmp)
        np.divide(gg, tmp, out=tmp)  # tmp = u
        if not mu:
            np.multiply(tmp, lr, out=tmp)
            np.subtract(p, tmp, out=p)
            return
        if lr_in:
            np.multiply(tmp, lr, out=tmp)  # tmp = lr * u
        np.multiply(b, mu, out=b)
        np.add(b, tmp, out=b)
        if nesterov:
            np.multiply(b, mu, out=geff)  # gg is no longer needed: geff is scratch now
            np.add(tmp, geff, out=tmp)
            upd = tmp
        else:
            upd = b
        if lr_in:
            np.subtract(p, upd, out=p)
        else:
            np.multiply(upd, lr, out=tmp)
            np.subtract(p, tmp, out=p)

    return step, _Holder(p, state)


#: The library each optional peer imitates, for `supports`.
LIBRARY = {"torch_foreach": "torch", "jax_optax": "optax"}


def has_variant(name, options):
    """Whether implementation `name` has the variant `options` (it may still decline a
    dtype: JAX runs float64 only with x64 enabled)."""
    if name not in LIBRARY:
        return True
    h = resolve({**DEFAULT_HYPER, **options}, "has_variant()")
    lr_outside_momentum = h["momentum"] and not h["lr_in_momentum"]
    return supports(LIBRARY[name], options) and not (name == "jax_optax" and lr_outside_momentum)


def supports(library, options):
    """Whether `library` has this variant: every option set away from its default has a
    spelling in that library (from the options table)."""
    return all(BY_NAME[k].spellings.get(library) or v == DEFAULTS[k] for k, v in options.items())


def _torch_foreach(problem):
    import torch

    if not has_variant("torch_foreach", problem.options):
        return None
    p, g = problem.fresh()
    param = torch.nn.Parameter(torch.from_numpy(p))
    param.grad = torch.from_numpy(g)
    spelled = {BY_NAME[k].spellings["torch"]: v for k, v in problem.hyper.items()}
    opt = torch.optim.RMSprop([param], **spelled, foreach=True)

    def step():
        with torch.no_grad():
            opt.step()

    return step, _Holder(p, {})


def _jax_optax(problem):
    """`optax.rmsprop` jitted with the params and state donated: XLA may update in place."""
    import jax
    import optax

    h = problem.options_in_full
    if not has_variant("jax_optax", problem.options):
        return None  # e.g. momentum with lr outside the buffer: optax keeps lr inside
    if problem.dtype == np.float64 and not jax.config.read("jax_enable_x64"):
        return None  # JAX computes in float32 unless x64 is enabled for the whole process
    tx = optax.rmsprop(
        h["learning_rate"],
        decay=h["beta"],
        eps=h["epsilon"],
        initial_scale=h["initial_scale"],
        eps_in_sqrt=h["eps_in_sqrt"],
        centered=h["centered"],
        momentum=h["momentum"] or None,
        nesterov=h["nesterov"],
        bias_correction=h["bias_correction"],
    )
    p, g = problem.fresh()
    params, grad = jax.numpy.asarray(p), jax.numpy.asarray(g)
    box = {"params": params, "state": tx.init(params)}

    @jax.jit
    def _update(params, state, grad):
        updates, state = tx.update(grad, state, params)
        return optax.apply_updates(params, updates), state

    update = jax.jit(_update, donate_argnums=(0, 1))

    def step():
        box["params"], box["state"] = update(box["params"], box["state"], grad)
        box["params"].block_until_ready()

    class _JaxHolder:
        @property
        def params(self):
            return np.asarray(box["params"])

        state = {}

    return step, _JaxHolder()


def _make_traffic(has_grad_avg, has_momentum, parallel):
    """Loads every array the variant reads and stores every array it writes, with no
    arithmetic: values rotate between the arrays, and one `max` keeps every load live so
    the compiler cannot drop one."""

    def traffic(param, grad, square_avg, grad_avg, momentum_buffer):
        for i in prange(param.size):
            g = grad[i]
            carry = param[i]
            old = square_avg[i]
            square_avg[i] = carry
            carry = old
            if has_grad_avg:
                old = grad_avg[i]
                grad_avg[i] = carry
                carry = old
            if has_momentum:
                old = momentum_buffer[i]
                momentum_buffer[i] = carry
                carry = old
            param[i] = max(g, carry)
        return parallel

    traffic.__name__ = traffic.__qualname__ = (
        f"traffic_m{has_grad_avg:d}_b{has_momentum:d}_{'parallel' if parallel else 'serial'}"
    )
    return kernels.jit(parallel)(traffic)  # the kernels' options and cache


_TRAFFIC: dict = {}


def _traffic(problem):
    """Reads param, grad and every state array, writes param and every state array, once."""
    p, g = problem.fresh()
    opts = problem.options_in_full
    names = spec.of(opts).names
    parallel = kernels.step_bytes(problem.n, p.dtype.itemsize, len(names)) >= kernels.PARALLEL_MIN_BYTES
    key = ("grad_avg" in names, "momentum_buffer" in names, parallel)
    if key not in _TRAFFIC:
        _TRAFFIC[key] = _make_traffic(*key)
    kernel = _TRAFFIC[key]
    v = np.full(p.size, float(opts["initial_scale"]), dtype=p.dtype)  # allocated as RMSprop does
    m = np.zeros_like(p) if key[0] else p[:0]
    b = np.zeros_like(p) if key[1] else p[:0]
    state = {"square_avg": v, "grad_avg": m, "momentum_buffer": b}
    return lambda: kernel(p, g, v, m, b), _Holder(p, {k: state[k] for k in names})


# ------------------------------------------------------------------ bespoke loops: the compute limit


def _bespoke_plain(lr, beta, eps, parallel):
    omb = 1.0 - beta

    def plain(p, g, v, m, b):
        T = p.dtype.type
        for i in prange(p.size):
            gi = g[i]
            vi = T(beta) * v[i] + T(omb) * (gi * gi)
            v[i] = vi
            p[i] = p[i] - T(lr) * (gi / (np.sqrt(vi) + T(eps)))

    return njit(parallel=parallel, error_model="numpy", nogil=True)(plain)


def _bespoke_centered_momentum(lr, beta, eps, mu, parallel):
    omb = 1.0 - beta

    def centered_momentum(p, g, v, m, b):
        T = p.dtype.type
        for i in prange(p.size):
            gi = g[i]
            vi = T(beta) * v[i] + T(omb) * (gi * gi)
            mi = T(beta) * m[i] + T(omb) * gi
            v[i] = vi
            m[i] = mi
            s = vi - mi * mi
            s = T(0.0) if s < T(0.0) else s
            bi = T(mu) * b[i] + gi / (np.sqrt(s) + T(eps))
            b[i] = bi
            p[i] = p[i] - T(lr) * bi

    return njit(parallel=parallel, error_model="numpy", nogil=True)(centered_momentum)


def _bespoke_nesterov(lr, beta, eps, mu, parallel):
    omb = 1.0 - beta

    def nesterov(p, g, v, m, b):
        T = p.dtype.type
        for i in prange(p.size):
            gi = g[i]
            vi = T(beta) * v[i] + T(omb) * (gi * gi)
            v[i] = vi
            step = T(lr) * (gi / (np.sqrt(vi) + T(eps)))
            bi = T(mu) * b[i] + step
            b[i] = bi
            p[i] = p[i] - (step + T(mu) * bi)

    return njit(parallel=parallel, error_model="numpy", nogil=True)(nesterov)


def _bespoke_weight_decay(lr, beta, eps, wd, parallel):
    omb = 1.0 - beta

    def weight_decay(p, g, v, m, b):
        T = p.dtype.type
        for i in prange(p.size):
            pi = p[i]
            gi = g[i] + T(wd) * pi
            vi = T(beta) * v[i] + T(omb) * (gi * gi)
            v[i] = vi
            p[i] = pi - T(lr) * (gi / (np.sqrt(vi) + T(eps)))

    return njit(parallel=parallel, error_model="numpy", nogil=True)(weight_decay)


#: The formulas that have a bespoke loop: the options they fold in (beyond lr, beta, eps),
#: and the factory. `skip_nonfinite` adds the read-only check, as fastrms does.
_BESPOKE: tuple = (
    ({}, _bespoke_plain, ()),
    ({"centered": True, "momentum": 0.9}, _bespoke_centered_momentum, ("momentum",)),
    ({"momentum": 0.9, "nesterov": True, "lr_in_momentum": True}, _bespoke_nesterov, ("momentum",)),
    ({"weight_decay": 0.01}, _bespoke_weight_decay, ("weight_decay",)),
)
_BESPOKE_BUILT: dict = {}


def _bespoke(problem):
    """The variant's own formula, constants folded, or None when it has no bespoke loop."""
    options = {k: v for k, v in problem.options.items() if k != "skip_nonfinite"}
    h = problem.options_in_full
    match = next(((factory, extra) for folded, factory, extra in _BESPOKE if options == folded), None)
    if match is None:
        return None
    factory, extra = match
    n_state = problem.state_arrays
    parallel = kernels.step_bytes(problem.n, problem.dtype.itemsize, n_state) >= kernels.PARALLEL_MIN_BYTES
    consts = (h["learning_rate"], h["beta"], h["epsilon"], *(h[k] for k in extra))
    key = (factory, consts, parallel)
    if key not in _BESPOKE_BUILT:
        _BESPOKE_BUILT[key] = factory(*consts, parallel)
    kernel = _BESPOKE_BUILT[key]
    p, g = problem.fresh()
    state = {name: np.zeros_like(p) for name in spec.of(h).names}
    m, b = state.get("grad_avg", p[:0]), state.get("momentum_buffer", p[:0])
    v = state["square_avg"]
    if h["skip_nonfinite"]:
        check = kernels.nonfinite_parallel if parallel else kernels.nonfinite_serial

        def step():
            if not check(g):
                kernel(p, g, v, m, b)

        return step, _Holder(p, state)
    return (lambda: kernel(p, g, v, m, b)), _Holder(p, state)


class _Holder:
    """What a step acts on, for correctness checks: `params` and `state` like the optimizers."""

    def __init__(self, param, state):
        self.params = param
        self.state = state


IMPLEMENTATIONS = {
    "fastrms": _fastrms,
    "numpy_seed": _numpy_seed,
    "numpy_out": _numpy_out,
    "torch_foreach": _torch_foreach,
    "jax_optax": _jax_optax,
    "traffic": _traffic,
    "bespoke": _bespoke,
}


#: The optional peers and the modules each needs.
_NEEDS = {"torch_foreach": ("torch",), "jax_optax": ("jax", "optax")}


def available(name):
    """Whether implementation `name` can run here (torch, JAX and optax may be absent)."""
    import importlib.util

    return name in IMPLEMENTATIONS and all(importlib.util.find_spec(m) is not None for m in _NEEDS.get(name, ()))


def setup(name, problem):
    """`(step, holder)` for implementation `name` on `problem`, or None if it lacks the variant."""
    return IMPLEMENTATIONS[name](problem)
