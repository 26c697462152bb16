"""Timing: interleaved rounds, medians, and the machine a figure was measured on.

Timings interleave the implementations round by round and take medians, so that a noisy
shared machine shifts all of them alike and the ratios hold.
"""

import platform
import time

import numpy as np

from .. import kernels
from ..core import spec
from ..core.options import resolve, scalars, variant_key
from ..optimizer import RMSprop
from .peers import DEFAULT_HYPER, Problem, available, setup


def _calls_per_sample(step, target=0.02):
    """How many calls make a sample of about `target` seconds (at least 1)."""
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


def measure(problem, names, rounds=7, target=0.02, samples=None):
    """Median seconds per step of each implementation on `problem`, interleaved round by
    round (every round's seconds per step go into `samples`, when given)."""
    steps = {}
    for name in names:
        made = setup(name, problem) if available(name) else None
        if made is not None:
            steps[name] = made[0]
    return measure_calls(steps, rounds, target, samples)


def spread(values):
    """`(min, median, IQR)` of a list of seconds (NumPy's linear quartiles)."""
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return float(np.min(values)), float(med), float(q3 - q1)


#: Seconds between two implementations' samples: an OpenMP runtime (torch's) keeps its
#: threads spinning for a while after a parallel region, and on a machine with few cores
#: they would take the next sample's cores (measured: the step timed after torch's foreach
#: step 1.15-1.25x slower at 1e6 elements on 2 cores, as fast after a pause).
SETTLE = 0.005


def measure_calls(steps, rounds=7, target=0.02, samples_out=None):
    """Median seconds per call of each zero-argument callable in `steps`, interleaved
    (every round's seconds per call go into `samples_out`, when given)."""
    calls = {name: _calls_per_sample(step, target) for name, step in steps.items()}
    samples = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            k = calls[name]
            time.sleep(SETTLE)  # the last one's idle threads (torch's OpenMP spins) go to sleep first
            t0 = time.perf_counter()
            for _ in range(k):
                step()
            samples[name].append((time.perf_counter() - t0) / k)
    if samples_out is not None:
        samples_out.update(samples)
    return {name: float(np.median(s)) for name, s in samples.items()}


_CROSSOVER_SIZES = tuple(2**e for e in range(10, 19))


def crossover(options, dtype, sizes=_CROSSOVER_SIZES, rounds=7):
    """Time a variant's serial and parallel drivers side by side over `sizes`; returns rows
    `(n, bytes_per_step, serial_s, parallel_s)` and the first size where parallel wins
    (for choosing `fastrms.kernels.PARALLEL_MIN_BYTES`)."""
    rows, first = [], None
    hyper = resolve({**Problem(0, dtype).hyper, **options}, "crossover()")
    key = variant_key(hyper)
    names = spec.of(hyper).names
    for n in sizes:
        problem = Problem(n, dtype, options)
        p, g = problem.fresh()
        state = {
            name: np.zeros_like(p) if name in names else p[:0] for name in ("square_avg", "grad_avg", "momentum_buffer")
        }
        args = (tuple(scalars(hyper, 1e-3, 1)), p, g, state["square_avg"], state["grad_avg"], state["momentum_buffer"])
        serial, parallel = kernels.dense(key, False), kernels.dense(key, True)
        steps = {"serial": lambda k=serial, a=args: k(*a), "parallel": lambda k=parallel, a=args: k(*a)}
        times = measure_calls(steps, rounds)
        rows.append((n, problem.bytes_per_step, times["serial"], times["parallel"]))
        if first is None and times["parallel"] < times["serial"]:
            first = n
    return rows, first


