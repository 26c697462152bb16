"""fastrms.kernels: the drivers, rmsprop_update from user @njit code, and the machine code."""

import platform
import re
from functools import lru_cache

import numpy as np
import pytest
from conftest import BIG, problem
from numba import njit, prange

from fastrms import kernels, reference
from fastrms.bench.cases import all_variants
from fastrms.core import options

ARGS = kernels.Scalars(
    lr=0.01, beta=0.9, eps_in=0.0, eps_out=1e-8, weight_decay=0.01, momentum=0.9, grad_scale=1.0, bias_correction=0.5
)


def _arrays(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(dtype) if k != 2 else rng.random(n).astype(dtype) for k in range(5)]


@pytest.mark.parametrize("n", [0, 1, 7, 1031, BIG])
@pytest.mark.parametrize("key", [(False, 0, 0, False), (True, 1, 1, True), (True, 2, 2, True), (False, 2, 2, False)])
@pytest.mark.lower_bound
def test_serial_and_parallel_drivers_are_bitwise_identical(key, n, dtype):
    serial, parallel = kernels.drivers(*key)
    a, b = _arrays(n, dtype), _arrays(n, dtype)
    before = [x.copy() for x in a]
    for _ in range(3):
        serial(tuple(ARGS), *a)
        parallel(tuple(ARGS), *b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    if n:  # the step happened: param, square_avg and the state the variant keeps changed
        k = kernels.variant(*key)
        for i, used in enumerate([True, False, True, k.uses_grad_avg, k.uses_momentum_buffer]):
            assert (not np.array_equal(a[i], before[i])) == used, i


def test_a_shell_refuses_arrays_it_could_run_past():
    serial, parallel = kernels.drivers(True, 0, 1, False)
    a = _arrays(10, np.float64)
    for short in (1, 2, 3, 4):  # grad, square_avg, grad_avg, momentum_buffer
        args = [x.copy() for x in a]
        args[short] = args[short][:9]
        for shell in (serial, parallel):
            with pytest.raises(ValueError, match="size of param"):
                shell(tuple(ARGS), *args)


def test_drivers_are_built_once_per_variant():
    a, b = kernels.drivers(True, 1, 2, True), kernels.drivers(True, 1, 2, True)
    assert a[0] is b[0] and a[1] is b[1] and a[0] is not a[1]
    assert len(kernels.variants()) == len(set(kernels.variants())) == 30
    with pytest.raises(ValueError, match="nesterov"):
        kernels.drivers(nesterov=True)
    with pytest.raises(ValueError, match="unknown"):
        kernels.drivers(mom_mode=7)


@njit
def _grad(w, x, y, g):
    """g = 2/n * x.T @ (x @ w - y), written out: Numba's ``@`` would need SciPy."""
    n, k = x.shape
    g[:] = 0.0
    for i in range(n):
        r = -y[i]
        for j in range(k):
            r += x[i, j] * w[j]
        for j in range(k):
            g[j] += 2.0 * r * x[i, j] / n
    return g


@njit
def _user_loop(w, v, x, y, steps, lr):
    g = np.empty_like(w)
    for _ in range(steps):
        kernels.rmsprop_update(w, _grad(w, x, y, g), v, lr, 0.9, 1e-8)
    return w


@pytest.mark.lower_bound
def test_rmsprop_update_from_user_njit_code_matches_the_seed_step():
    rng = np.random.default_rng(0)
    x, y = rng.random((50, 3)), rng.random(50)
    w = np.zeros(3)
    got = _user_loop(w.copy(), np.zeros(3), x, y, 200, 0.01)
    theta, v = w.copy(), np.zeros(3)
    for _ in range(200):
        theta, v = reference.seed_step(theta, v, _grad(theta, x, y, np.empty(3)), 0.01, 0.9, 1e-8)
    np.testing.assert_array_equal(got, theta)


@pytest.mark.parametrize("n", [5, 1031, BIG])
def test_rmsprop_update_is_the_plain_variant_bitwise(n, dtype):
    p0, grads = problem(n, dtype)
    p, v = p0.copy(), np.zeros(n, dtype)
    ref_p, st = p0.copy(), {"square_avg": np.zeros(n, dtype)}
    for t in range(1, 11):
        kernels.rmsprop_update(p, grads[t % 4], v, 0.01, 0.9, 1e-8)
        ref_p = reference.rmsprop_step(ref_p, grads[t % 4], st, t, 0.01, 0.9, 1e-8)
    np.testing.assert_array_equal(p, ref_p)
    np.testing.assert_array_equal(v, st["square_avg"])
    assert p.dtype == dtype and v.dtype == dtype


def test_rmsprop_update_takes_any_shape_and_checks_sizes():
    p, g, v = np.ones((2, 3)), np.ones((2, 3)), np.zeros((2, 3))
    kernels.rmsprop_update(p, g, v, 0.1, 0.9, 1e-8)
    assert np.all(p < 1) and np.all(v > 0)
    before = p.copy()
    with pytest.raises(ValueError, match="one size"):
        kernels.rmsprop_update(p, np.ones(5), v, 0.1, 0.9, 1e-8)
    np.testing.assert_array_equal(p, before)


def _calibration(a, b):
    for i in prange(a.size):
        a[i] = np.sqrt(b[i]) / b[i]


#: Packed square root / division per ISA: (regex with the register class as group 1, rank of
#: each register class by width). Scalar forms (sqrtss, fsqrt s0) do not match.
_ISAS = {
    "x86": (
        r"\bv?{op}p{s}\s+[^\n]*%(xmm|ymm|zmm)",
        {"xmm": 1, "ymm": 2, "zmm": 3},
    ),
    "arm": (
        r"\bf{op}\s+(v|z)\d+\.{arm}",
        {"v": 1, "z": 2},
    ),
}


def _isa():
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        return "x86"
    if machine in ("aarch64", "arm64"):
        return "arm"
    return None


def _packed(asm, op, dtype):
    """The register classes on which ``asm`` holds packed ``op`` ("sqrt"/"div") of ``dtype``."""
    pattern, _ = _ISAS[_isa()]
    s = "s" if dtype == np.float32 else "d"
    arm = r"(?:4s|s)\b" if dtype == np.float32 else r"(?:2d|d)\b"
    return set(re.findall(pattern.format(op=op, s=s, arm=arm), asm))


@lru_cache(maxsize=None)
def _chosen_width(dtype, parallel):
    """The vector registers LLVM chooses on this host for the simplest sqrt/div loop compiled
    with the kernels' options: e.g. ymm on a Xeon where LLVM prefers 256-bit vectors despite
    AVX-512, zmm on a Zen 4, NEON q-registers on most aarch64."""
    fn = njit(parallel=parallel, error_model="numpy", nogil=True)(_calibration)
    fn(np.ones(4, dtype), np.ones(4, dtype))
    found = _packed("\n".join(fn.inspect_asm().values()), "sqrt", dtype)
    _, rank = _ISAS[_isa()]
    return max(found, key=rank.get) if found else None


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("name", list(all_variants())[::7])
def test_hot_loop_is_vectorised_on_the_width_llvm_chose(name, parallel, dtype):
    """Recompile the driver's own source without the cache (cached code cannot be inspected)
    and look for packed square roots and divisions on the registers LLVM uses for vectors on
    this host (measured on a minimal loop, not assumed from the CPU's features), and for no
    float32 -> float64 promotion."""
    if _isa() is None:
        pytest.skip(f"no packed-instruction patterns known for this ISA ({platform.machine()!r})")
    width = _chosen_width(np.dtype(dtype), parallel)
    if width is None:
        pytest.skip(f"LLVM does not vectorise even a minimal sqrt loop on this host ({platform.machine()})")
    key = options.variant_key(options.resolve(all_variants()[name]))
    driver = kernels.dense(key, parallel)
    fresh = njit(parallel=parallel, error_model="numpy", nogil=True)(driver.py_func)
    fresh(tuple(ARGS), *_arrays(4, dtype))
    asm = "\n".join(fresh.inspect_asm().values())
    assert width in _packed(asm, "sqrt", dtype), f"no packed sqrt on {width}"
    assert width in _packed(asm, "div", dtype), f"no packed division on {width}"
    if dtype == np.float32:
        assert not re.search(r"cvtss2sd|cvtps2pd|fcvt\s+d\d+, s\d+|fcvtl", asm), "float32 promoted to float64"
    assert "ZeroDivisionError" not in "\n".join(fresh.inspect_llvm().values())


def test_the_packed_patterns_tell_packed_from_scalar():
    """The patterns the vectorisation test relies on, on known instruction text."""
    if _isa() == "x86":
        assert _packed("vsqrtps %ymm1, %ymm2\nvdivps (%rax), %zmm3, %zmm4", "sqrt", np.float32) == {"ymm"}
        assert _packed("vdivps (%rax), %zmm3, %zmm4", "div", np.float32) == {"zmm"}
        assert _packed("vsqrtss %xmm1, %xmm1, %xmm1", "sqrt", np.float32) == set()
        assert _packed("sqrtpd %xmm1, %xmm2", "sqrt", np.float64) == {"xmm"}
    elif _isa() == "arm":
        assert _packed("fsqrt v0.4s, v1.4s", "sqrt", np.float32) == {"v"}
        assert _packed("fsqrt s0, s1", "sqrt", np.float32) == set()
        assert _packed("fdiv z0.d, p0/m, z0.d, z1.d", "div", np.float64) == {"z"}
    else:
        pytest.skip(f"no packed-instruction patterns known for this ISA ({platform.machine()!r})")


_CACHE_SCRIPT = """
import sys
import numpy as np
from fastrms import kernels, reference
from fastrms.core import options
x = np.ones(64, np.float32)
if sys.argv[1] == "others-first":
    s = kernels.Scalars(0.1, 0.9, 0.0, 1e-8, 0.1, 0.9, 1.0, 1.0)
    for key in [(True, 1, 1, True), (True, 2, 2, False), (False, 1, 0, False)]:
        for driver in kernels.drivers(*key):
            driver(tuple(s), x.copy(), x.copy(), x.copy(), x.copy(), x.copy())
p, g, v = np.linspace(-1, 1, 64).astype(np.float32), np.full(64, 0.5, np.float32), np.zeros(64, np.float32)
ref = reference.rmsprop_step(p.copy(), g, {"square_avg": v.copy()}, 1, 0.01, 0.9, 1e-8)
kernels.rmsprop_update(p, g, v, 0.01, 0.9, 1e-8)
assert np.array_equal(p, ref), (p[:4], ref[:4])
print("ok")
"""


def test_cached_code_stays_right_whatever_compiles_first(tmp_path):
    """A cached caller of a driver, loaded in a process that compiled other variants first,
    must still run the plain variant (regression: variants once shared one symbol name)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    for order in ("plain-only", "others-first", "others-first"):
        out = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, order], env=env, capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == "ok", (order, out.stdout, out.stderr[-2000:])


# ------------------------------------------------------------------ the sum of squares


def _table(arrays):
    """The chunk-table arguments for ``arrays`` as grads (one dtype)."""
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    ptrs = np.zeros((len(arrays), 5), dtype=np.int64)
    ptrs[:, 1] = [a.ctypes.data for a in arrays]
    return arrays[0][:0], ptrs, sizes, kernels.chunk_table(sizes)


@pytest.mark.parametrize("n", [0, 1, 1023, 1025, 3000, kernels.BLOCK, kernels.BLOCK + 1, BIG])
@pytest.mark.lower_bound
def test_sum_of_squares_is_the_same_bits_from_every_driver_and_the_reference(n, dtype):
    """Serial, parallel, and the chunk table (this array alone, or after another array)
    give the bits of reference.global_norm's fixed order; the value is the exactly rounded
    sum to within float64 rounding."""
    import math

    a = np.random.default_rng(n).standard_normal(n).astype(dtype) * 3
    total = kernels.sumsq_serial(a)
    assert kernels.sumsq_parallel(a) == total
    assert kernels.sumsq_segments_serial(*_table([a])) == total
    assert kernels.sumsq_segments_parallel(*_table([a])) == total
    assert math.sqrt(total) == reference.global_norm([a])
    squares = a.astype(np.float64) ** 2
    exact = math.fsum(squares) if n <= 40_000 else float(np.sum(squares))
    assert total == pytest.approx(exact, rel=1e-13, abs=0.0)
    b = np.random.default_rng(n + 1).standard_normal(1000).astype(dtype)
    assert math.sqrt(kernels.sumsq_segments_parallel(*_table([b, a]))) == reference.global_norm([b, a])


def test_the_reference_states_the_kernels_order():
    assert (reference.BLOCK, reference.LANES) == (kernels.BLOCK, kernels.LANES) and kernels.CHUNK == kernels.BLOCK


def test_sum_of_squares_does_not_depend_on_the_thread_count():
    import numba

    a = np.random.default_rng(3).standard_normal(BIG).astype(np.float32)
    arrays = [a[:400_000].copy(), a[400_000:].copy()]
    before = numba.get_num_threads()
    try:
        got = set()
        for threads in sorted({1, before}):
            numba.set_num_threads(threads)
            got.add((kernels.sumsq_parallel(a), kernels.sumsq_segments_parallel(*_table(arrays))))
        assert len(got) == 1
    finally:
        numba.set_num_threads(before)


def test_sum_of_squares_carries_nan_and_infinity():
    a = np.ones(70_000, np.float32)
    a[40_000] = np.inf
    assert kernels.sumsq_parallel(a) == np.inf
    a[50_000] = np.nan
    assert np.isnan(kernels.sumsq_serial(a)) and np.isnan(kernels.sumsq_segments_parallel(*_table([a])))


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_sum_of_squares_is_vectorised_across_its_lanes(parallel, dtype):
    """The lanes are float64: packed float64 adds on the width LLVM chose for float64 here."""
    if _isa() is None:
        pytest.skip(f"no packed-instruction patterns known for this ISA ({platform.machine()!r})")
    width = _chosen_width(np.dtype(np.float64), parallel)
    if width is None:
        pytest.skip(f"LLVM does not vectorise even a minimal sqrt loop on this host ({platform.machine()})")
    fn = kernels.sumsq_parallel if parallel else kernels.sumsq_serial
    fresh = njit(parallel=parallel, error_model="numpy", nogil=True)(fn.py_func)
    fresh(np.ones(4, dtype))
    asm = "\n".join(fresh.inspect_asm().values())
    assert width in _packed(asm, "add", np.float64), f"no packed float64 add on {width}"


@njit
def _prefetched_sum(a, start, width):
    kernels.prefetch_rows(a, start, width)
    return a.sum()


@pytest.mark.parametrize("dtype_", [np.float32, np.float64, np.int64])
def test_prefetch_is_a_write_hint_that_changes_nothing(dtype_):
    """The hint reaches LLVM as a write prefetch (rw=1, every cache level, data), and the
    array and the result are untouched."""
    a = np.arange(1000).astype(dtype_)
    before = a.copy()
    assert _prefetched_sum(a, 37, 300) == before.sum()
    np.testing.assert_array_equal(a, before)
    ir = _prefetched_sum.inspect_llvm(_prefetched_sum.signatures[-1])
    calls = re.findall(r"call void @llvm\.prefetch[.\w]*\((.*)\)", ir)
    assert calls and all(c.endswith("i32 1, i32 3, i32 1") for c in calls), calls


def test_prefetch_refuses_what_is_not_an_array():
    from numba.core.errors import TypingError

    @njit
    def bad(x):
        kernels.prefetch_write(x, 0)

    with pytest.raises(TypingError):
        bad(1.0)


# --- the one builder of the flat shells: every form, from the same body ---

_FULL = kernels.variant(True, kernels.WD_DECOUPLED, kernels.MOM_OUTSIDE, True)


def _form_case(form, n, seed=3):
    """`(arrays, more)` for a float32 step of `form` over `n` elements, `_FULL`'s state."""
    storage = kernels.storage
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 0.1).astype(np.float32)
    v, m, b = rng.random(n).astype(np.float32), *(rng.standard_normal(n).astype(np.float32) for _ in "mb")
    if form.stochastic:
        p = reference.bfloat16_round(p)
    if form.grads is not storage.NATIVE:
        g = reference.bfloat16_round(g) if form.grads.tag == "bf16" else g.astype(np.float16).view(np.uint16)
    if form.codec is storage.BFLOAT16:
        v, m, b = (reference.bfloat16_round(x) for x in (v, m, b))
    elif form.codec is storage.BLOCKWISE8:
        v, m, b = (
            reference.blockwise8_encode(v),
            reference.blockwise8_encode(m, True),
            reference.blockwise8_encode(b, True),
        )
    arrays = [p, g, v, m, b]
    if form.out:
        more = [np.zeros_like(a) for a in (p, v, m, b)]
    elif form.copy is not None:
        more = [np.zeros(n, np.uint16)]
    elif form.stochastic:
        more = [5, 99]
    else:
        more = []
    return arrays, more


