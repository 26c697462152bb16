"""The comparison table behind the benchmarks, ``fastrms bench`` and their correctness tests.

Each implementation in :data:`IMPLEMENTATIONS` turns a :class:`Problem` (params, a gradient,
a variant's options) into a zero-argument ``step`` callable that performs one optimizer step
in place:

- ``fastrms``: :class:`fastrms.RMSprop`'s ``step``, validation included;
- ``numpy_seed``: :mod:`fastrms.reference`, the seed article's NumPy with its temporaries;
- ``numpy_out``: NumPy with preallocated ``out=`` buffers, what a careful user writes;
- ``torch_foreach``: ``torch.optim.RMSprop(foreach=True)`` on the same memory (when torch is
  installed and the variant exists in torch);
- ``traffic``: the same-traffic kernel, which reads and writes exactly the arrays the
  variant's step reads and writes and does no arithmetic: the memory-bandwidth limit.

Timings interleave the implementations round by round and take medians, so that a noisy
shared machine shifts all of them alike and the ratios hold.
"""

import platform
import time
from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange

from . import kernels, reference
from .optimizer import RMSprop, state_names

DEFAULT_HYPER = dict(learning_rate=1e-3, beta=0.9, epsilon=1e-8)


@dataclass
class Problem:
    """Arrays and options for one benchmark case; ``fresh()`` gives independent copies."""

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
    def state_arrays(self):
        """How many state arrays the variant keeps (square_avg, grad_avg, momentum_buffer)."""
        return len(state_names({"centered": False, "momentum": 0.0, **self.options}))

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
    h = problem.hyper
    T = p.dtype.type
    lr, beta, omb, eps = T(h["learning_rate"]), T(h["beta"]), T(1.0 - h["beta"]), T(h["epsilon"])
    wd, mu = T(h.get("weight_decay", 0.0)), T(h.get("momentum", 0.0))
    centered, nesterov = h.get("centered", False), h.get("nesterov", False)
    lr_in = h.get("lr_in_momentum", False)
    decoupled = h.get("decoupled_weight_decay", False)
    v = np.full_like(p, h.get("initial_scale", 0.0))
    m = np.zeros_like(p) if centered else None
    b = np.zeros_like(p) if mu else None
    geff, tmp = np.empty_like(p), np.empty_like(p)
    state = {"square_avg": v, "grad_avg": m, "momentum_buffer": b}

    skip = h.get("skip_nonfinite", False)

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


def torch_supports(options):
    """Whether ``torch.optim.RMSprop`` has this variant (no Nesterov, lr outside the
    buffer, coupled decay, eps outside the root, v from 0, no bias correction)."""
    unsupported = (
        "nesterov",
        "lr_in_momentum",
        "decoupled_weight_decay",
        "eps_in_sqrt",
        "bias_correction",
        "skip_nonfinite",
    )
    return not any(options.get(k) for k in unsupported) and not options.get("initial_scale")


def _torch_foreach(problem):
    import torch

    if not torch_supports(problem.options):
        return None
    p, g = problem.fresh()
    h = problem.hyper
    param = torch.nn.Parameter(torch.from_numpy(p))
    param.grad = torch.from_numpy(g)
    opt = torch.optim.RMSprop(
        [param],
        lr=h["learning_rate"],
        alpha=h["beta"],
        eps=h["epsilon"],
        weight_decay=h.get("weight_decay", 0.0),
        momentum=h.get("momentum", 0.0),
        centered=h.get("centered", False),
        maximize=h.get("maximize", False),
        foreach=True,
    )

    def step():
        with torch.no_grad():
            opt.step()

    return step, _Holder(p, {})