def _load():
    """The 1-minute load average over the usable cores (None where the OS does not say)."""
    import os

    try:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return os.getloadavg()[0] / cores
    except (AttributeError, OSError):
        return None


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
        "load": _load(),
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
    for name in ("jax", "optax"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    return info


def many_arrays(dtype="float32", total=1_000_000, rounds=7, target=0.03, seed=0):
    """A whole model's step against one array of the same total size, in one process:
    `{case: seconds}` for one array, 200 arrays of mixed sizes, 1000 equal arrays, and each
    of those packed (`fastrms.pack`) and stepped with one flat grad."""
    from ..backend.layout import pack

    rng = np.random.default_rng(seed)
    weights = rng.random(200) ** 3
    mixed = np.maximum(1, (weights / weights.sum() * total).astype(np.int64))
    mixed[0] += total - mixed.sum()
    layouts = {"200 arrays, mixed sizes": [int(n) for n in mixed], "1000 arrays, equal": [total // 1000] * 1000}
    p1, g1 = Problem(total, dtype).fresh()
    one = RMSprop(p1, **DEFAULT_HYPER)
    steps = {"one array": lambda: one.step(g1)}
    for label, sizes in layouts.items():
        params = [rng.standard_normal(n).astype(dtype) for n in sizes]
        grads = [rng.standard_normal(n).astype(dtype) for n in sizes]
        opt = RMSprop([p.copy() for p in params], **DEFAULT_HYPER)
        steps[label] = lambda o=opt, g=grads: o.step(g)
        packed = RMSprop(pack(params)[1], **DEFAULT_HYPER)
        flat_grad = pack(grads)[0]
        steps[f"{label}, packed"] = lambda o=packed, g=flat_grad: o.step(g)
    return measure_calls(steps, rounds, target)


def fixed_cost(sizes=(16, 1000), dtype="float32", rounds=7, target=0.02, seed=0):
    """The optimizer's fixed cost: `{n: {case: seconds}}`, `RMSprop.step` of one array of `n`
    elements (the plain variant) against the raw kernel call it wraps
    (`fastrms.kernels.rmsprop_update`, the same update with no checks, clock or state of its
    own), interleaved in one process."""
    from .. import kernels

    rng = np.random.default_rng(seed)
    hyper = (DEFAULT_HYPER["learning_rate"], DEFAULT_HYPER["beta"], DEFAULT_HYPER["epsilon"])
    out = {}
    for n in sizes:
        p, g = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
        opt = RMSprop(p.copy(), **DEFAULT_HYPER)
        q, v = p.copy(), np.zeros(n, dtype)
        steps = {"RMSprop.step": lambda o=opt, g=g: o.step(g),
                 "kernels.rmsprop_update": lambda q=q, g=g, v=v: kernels.rmsprop_update(q, g, v, *hyper)}  # fmt: skip
        out[n] = measure_calls(steps, rounds, target)
    return out


#: `fastrms bench --clipped`: the options timed against each base variant.
CLIP_CASES = {
    "unclipped": {},
    "clip_global_norm": {"clip_global_norm": 1.0},
    "clip_value": {"clip_value": 0.1},
    "skip_nonfinite": {"skip_nonfinite": True},
    "clip_global_norm + skip_nonfinite": {"clip_global_norm": 1.0, "skip_nonfinite": True},
}


def clipped(dtype="float32", sizes=(10_000_000, 1_000_000), variants=None, rounds=7, target=0.03):
    """A clipped step against an unclipped one, in one process: rows `{variant, size, case:
    seconds}` for each base variant (plain and centered + momentum unless given), and
    `"read pass"`: one parallel read of the grad with no arithmetic to speak of (the
    non-finite check), the floor of what a norm pass can cost."""
    from .cases import ALL

    rows = []
    for variant in variants or ("plain", "centered_momentum"):
        for n in sizes:
            p, g = Problem(n, dtype).fresh()
            steps = {}
            for case, clip in CLIP_CASES.items():
                opt = RMSprop(p.copy(), **DEFAULT_HYPER, **ALL[variant], **clip)
                steps[case] = lambda o=opt, g=g: o.step(g)
            # the floor of one more read of g: a pass with no arithmetic to speak of
            flat = g.reshape(-1)
            steps["read pass"] = lambda flat=flat: kernels.nonfinite_parallel(flat)
            rows.append({"variant": variant, "size": n, **measure_calls(steps, rounds, target)})
    return rows


def torch_steps(layers=100, width=100, rounds=7, target=0.05, seed=0, compiled=True):
    """`fastrms bench --torch`: the optimizer step on a model of `2 * layers` tensors
    (`layers` `Linear(width, width)`), float32, for `fastrms.torch.RMSprop` (and with
    `flatten=True`), `torch.optim.RMSprop` (default, `foreach=True` and, with
    `compiled`, its step under `torch.compile`, which fuses it into one C++ loop) and
    `fastrms.RMSprop` over one flat array of the same size; and a whole training step
    (forward, backward, step) with each. Returns `{"params": n, "tensors": k, "step": {...},
    "train": {...}, "compile": {name: seconds of the first call}}`."""
    import torch

    from ..torch import RMSprop as FusedRMSprop

    torch.manual_seed(seed)

    def model():
        return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])

    makers = {
        "fastrms.torch.RMSprop": lambda ps: FusedRMSprop(ps, lr=1e-3),
        "fastrms.torch.RMSprop(flatten=True)": lambda ps: FusedRMSprop(ps, lr=1e-3, flatten=True),
        "torch.optim.RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
        "torch.optim.RMSprop(foreach=True)": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, foreach=True),
    }
    compiled_name = "torch.compile(torch.optim.RMSprop.step)"
    if compiled:
        makers[compiled_name] = lambda ps: torch.optim.RMSprop(ps, lr=1e-3)
    x = torch.randn(64, width)
    steps, train, compile_seconds = {}, {}, {}
    for name, make in makers.items():
        m = model()
        for p in m.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt = make(m.parameters())
        steps[name] = opt.step
        if name == compiled_name:
            steps[name] = torch.compile(opt.step)
            t0 = time.perf_counter()
            steps[name]()  # the compile, torch's real cost, timed on its own
            compile_seconds[name] = time.perf_counter() - t0

        def one(m=m, opt=opt, step=steps[name]):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            step()

        train[name] = one
    n = sum(p.numel() for p in m.parameters())
    p, g = Problem(n, "float32").fresh()
    flat = RMSprop(p, 1e-3)
    steps["fastrms.RMSprop, one flat array"] = lambda: flat.step(g)
    traffic, _held = setup("traffic", Problem(n, "float32"))
    steps["limit: the same bytes, no math"] = traffic
    return {
        "params": n,
        "tensors": 2 * layers,
        "step": measure_calls(steps, rounds, target),
        "train": measure_calls(train, rounds, target),
        "compile": compile_seconds,
    }