_FORMS = {
    "native": kernels.Form(),
    "bfloat16 state": kernels.Form(kernels.storage.BFLOAT16),
    "8-bit state": kernels.Form(kernels.storage.BLOCKWISE8),
    "float16 grads": kernels.Form(grads=kernels.storage.FLOAT16),
    "bfloat16 copy": kernels.Form(copy=kernels.storage.BFLOAT16),
    "bfloat16 masters": kernels.Form(grads=kernels.storage.BFLOAT16, copy=kernels.storage.MASTERS["bf16"]),
    "out of place": kernels.Form(out=True),
    "stochastic": kernels.Form(grads=kernels.storage.BFLOAT16, stochastic=True),
}


@pytest.mark.parametrize("name", list(_FORMS))
def test_every_form_writes_the_same_bits_serial_and_parallel(name):
    """Each form's parallel shell writes every array it writes (an array the parallel loop
    reached through the star arguments was once dropped as dead) and the serial shell's bits;
    the arrays it does not own stay as they were."""
    form, n = _FORMS[name], 3000
    runs = []
    for parallel in (False, True):
        arrays, more = _form_case(form, n)
        before = [a.copy() for a in arrays]
        kernels.flat(_FULL, parallel, form)(tuple(ARGS), *arrays, *more)
        if form.out:
            assert all(np.array_equal(a, b) for a, b in zip(arrays, before)), "an input was written"
            written = more
        else:
            assert np.array_equal(arrays[1], before[1]), "the grad was written"
            written = [arrays[0], *arrays[2:], *(m for m in more if isinstance(m, np.ndarray))]
        assert all(not np.array_equal(w, np.zeros_like(w)) for w in written if w.size), "an array was not written"
        runs.append([w.tobytes() for w in written])
    assert runs[0] == runs[1]