def _make_traffic(has_grad_avg, has_momentum, parallel):
    """Loads every array the variant reads and stores every array it writes, with no
    arithmetic: values rotate between the arrays, and one ``max`` keeps every load live so
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
    return njit(parallel=parallel, error_model="numpy", cache=True, nogil=True)(traffic)


_TRAFFIC = {}


def _traffic(problem):
    """Reads param, grad and every state array, writes param and every state array, once."""
    p, g = problem.fresh()
    opts = {"centered": False, "momentum": 0.0, **problem.options}
    names = state_names(opts)
    parallel = kernels.step_bytes(problem.n, p.dtype.itemsize, len(names)) >= kernels.PARALLEL_MIN_BYTES
    key = ("grad_avg" in names, "momentum_buffer" in names, parallel)
    if key not in _TRAFFIC:
        _TRAFFIC[key] = _make_traffic(*key)
    kernel = _TRAFFIC[key]
    v = np.full(p.size, float(opts.get("initial_scale", 0.0)), dtype=p.dtype)  # allocated as RMSprop does
    m = np.zeros_like(p) if key[0] else p[:0]
    b = np.zeros_like(p) if key[1] else p[:0]
    state = {"square_avg": v, "grad_avg": m, "momentum_buffer": b}
    return lambda: kernel(p, g, v, m, b), _Holder(p, {k: state[k] for k in names})


class _Holder:
    """What a step acts on, for correctness checks: ``params`` and ``state`` like the optimizers."""

    def __init__(self, param, state):
        self.params = param
        self.state = state


IMPLEMENTATIONS = {
    "fastrms": _fastrms,
    "numpy_seed": _numpy_seed,
    "numpy_out": _numpy_out,
    "torch_foreach": _torch_foreach,
    "traffic": _traffic,
}


def available(name):
    """Whether implementation ``name`` can run here (torch may be absent)."""
    if name != "torch_foreach":
        return name in IMPLEMENTATIONS
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def setup(name, problem):
    """``(step, holder)`` for implementation ``name`` on ``problem``, or None if it lacks the variant."""
    return IMPLEMENTATIONS[name](problem)


# ------------------------------------------------------------------ timing


def _calls_per_sample(step, target=0.02):
    """How many calls make a sample of about ``target`` seconds (at least 1)."""
    step()  # warm: compile or load from cache
    calls = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        elapsed = time.perf_counter() - t0
        if elapsed >= target / 4 or calls >= 1 << 20:
            return max(1, int(calls * target / max(elapsed, 1e-9)))
        calls *= 4


def measure(problem, names, rounds=7, target=0.02):
    """Median seconds per step of each implementation on ``problem``, interleaved round by round."""
    steps = {}
    for name in names:
        made = setup(name, problem) if available(name) else None
        if made is not None:
            steps[name] = made[0]
    return measure_calls(steps, rounds, target)


def measure_calls(steps, rounds=7, target=0.02):
    """Median seconds per call of each zero-argument callable in ``steps``, interleaved."""
    calls = {name: _calls_per_sample(step, target) for name, step in steps.items()}
    samples = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            k = calls[name]
            t0 = time.perf_counter()
            for _ in range(k):
                step()
            samples[name].append((time.perf_counter() - t0) / k)
    return {name: float(np.median(s)) for name, s in samples.items()}


def crossover(options, dtype, sizes=tuple(1 << k for k in range(10, 19)), rounds=7):
    """Time a variant's serial and parallel drivers side by side over ``sizes``; returns rows
    ``(n, bytes_per_step, serial_s, parallel_s)`` and the first size where parallel wins
    (for choosing :data:`fastrms.kernels.PARALLEL_MIN_BYTES`)."""
    rows, first = [], None
    for n in sizes:
        problem = Problem(n, dtype, options)
        p, g = problem.fresh()
        opt = RMSprop(p, **problem.hyper)
        s = opt._slots[0]
        args = (s.flat, g, s.square_avg, s.grad_avg, s.momentum_buffer, 1e-3, 0.9, 0.0, 1e-8, 0.0, 0.0, 1.0, 1.0)
        serial, parallel = opt._drivers
        steps = {"serial": lambda s=serial, a=args: s(*a), "parallel": lambda k=parallel, a=args: k(*a)}
        times = measure_calls(steps, rounds)
        rows.append((n, problem.bytes_per_step, times["serial"], times["parallel"]))
        if first is None and times["parallel"] < times["serial"]:
            first = n
    return rows, first


def machine():
    """CPU, core count, threading layer and versions, for any published figure."""
    import numba

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cores": numba.config.NUMBA_NUM_THREADS,
        "threads": numba.get_num_threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info