def torch_tensors(k=1000, n=1000, rounds=7, target=0.05, seed=0):
    """`fastrms bench --torch`, the per-tensor step's fixed cost: `k` float32 tensors of `n`
    elements through `fastrms.torch.RMSprop` (per tensor), `torch.optim.RMSprop(foreach=True)`
    and `fastrms.RMSprop` over a list of `k` NumPy arrays of the same sizes, and over one
    array of `k * n` elements. Returns `{name: median seconds}`."""
    import torch

    from ..torch import RMSprop as FusedRMSprop

    torch.manual_seed(seed)
    steps = {}
    for name, make in (
        ("fastrms.torch.RMSprop, per tensor", lambda ps: FusedRMSprop(ps, lr=1e-3)),
        ("torch.optim.RMSprop(foreach=True)", lambda ps: torch.optim.RMSprop(ps, lr=1e-3, foreach=True)),
    ):
        params = [torch.nn.Parameter(torch.randn(n)) for _ in range(k)]
        for p in params:
            p.grad = torch.randn(n) * 1e-3
        steps[name] = make(params).step
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(n, dtype=np.float32) for _ in range(k)]
    grads = [rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3) for _ in range(k)]
    listed = RMSprop(arrays, learning_rate=1e-3)
    steps["fastrms.RMSprop, a list of arrays"] = lambda: listed.step(grads)
    p, g = Problem(k * n, "float32").fresh()
    flat = RMSprop(p, 1e-3)
    steps["fastrms.RMSprop, one array"] = lambda: flat.step(g)
    return measure_calls(steps, rounds, target)


def torch_dtensors(k=100, shape=(301, 150), rounds=7, target=0.05, seed=0):
    """`fastrms bench --torch`, DTensor params (FSDP2's): `k` float32 DTensors of `shape`
    sharded on a mesh of one rank (gloo, a file rendezvous; the process group made and torn
    down here), stepped by `fastrms.torch.RMSprop` (on the local shards) and by
    `torch.optim.RMSprop` (its default, foreach) on the same DTensors. Returns
    `{name: median seconds}`, or None when torch.distributed is not available or a process
    group is already running."""
    import tempfile

    import torch

    from ..torch import RMSprop as FusedRMSprop

    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        return None
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=0, world_size=1)
        try:
            mesh = init_device_mesh("cpu", (1,))
            torch.manual_seed(seed)
            steps = {}
            for name, make in (
                ("fastrms.torch.RMSprop", lambda ps: FusedRMSprop(ps, lr=1e-3)),
                ("torch.optim.RMSprop", lambda ps: torch.optim.RMSprop(ps, lr=1e-3)),
            ):
                params = [torch.nn.Parameter(distribute_tensor(torch.randn(shape), mesh, [Shard(0)])) for _ in range(k)]
                for p in params:
                    p.grad = distribute_tensor(torch.randn(shape) * 1e-3, mesh, [Shard(0)])
                steps[name] = make(params).step
            return measure_calls(steps, rounds, target)
        finally:
            dist.destroy_process_group()