def test_native_form_matches_the_out_of_place_form_and_the_reference():
    opts = dict(weight_decay=0.01, momentum=0.9, centered=True, nesterov=True, decoupled_weight_decay=True,
                bias_correction=True)  # fmt: skip
    hyper = options.resolve({"learning_rate": 0.01, **opts})
    assert options.variant_key(hyper) == _FULL
    scalars = tuple(options.scalars(hyper, 0.01, 2))
    arrays, _ = _form_case(_FORMS["native"], 1031)
    p, g, v, m, b = (a.copy() for a in arrays)
    outs = [np.empty_like(a) for a in (p, v, m, b)]
    kernels.flat(_FULL, False, kernels.Form(out=True))(scalars, p, g, v, m, b, *outs)
    kernels.dense(_FULL, True)(scalars, p, g, v, m, b)
    assert all(np.array_equal(x, y) for x, y in zip(outs, (p, v, m, b)))
    state = {"square_avg": arrays[2].copy(), "grad_avg": arrays[3].copy(), "momentum_buffer": arrays[4].copy()}
    want = reference.rmsprop_step(arrays[0].copy(), arrays[1], state, 2, 0.01, **opts)
    np.testing.assert_array_equal(p, want)
    assert all(np.array_equal(state[k], x) for k, x in zip(("square_avg", "grad_avg", "momentum_buffer"), (v, m, b)))