def torch_embedding(n=200_000, width=64, k=4096, rounds=7, target=0.05, seed=0):
    """`fastrms bench --torch`, embedding tables: the optimizer step of an
    `nn.Embedding(n, width)` after a batch of `k` random indices, float32: the sparse grad
    (`sparse=True`) through `fastrms.torch.RMSprop`, lazy and `dense_rows=True`, against the
    dense grad through `fastrms.torch.RMSprop` and `torch.optim.RMSprop` (which refuses
    sparse grads). Returns `{name: seconds}`."""
    import torch

    from ..torch import RMSprop as FusedRMSprop

    torch.manual_seed(seed)
    idx = torch.randint(0, n, (k,))
    makers = {
        "fastrms.torch, sparse grad, lazy": (True, lambda ps: FusedRMSprop(ps, lr=1e-3)),
        "fastrms.torch, sparse grad, dense_rows": (True, lambda ps: FusedRMSprop(ps, lr=1e-3, dense_rows=True)),
        "fastrms.torch, dense grad": (False, lambda ps: FusedRMSprop(ps, lr=1e-3)),
        "torch.optim.RMSprop, dense grad": (False, lambda ps: torch.optim.RMSprop(ps, lr=1e-3)),
    }
    steps = {}
    for name, (sparse, make) in makers.items():
        emb = torch.nn.Embedding(n, width, sparse=sparse)
        emb(idx).sum().backward()
        steps[name] = make(emb.parameters()).step
    return measure_calls(steps, rounds, target)


def _startstops(stream):
    """Every start/stop record of a `distributed.get_task_stream` trace."""
    return [s for task in stream.data for s in task["startstops"]]


def dask_step(total=200_000_000, chunk=10_000_000, rounds=7, seed=0):
    """`fastrms bench --dask`: on a LocalCluster of 2 single-threaded worker processes
    (127.0.0.1), one plain float32 step over `total` elements in chunks of `chunk`, from
    persisted inputs to persisted outputs: `fastrms.dask.RMSprop.step` (out of place, and
    with `donate=True`: the new generation written over the old), the same step
    written as dask.array NumPy expressions, and in this process over the same total
    `fastrms.RMSprop.step` (in place) and the out-of-place fused step into reused arrays
    (what the tasks run, all cores). Rounds interleaved, after 8 warm-up steps (the tasks'
    output buffers are recycled from earlier generations). Returns medians in
    seconds, `tasks` (per step), and for each fused case, from the scheduler's task stream
    over three more steps, `kernel, <case>` (the median task's compute time) and `busy,
    <case>` (the share of a step's time the two workers spend computing)."""
    import time

    import dask.array as da
    import distributed

    from ..dask import RMSprop as DaskRMSprop
    from ..functional import rmsprop_step

    fused, expressions = "fastrms.dask, fused map", "dask.array NumPy expressions"
    donated = "fastrms.dask, fused map, donate=True"
    inplace, outofplace = "fastrms.RMSprop, one process", "out-of-place fused step, one process"
    out = {}
    pl, gl = Problem(total, "float32").fresh()
    single = RMSprop(pl.copy(), 1e-3)
    state, new_p, new_state = {"square_avg": np.zeros_like(pl)}, np.empty_like(pl), {"square_avg": np.empty_like(pl)}
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster, distributed.Client(cluster) as client:  # fmt: skip
        p = da.random.default_rng(seed).standard_normal(total, chunks=chunk, dtype=np.float32).persist()
        g = (p * np.float32(0.5) + np.float32(0.1)).persist()  # computed where p lives: no transfers
        distributed.wait([p, g])
        opt, donating = DaskRMSprop(p, 1e-3), DaskRMSprop(p, 1e-3, donate=True)
        for _ in range(8):  # until every worker holds the output buffers it recycles
            opt.step(g)
            donating.step(g)
        out["tasks"] = p.npartitions
        v = da.zeros_like(p).persist()

        def numpy_expressions():
            nonlocal p, v
            v2 = 0.9 * v + (1 - 0.9) * g**2
            p2 = p - 1e-3 * g / (da.sqrt(v2) + 1e-8)
            p, v = client.persist([p2, v2])
            distributed.wait([p, v])

        cases = {
            fused: lambda: opt.step(g),
            donated: lambda: donating.step(g),
            inplace: lambda: single.step(gl),
            outofplace: lambda: rmsprop_step(pl, gl, state, 1, 1e-3, out=(new_p, new_state)),
        }
        samples = {k: [] for k in (*cases, expressions)}
        for _ in range(rounds):
            for name, call in cases.items():
                t0 = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - t0)
        # on their own: the workers free the replaced arrays after each of these steps
        # returns, which would land in the time of whatever ran next
        for _ in range(rounds):
            t0 = time.perf_counter()
            numpy_expressions()
            samples[expressions].append(time.perf_counter() - t0)
        for label, o in ((fused, opt), (donated, donating)):
            computing, busy = [], []
            for _ in range(3):
                with distributed.get_task_stream(client) as stream:
                    t0 = time.perf_counter()
                    o.step(g)
                    wall = time.perf_counter() - t0
                spans = [s["stop"] - s["start"] for s in _startstops(stream) if s["action"] == "compute"]
                computing += spans
                busy.append(sum(spans) / (2 * wall))
            out[f"kernel, {label}"] = float(np.median(computing))
            out[f"busy, {label}"] = float(np.median(busy))
        out.update({k: float(np.median(x)) for k, x in samples.items()})
    return out