def test_scalars_are_one_tuple_a_namedtuple_too():
    a, b = _arrays(64, np.float32), _arrays(64, np.float32)
    shell = kernels.dense(_FULL, False)
    shell(tuple(ARGS), *a)
    shell(ARGS, *b)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(Exception, match="(?i)unpack|tuple|size"):  # eight floats: Numba refuses to type the call
        shell(tuple(ARGS)[:8], *_arrays(64, np.float32))


def test_a_shell_refuses_arrays_its_form_does_not_take():
    a = _arrays(16, np.float32)
    before = [x.copy() for x in a]
    with pytest.raises(ValueError, match=r"dense: after the five arrays it takes 0 more \(none\)"):
        kernels.dense(_FULL, False)(tuple(ARGS), *a, np.zeros(16, np.uint16))  # a copy, to a shell without one
    assert all(np.array_equal(x, y) for x, y in zip(a, before))


def test_a_form_is_checked_before_anything_is_compiled():
    storage = kernels.storage
    with pytest.raises(ValueError, match="one way"):
        kernels.flat(_FULL, False, kernels.Form(copy=storage.BFLOAT16, out=True))
    with pytest.raises(ValueError, match="stochastic: the q8 state is kept in blocks"):
        kernels.flat(_FULL, False, kernels.Form(storage.BLOCKWISE8, stochastic=True))
    with pytest.raises(ValueError, match="in place"):
        kernels.table(_FULL, False, kernels.Form(out=True))


@pytest.mark.parametrize("name", [n for n in _FORMS if n != "native"])
def test_every_form_is_vectorised(name):
    """Each form's serial shell of plain RMSprop, compiled afresh: packed square roots on the
    registers LLVM uses for vectors on this host (the native form, every variant:
    `test_hot_loop_is_vectorised_...`)."""
    if _isa() is None:
        pytest.skip(f"no packed-instruction patterns known for this ISA ({platform.machine()!r})")
    width = _chosen_width(np.dtype(np.float32), False)
    if width is None:
        pytest.skip(f"LLVM does not vectorise even a minimal sqrt loop on this host ({platform.machine()})")
    form = _FORMS[name]
    fresh = njit(error_model="numpy", nogil=True)(kernels.flat(kernels.variant(), False, form).py_func)
    arrays, more = _form_case(form, 300)
    fresh(tuple(ARGS), *arrays, *more)
    asm = "\n".join(fresh.inspect_asm().values())
    assert width in _packed(asm, "sqrt", np.float32), f"{name}: no packed sqrt on {width}"
