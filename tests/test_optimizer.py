"""fastrms.RMSprop: every variant against the NumPy reference, state, and the step's checks."""

import numpy as np
import pytest
from conftest import (
    BIG,
    DTYPES,
    SIZES,
    assert_same_state,
    assert_unchanged,
    cover_ids,
    covering,
    problem,
    run_both,
    snapshot,
)

import fastrms
from fastrms import kernels, reference, schedules
from fastrms.bench.cases import MAIN, all_variants

VARIANTS = all_variants()


# A covering design: every variant once per shell and dtype at a size with a vector body and a
# scalar tail (1031 = 1024 + 7); the other tail sizes for the main variants; the empty array
# on its own (an arithmetic test over 0 elements compares empty arrays).
@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_matches_reference_bitwise(name, dtype):
    fast, ref = run_both(VARIANTS[name], 1031, dtype)
    assert_same_state(fast, ref)
    assert fast.step_count == 50


@pytest.mark.parametrize("n", [s for s in SIZES if s not in (0, 1031)])
@pytest.mark.parametrize("name", MAIN)
@pytest.mark.lower_bound
def test_the_main_variants_match_reference_bitwise_at_every_tail_size(name, dtype, n):
    fast, ref = run_both(MAIN[name], n, dtype)
    assert_same_state(fast, ref)


@pytest.mark.parametrize("name", MAIN)
def test_an_empty_param_steps_and_counts(name):
    opt = fastrms.RMSprop(np.zeros(0, np.float32), 0.01, **MAIN[name])
    for _ in range(3):
        opt.step(np.zeros(0, np.float32))
    assert opt.step_count == 3 and opt.params.shape == (0,) and opt.square_avg.shape == (0,)


PARALLEL = covering(dtype=DTYPES)


@pytest.mark.slow
@pytest.mark.parametrize("name, case", PARALLEL, ids=cover_ids(PARALLEL))
@pytest.mark.lower_bound
def test_a_covering_set_of_variants_matches_reference_on_the_parallel_path(name, case):
    # 8 steps: every state term is live from step 2 (bias correction, momentum, centring)
    fast, ref = run_both(VARIANTS[name], BIG, case["dtype"], steps=8)
    assert fast.parallel == [fastrms.info()["parallel_mode"] != "serial"]
    assert_same_state(fast, ref)


@pytest.mark.parametrize(
    "dtype_,options,states", [(np.float32, {}, 1), (np.float64, dict(centered=True, momentum=0.5), 3)]
)
def test_the_driver_is_chosen_by_bytes_moved(dtype_, options, states):
    per_element = np.dtype(dtype_).itemsize * (3 + 2 * states)
    cut = -(-kernels.PARALLEL_MIN_BYTES // per_element)  # the first size at or above the threshold
    small = fastrms.RMSprop(np.zeros(cut - 1, dtype_), **options)
    big = fastrms.RMSprop(np.zeros(cut, dtype_), **options)
    halves = fastrms.RMSprop([np.zeros(cut // 2, dtype_), np.zeros(cut - cut // 2, dtype_)], **options)
    short = fastrms.RMSprop([np.zeros(cut // 2, dtype_), np.zeros(cut - cut // 2 - 1, dtype_)], **options)
    free = fastrms.info()["parallel_mode"] != "serial"
    assert small.parallel == [False] and big.parallel == [free]
    # arrays of one dtype are one kernel call: the bytes they move together decide
    assert halves.parallel == [free, free] and short.parallel == [False, False]


@pytest.mark.parametrize("name", MAIN)
def test_sequence_of_arrays_of_any_shape(name, dtype):
    rng = np.random.default_rng(3)
    shapes = [(2, 3), (5,), (), (4, 0), (3, 2, 2)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(3)]
    fast = fastrms.RMSprop([p.copy() for p in params], 0.01, **MAIN[name])
    ref = reference.RMSprop([p.copy() for p in params], 0.01, **MAIN[name])
    for t in range(50):
        fast.step(grads[t % 3])
        ref.step(grads[t % 3])
    assert_same_state(fast, ref)
    assert [p.shape for p in fast.params] == shapes
    assert [a.shape for a in fast.square_avg] == shapes


def test_params_are_updated_in_place_and_state_keeps_the_dtype(dtype):
    p = np.ones((3, 4), dtype)
    opt = fastrms.RMSprop(p, 0.1, momentum=0.5, centered=True)
    opt.step(np.full((3, 4), 0.5, dtype))
    assert opt.params is p
    assert np.all(p < 1)
    for arr in (opt.square_avg, opt.grad_avg, opt.momentum_buffer):
        assert arr.dtype == dtype and arr.shape == (3, 4)


def test_float32_is_computed_in_float32():
    """Equal to the float32 reference bit for bit, and not to float64 arithmetic whose results
    are rounded to float32 when stored (what a kernel that promoted would compute)."""
    p0, grads = problem(1031, np.float32)
    fast = fastrms.RMSprop(p0.copy(), 0.01, beta=0.95)
    p32, st32 = p0.copy(), {"square_avg": np.zeros_like(p0)}
    p_wide, st_wide = p0.copy(), {"square_avg": np.zeros_like(p0)}
    for t in range(1, 21):
        g = grads[t % 4]
        fast.step(g)
        p32 = reference.rmsprop_step(p32, g, st32, t, 0.01, 0.95)
        wide = {"square_avg": st_wide["square_avg"].astype(np.float64)}
        p_wide = reference.rmsprop_step(p_wide.astype(np.float64), g.astype(np.float64), wide, t, 0.01, 0.95)
        p_wide, st_wide = p_wide.astype(np.float32), {"square_avg": wide["square_avg"].astype(np.float32)}
    assert fast.params.dtype == np.float32
    np.testing.assert_array_equal(fast.params, p32)
    assert not np.array_equal(fast.params, p_wide)


def test_state_names_follow_pytorch():
    plain = fastrms.RMSprop(np.zeros(3))
    assert plain.grad_avg is None and plain.momentum_buffer is None
    full = fastrms.RMSprop(np.zeros(3), centered=True, momentum=0.9)
    assert isinstance(full.grad_avg, np.ndarray) and isinstance(full.momentum_buffer, np.ndarray)
    assert set(k.split(".")[0] for k in full.state_dict() if "." in k) == {"square_avg", "grad_avg", "momentum_buffer"}


def test_initial_scale_starts_square_avg():
    opt = fastrms.RMSprop(np.zeros(4, np.float32), initial_scale=1.0)
    assert np.array_equal(opt.square_avg, np.ones(4, np.float32))


# ---------------------------------------------------------------- equivalences between options


def test_bias_correction_with_eps_outside_is_adam_with_beta1_zero(dtype):
    p0, grads = problem(257, dtype)
    opt = fastrms.RMSprop(p0.copy(), 0.01, beta=0.99, epsilon=1e-8, bias_correction=True)
    p, m, v = p0.astype(np.float64), np.zeros(257), np.zeros(257)  # Adam, b1 = 0, written out
    for t in range(1, 51):
        g = grads[t % 4].astype(np.float64)
        m = 0.0 * m + 1.0 * g
        v = 0.99 * v + 0.01 * g * g
        p = p - 0.01 * (m / (1 - 0.0**t)) / (np.sqrt(v / (1 - 0.99**t)) + 1e-8)
        opt.step(grads[t % 4])
    np.testing.assert_allclose(opt.params, p, rtol=1e-12 if dtype == np.float64 else 2e-5, atol=1e-6)


def test_lr_inside_and_outside_momentum_agree_for_a_constant_rate(dtype):
    p0, grads = problem(300, dtype)
    a = fastrms.RMSprop(p0.copy(), 0.01, momentum=0.9)
    b = fastrms.RMSprop(p0.copy(), 0.01, momentum=0.9, lr_in_momentum=True)
    for t in range(50):
        a.step(grads[t % 4])
        b.step(grads[t % 4])
    np.testing.assert_allclose(a.params, b.params, rtol=1e-10 if dtype == np.float64 else 1e-4)
    np.testing.assert_allclose(b.momentum_buffer, 0.01 * a.momentum_buffer, rtol=1e-10 if dtype == np.float64 else 1e-4)


def test_lr_inside_and_outside_momentum_differ_under_a_schedule():
    p0, grads = problem(300, np.float64)
    sched = schedules.step_decay(0.01, 0.1, 10)
    a = fastrms.RMSprop(p0.copy(), sched, momentum=0.9)
    b = fastrms.RMSprop(p0.copy(), sched, momentum=0.9, lr_in_momentum=True)
    for t in range(30):
        a.step(grads[t % 4])
        b.step(grads[t % 4])
    assert np.max(np.abs(a.params - b.params)) > 1e-4


def test_maximize_is_minimizing_the_negated_gradient(dtype):
    p0, grads = problem(99, dtype)
    a = fastrms.RMSprop(p0.copy(), 0.01, momentum=0.5, centered=True, maximize=True)
    b = fastrms.RMSprop(p0.copy(), 0.01, momentum=0.5, centered=True)
    for t in range(50):
        a.step(grads[t % 4])
        b.step(-grads[t % 4])
    np.testing.assert_array_equal(a.params, b.params)


def test_tf1_momentum_zero_equals_no_momentum_and_eps_inside():
    p0, grads = problem(64, np.float64)
    a = fastrms.RMSprop.like("tf1", p0.copy())
    b = fastrms.RMSprop(p0.copy(), 1e-3, 0.9, 1e-10, eps_in_sqrt=True, initial_scale=1.0)
    for t in range(50):
        a.step(grads[t % 4])
        b.step(grads[t % 4])
    np.testing.assert_array_equal(a.params, b.params)


def test_zero_learning_rate_changes_no_param_but_updates_state():
    p0, grads = problem(10, np.float64)
    opt = fastrms.RMSprop(p0.copy(), 0.0)
    opt.step(grads[0])
    np.testing.assert_array_equal(opt.params, p0)
    assert np.all(opt.square_avg > 0)


# ---------------------------------------------------------------- learning rates


def test_schedule_is_called_with_the_count_of_steps_taken():
    seen = []

    def sched(count):
        seen.append(count)
        return 0.01 / (1 + count)

    opt = fastrms.RMSprop(np.ones(3), sched)
    assert opt.last_learning_rate is None
    assert opt.current_learning_rate == 0.01
    opt.step(np.ones(3))
    opt.step(np.ones(3))
    assert seen[-2:] == [0, 1]
    assert opt.last_learning_rate == 0.005
    assert opt.current_learning_rate == pytest.approx(0.01 / 3)
    assert opt.step_count == 2


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf"), "0.1", None])
def test_a_schedule_returning_a_bad_rate_is_refused_before_any_write(bad):
    opt = fastrms.RMSprop(np.ones(5), lambda count: 0.1 if count == 0 else bad)
    opt.step(np.ones(5))
    before = snapshot(opt)
    with pytest.raises((TypeError, ValueError), match="learning_rate"):
        opt.step(np.ones(5))
    assert_unchanged(opt, before)
    assert opt.step_count == 1


# ---------------------------------------------------------------- state_dict


@pytest.mark.parametrize("name", [*MAIN, "15-centered-plain"])
def test_state_dict_round_trip_continues_bit_identically(name, dtype):
    options = MAIN.get(name) or dict(centered=True, bias_correction=True, eps_in_sqrt=True)
    sched = schedules.cosine_decay(0.01, 40)
    p0, grads = problem(1031, dtype)
    straight = fastrms.RMSprop(p0.copy(), sched, **options)
    first = fastrms.RMSprop(p0.copy(), sched, **options)
    for t in range(20):
        straight.step(grads[t % 4])
        first.step(grads[t % 4])
    saved = first.state_dict()
    resumed = fastrms.RMSprop(first.params.copy(), sched, **options)
    resumed.load_state_dict(saved)
    assert resumed.step_count == 20
    for t in range(20, 50):
        straight.step(grads[t % 4])
        resumed.step(grads[t % 4])
    np.testing.assert_array_equal(straight.params, resumed.params)
    for key, value in straight.state_dict().items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, resumed.state_dict()[key])
        else:
            assert value == resumed.state_dict()[key]


def test_state_dict_is_plain_arrays_and_scalars_and_a_copy():
    opt = fastrms.RMSprop([np.ones(3), np.ones((2, 2))], 0.1, momentum=0.9)
    opt.step([np.ones(3), np.ones((2, 2))])
    d = opt.state_dict()
    assert all(isinstance(v, (np.ndarray, bool, int, float, str)) for v in d.values())
    assert d["step_count"] == 1 and d["num_params"] == 2 and d["learning_rate"] == 0.1
    assert d["state_storage"] == "native"  # the one string: how the state arrays are stored
    assert d["square_avg.1"].shape == (2, 2)
    d["square_avg.0"][:] = 123.0
    assert not np.any(opt.square_avg[0] == 123.0)


def test_load_state_dict_restores_numeric_hyperparameters():
    src = fastrms.RMSprop(np.ones(4), 0.05, beta=0.8, momentum=0.9, centered=True)
    src.step(np.ones(4))
    dst = fastrms.RMSprop(src.params.copy(), 0.1, momentum=0.5, centered=True)
    dst.load_state_dict(src.state_dict())
    assert dst.hyperparameters == src.hyperparameters
    np.testing.assert_array_equal(dst.momentum_buffer, src.momentum_buffer)
    src.step(np.ones(4) * 2)
    dst.step(np.ones(4) * 2)
    np.testing.assert_array_equal(src.params, dst.params)


@pytest.mark.parametrize(
    "other",
    [dict(centered=True), dict(momentum=0.9), dict(maximize=True), dict(eps_in_sqrt=True), dict(weight_decay=0.1)],
)
def test_load_state_dict_of_another_variant_is_refused(other):
    src = fastrms.RMSprop(np.ones(4), 0.05, **other)
    dst = fastrms.RMSprop(np.ones(4), 0.05)
    before = snapshot(dst)
    with pytest.raises(ValueError, match="another variant: " + list(other)[0]):
        dst.load_state_dict(src.state_dict())
    assert_unchanged(dst, before)


def _bad_state_dicts():
    opt = fastrms.RMSprop([np.ones(3), np.ones(2)], 0.1, momentum=0.9)
    opt.step([np.ones(3), np.ones(2)])
    good = opt.state_dict()

    def edit(**changes):
        d = dict(good)
        for k, v in changes.items():
            if v is None:
                d.pop(k.replace("__", "."))
            else:
                d[k.replace("__", ".")] = v
        return d

    return [
        ("not a dict", [good]),
        ("format_version", edit(format_version=99)),
        ("missing", edit(beta=None)),
        ("num_params", edit(num_params=3)),
        ("step_count", edit(step_count=-1)),
        ("beta", edit(beta=1.5)),
        ("square_avg.0", edit(square_avg__0=np.ones(3, np.float32))),
        ("square_avg.1", edit(square_avg__1=np.ones(5))),
        ("momentum_buffer.1", edit(momentum_buffer__1=None)),
        ("does not use", edit(grad_avg__0=np.ones(3))),
        ("nesterov", edit(nesterov=True, momentum=0.0)),
    ]


@pytest.mark.parametrize("label,bad", _bad_state_dicts(), ids=[c[0] for c in _bad_state_dicts()])
def test_a_bad_state_dict_is_refused_and_changes_nothing(label, bad):
    opt = fastrms.RMSprop([np.ones(3), np.ones(2)], 0.2, momentum=0.5)
    opt.step([np.full(3, 0.5), np.full(2, 0.5)])
    before = snapshot(opt)
    with pytest.raises((TypeError, ValueError)):
        opt.load_state_dict(bad)
    assert_unchanged(opt, before)


# ---------------------------------------------------------------- bad input


def _bad_params():
    base = np.ones(6)
    ro = np.ones(6)
    ro.flags.writeable = False
    half = np.ones(6, np.float16)
    return [
        ("int", np.ones(6, np.int64), TypeError, "float32 or float64"),
        ("float16 beside float32", [np.ones(6, np.float16), np.ones(6, np.float32)], TypeError, "all of one dtype"),
        ("byteswapped float16", np.ones(6, ">f2" if np.little_endian else "<f2"), TypeError, "byte"),
        ("16-bit overlap", [half[:4], half[2:]], ValueError, "share memory"),
        ("complex", np.ones(6, np.complex128), TypeError, "complex128"),
        ("object", np.array([1.0, 2.0], dtype=object), TypeError, "object"),
        ("byteswapped", np.ones(6, ">f8") if np.little_endian else np.ones(6, "<f8"), TypeError, "byte"),
        ("noncontig", base[::2], ValueError, "C-contiguous"),
        ("fortran", np.ones((3, 4), order="F"), ValueError, "C-contiguous"),
        ("readonly", ro, ValueError, "writeable"),
        ("list", [1.0, 2.0], TypeError, r"params\[0\]"),
        ("str", "abc", TypeError, "params"),
        ("overlap", [base[:4], base[2:]], ValueError, "share memory"),
        ("same twice", [base, base], ValueError, "share memory"),
    ]


@pytest.mark.parametrize("label,params,exc,match", _bad_params(), ids=[c[0] for c in _bad_params()])
def test_bad_params_are_refused(label, params, exc, match):
    with pytest.raises(exc, match=match):
        fastrms.RMSprop(params)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(learning_rate=-0.1), "learning_rate"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(learning_rate="0.1"), "learning_rate"),
        (dict(beta=1.0), "beta"),
        (dict(beta=-0.01), "beta"),
        (dict(beta=float("nan")), "beta"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=float("inf")), "epsilon"),
        (dict(momentum=-0.5), "momentum"),
        (dict(nesterov=True), "nesterov"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(initial_scale=float("nan")), "initial_scale"),
        (dict(centered=1), "centered"),
        (dict(maximize="yes"), "maximize"),
        (dict(beta=True), "beta"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        fastrms.RMSprop(np.ones(3), **kwargs)


def _bad_grads():
    return [
        ("list", lambda p, o: [1.0] * 6, TypeError, "ndarray"),
        ("dtype", lambda p, o: np.ones(6, np.float32), TypeError, "dtype float64"),
        ("int", lambda p, o: np.ones(6, np.int64), TypeError, "dtype"),
        ("shape", lambda p, o: np.ones(7), ValueError, "shape"),
        ("2d shape", lambda p, o: np.ones((2, 3)), ValueError, "shape"),
        ("noncontig", lambda p, o: np.ones(12)[::2], ValueError, "C-contiguous"),
        ("is params", lambda p, o: p, ValueError, "shares memory"),
        ("is state", lambda p, o: o.square_avg, ValueError, "shares memory"),
        ("momentum buffer", lambda p, o: o.momentum_buffer, ValueError, "shares memory"),
        ("view of params", lambda p, o: p.reshape(2, 3).reshape(6), ValueError, "shares memory"),
        ("nan-free but None", lambda p, o: None, TypeError, "ndarray"),
    ]


@pytest.mark.parametrize("label,make,exc,match", _bad_grads(), ids=[c[0] for c in _bad_grads()])
def test_bad_grads_raise_and_leave_everything_bitwise_unchanged(label, make, exc, match):
    p = np.linspace(-1, 1, 6)
    opt = fastrms.RMSprop(p, 0.1, momentum=0.9, centered=True)
    opt.step(np.full(6, 0.3))
    before = snapshot(opt)
    with pytest.raises(exc, match=match):
        opt.step(make(p, opt))
    assert_unchanged(opt, before)
    assert opt.step_count == 1


def test_a_bad_grad_late_in_a_sequence_leaves_the_earlier_arrays_unchanged():
    params = [np.ones(3), np.ones(4), np.ones(5)]
    opt = fastrms.RMSprop(params, 0.1)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"grads\[2\].*shape"):
        opt.step([np.ones(3), np.ones(4), np.ones(6)])
    with pytest.raises(ValueError, match=r"grads\[1\].*shares memory"):
        opt.step([np.ones(3), params[2][:4], np.ones(5)])
    with pytest.raises(ValueError, match="3 arrays"):
        opt.step([np.ones(3), np.ones(4)])
    with pytest.raises(TypeError, match="list or tuple"):
        opt.step(np.ones(3))
    assert_unchanged(opt, before)


def test_overlap_check_by_address_with_many_arrays():
    params = [np.ones(4) for _ in range(20)]  # > 8 owned arrays: the bisection path
    opt = fastrms.RMSprop(params, 0.1)
    grads = [np.ones(4) for _ in range(20)]
    opt.step(grads)
    before = snapshot(opt)
    for bad in (params[13], params[0], params[19].reshape(2, 2).reshape(4), opt.square_avg[19], opt.square_avg[0]):
        with pytest.raises(ValueError, match=r"grads\[5\] shares memory"):
            opt.step(grads[:5] + [bad] + grads[6:])
    assert_unchanged(opt, before)
    opt.step(grads)  # and good grads still pass the bisection
    assert opt.step_count == 2


def test_grads_may_share_memory_with_each_other():
    g = np.full(4, 0.5)
    opt = fastrms.RMSprop([np.ones(4), np.ones(4)], 0.1)
    opt.step([g, g])
    np.testing.assert_array_equal(opt.params[0], opt.params[1])


def test_like_presets_and_aliases():
    opt = fastrms.RMSprop.like("torch", np.ones(3), lr=0.5, alpha=0.8, momentum=0.1)
    h = opt.hyperparameters
    assert (h["learning_rate"], h["beta"], h["epsilon"], h["momentum"]) == (0.5, 0.8, 1e-8, 0.1)
    assert not h["eps_in_sqrt"] and not h["lr_in_momentum"]
    keras = fastrms.RMSprop.like("keras", np.ones(3), rho=0.8).hyperparameters
    assert (
        keras["beta"] == 0.8 and keras["epsilon"] == 1e-7 and keras["eps_in_sqrt"] and keras["decoupled_weight_decay"]
    )
    assert fastrms.RMSprop.like("tf1", np.ones(3)).hyperparameters["initial_scale"] == 1.0
    with pytest.raises(ValueError, match="name must be one of"):
        fastrms.RMSprop.like("adam", np.ones(3))
    with pytest.raises(TypeError, match="given twice"):
        fastrms.RMSprop.like("torch", np.ones(3), lr=0.1, learning_rate=0.2)


def test_repr_names_the_options():
    text = repr(fastrms.RMSprop(np.ones(3), 0.1, momentum=0.9))
    assert "momentum=0.9" in text and "3 elements" in text


@pytest.mark.parametrize("name", MAIN)  # the wrapper's path differs by the state kept, not by the formula
def test_a_step_allocates_nothing(name):
    """tracemalloc sees NumPy's buffers: a temporary of a 1e6-element array would be 4 MB."""
    import tracemalloc

    p0, grads = problem(1_000_000, np.float32)
    opt = fastrms.RMSprop(p0, schedules.exponential_decay(0.01, 0.9, 10), **MAIN[name])
    opt.step(grads[0])  # compile or load from the cache outside the trace
    tracemalloc.start()
    try:
        for t in range(10):
            opt.step(grads[t % 4])
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16_384, f"{peak} bytes allocated during 10 steps"


def test_load_state_dict_copies_into_the_existing_state_arrays():
    src = fastrms.RMSprop(np.ones(4), 0.1, momentum=0.9)
    src.step(np.full(4, 0.5))
    dst = fastrms.RMSprop(src.params.copy(), 0.1, momentum=0.9)
    view = dst.square_avg
    dst.load_state_dict(src.state_dict())
    assert dst.square_avg.base is view.base or np.shares_memory(dst.square_avg, view)
    np.testing.assert_array_equal(view, src.square_avg)


# ------------------------------------------------------------------ hardening: arrays at the door


def _matrix(a):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.asmatrix(a)


class _Sub(np.ndarray):
    """An ndarray subclass whose reshape lies, as np.matrix's does (it stays 2-D)."""

    def reshape(self, *shape, **kw):
        return np.ndarray.reshape(self, self.shape)


def test_a_matrix_param_is_updated_exactly_like_a_plain_array(dtype):
    p0, grads = problem(12, dtype, shape=(3, 4))
    m, plain = _matrix(p0.copy()), p0.copy()
    fm, fp = fastrms.RMSprop(m, 0.01, momentum=0.9), fastrms.RMSprop(plain, 0.01, momentum=0.9)
    for t in range(20):
        fm.step(_matrix(grads[t % 4]))
        fp.step(grads[t % 4])
    assert fm.params is m and type(m) is np.matrix
    np.testing.assert_array_equal(np.asarray(m), plain)


def test_a_subclass_whose_reshape_lies_cannot_make_the_kernel_overrun(dtype):
    guard = np.zeros(64, dtype)
    p = guard[16:48].reshape(4, 8).view(_Sub)
    fastrms.RMSprop(p, 0.1).step(np.ones((4, 8), dtype).view(_Sub))
    assert np.all(guard[:16] == 0) and np.all(guard[48:] == 0) and np.all(guard[16:48] < 0)


def test_masked_arrays_are_refused_rather_than_their_mask_ignored():
    with pytest.raises(TypeError, match="params.*masked"):
        fastrms.RMSprop(np.ma.array(np.ones(3), mask=[0, 1, 0]))
    opt = fastrms.RMSprop([np.ones(3), np.ones(3)], 0.1)
    before = snapshot(opt)
    with pytest.raises(TypeError, match=r"grads\[1\].*masked"):
        opt.step([np.ones(3), np.ma.array(np.ones(3), mask=[0, 1, 0])])
    assert_unchanged(opt, before)


def test_unaligned_arrays_are_refused():
    raw = bytearray(8 * 5 + 1)
    unaligned = np.frombuffer(raw, dtype=np.float64, offset=1, count=5)
    assert not unaligned.flags.aligned
    with pytest.raises(ValueError, match="params must be aligned"):
        fastrms.RMSprop(unaligned)
    opt = fastrms.RMSprop(np.ones(5))
    with pytest.raises(ValueError, match="grads must be aligned"):
        opt.step(unaligned)


def _bad_last_grads(dtype):
    """Every kind of bad grad, to stand last in a multi-array step."""
    good = np.ones((3, 4), dtype)
    raw = bytearray(good.nbytes + 1)
    return {
        "matrix of another shape": (_matrix(np.ones((4, 3), dtype)), ValueError),
        "masked": (np.ma.array(good), TypeError),
        "other dtype": (good.astype(np.float16), TypeError),
        "byte-swapped": (good.astype(good.dtype.newbyteorder()), TypeError),
        "integer": (np.ones((3, 4), np.int64), TypeError),
        "wrong shape": (np.ones(12, dtype), ValueError),
        "strided": (np.ones((3, 8), dtype)[:, ::2], ValueError),
        "fortran": (np.asfortranarray((np.ones((3, 4)) + np.arange(4)).astype(dtype)), ValueError),
        "unaligned": (np.frombuffer(raw, dtype=dtype, offset=1).reshape(3, 4), ValueError),
        "a list": ([[1.0] * 4] * 3, TypeError),
        "None": (None, TypeError),
        "the param itself": ("param", ValueError),
        "a view of the state": ("state", ValueError),
    }


@pytest.mark.parametrize("kind", list(_bad_last_grads(np.float64)))
def test_a_bad_last_grad_of_any_kind_leaves_everything_bitwise_unchanged(kind, dtype):
    params = [np.ones(5, dtype), np.full((2, 2), 2.0, dtype), np.ones((3, 4), dtype)]
    opt = fastrms.RMSprop(params, 0.1, momentum=0.9, centered=True)
    grads = [np.full(5, 0.5, dtype), np.full((2, 2), -0.5, dtype)]
    opt.step([*grads, np.ones((3, 4), dtype)])
    before = snapshot(opt)
    bad, exc = _bad_last_grads(dtype)[kind]
    if isinstance(bad, str):
        bad = params[2] if bad == "param" else opt.square_avg[2]
    with pytest.raises(exc):
        opt.step([*grads, bad])
    assert_unchanged(opt, before)
    assert opt.step_count == 1


def test_a_param_made_read_only_after_construction_is_not_written():
    w = np.ones(4)
    opt = fastrms.RMSprop(w, 0.1)
    w.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        opt.step(np.ones(4))
    assert np.all(w == 1) and opt.step_count == 0


def test_two_threads_in_one_optimizer_get_a_clear_error_not_corruption():
    import threading

    p = np.zeros(10)
    inside, release = threading.Event(), threading.Event()

    def schedule(count):  # blocks, holding the first thread inside step
        inside.set()
        release.wait(10)
        return 0.1

    opt = fastrms.RMSprop(p, schedule)
    first = threading.Thread(target=opt.step, args=(np.ones(10),))
    first.start()
    assert inside.wait(10)
    with pytest.raises(RuntimeError, match="another thread"):
        opt.step(np.ones(10))
    release.set()
    first.join(10)
    assert opt.step_count == 1


def test_a_step_entered_again_from_its_own_thread_is_refused_and_the_outer_step_changes_nothing():
    p = np.zeros(10)
    calls = []

    def schedule(count):  # steps the optimizer it schedules, from inside its step
        calls.append(count)
        if len(calls) == 1:
            opt.step(np.ones(10))
        return 0.1

    opt = fastrms.RMSprop(p, schedule)
    with pytest.raises(RuntimeError, match="another thread while a step was running"):
        opt.step(np.ones(10))
    assert np.all(p == 0) and opt.step_count == 0
    opt.step(np.ones(10))  # the lock was given back
    assert opt.step_count == 1 and np.all(p < 0)


def test_after_the_first_step_takes_the_kernels_entry_point_every_check_still_runs_first():
    p = np.linspace(-1, 1, 1000).astype(np.float32)
    twin_p = p.copy()
    opt, twin = fastrms.RMSprop(p), fastrms.RMSprop(twin_p)
    first, second = np.ones(1000, np.float32), np.arange(1000, dtype=np.float32) / 1000
    opt.step(first)
    twin.step(first)
    assert opt._plan.settled and not hasattr(opt._plan.update(), "overloads")  # the machine code itself
    bad = [
        (np.ones(1000, np.float64), TypeError, "must have dtype float32"),
        (np.ones(2000, np.float32)[::2], ValueError, "C-contiguous"),
        (np.ones(999, np.float32), ValueError, "must have shape"),
        (np.ones((1000, 1), np.float32), ValueError, "must have shape"),
        (p, ValueError, "shares memory"),
        ([1.0] * 1000, TypeError, "numpy.ndarray"),
    ]
    for grad, error, match in bad:
        with pytest.raises(error, match=match):
            opt.step(grad)
    p.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        opt.step(second)
    p.flags.writeable = True
    assert opt.step_count == 1
    opt.step(second)
    twin.step(second)
    np.testing.assert_array_equal(p, twin_p)  # the refused steps wrote nothing
    assert opt.step_count == twin.step_count == 2


# ------------------------------------------------------------------ hardening: numbers that do not fit the dtype


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epsilon=1e-46), "epsilon=1e-46 rounds to 0 in float32"),
        (dict(epsilon=1e-40), "epsilon=1e-40 is subnormal"),
        (dict(learning_rate=1e39), "learning_rate=1e\\+39 overflows to infinity in float32"),
        (dict(momentum=1e39), "momentum=1e\\+39 overflows"),
        (dict(weight_decay=1e39), "weight_decay=1e\\+39 overflows"),
        (dict(initial_scale=1e39), "initial_scale=1e\\+39 overflows"),
        (dict(learning_rate=1e20, weight_decay=1e20), "learning_rate \\* weight_decay=1e\\+40 overflows"),
        (dict(beta=1 - 1e-9), "beta=0.999999999 rounds to 1 in float32"),
        (dict(learning_rate=10**400), "learning_rate must be finite, got an integer too large"),
    ],
)
def test_hyperparameters_must_survive_rounding_to_the_params_dtype(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastrms.RMSprop(np.ones(3, np.float32), **kwargs)


def test_the_same_values_are_fine_in_float64():
    fastrms.RMSprop(np.ones(3), epsilon=1e-46, learning_rate=1e39, beta=1 - 1e-9).step(np.ones(3))


def test_a_schedule_value_that_overflows_the_dtype_is_refused_before_any_write():
    opt = fastrms.RMSprop(np.ones(3, np.float32), lambda count: 1e-3 if count < 2 else 1e39)
    opt.step(np.ones(3, np.float32))
    opt.step(np.ones(3, np.float32))
    before = snapshot(opt)
    with pytest.raises(ValueError, match="schedule's value at count 2.*float32"):
        opt.step(np.ones(3, np.float32))
    assert_unchanged(opt, before)
    with pytest.raises(ValueError, match="finite"):
        fastrms.RMSprop(np.ones(3), lambda count: 10**400).step(np.ones(3))


@pytest.mark.parametrize("n", [7, BIG])
def test_with_nan_grads_bit_for_bit_holds_everywhere_but_the_nans_sign(n, dtype):
    """The README's promise: finite results are bitwise equal to the reference; where a NaN
    enters, both give NaN in the same places (the NaN's sign bit may differ)."""
    p0, grads = problem(n, dtype)
    bad = grads[0].copy()
    bad[::3] = np.nan
    fast = fastrms.RMSprop(p0.copy(), 0.01, momentum=0.9, centered=True)
    ref = reference.RMSprop(p0.copy(), 0.01, momentum=0.9, centered=True)
    for g in (grads[1], bad, grads[2]):
        fast.step(g)
        ref.step(g)
    got, want = fast.params, ref.params[0]
    nan = np.isnan(want)
    assert nan.any() and np.array_equal(np.isnan(got), nan)
    assert got[~nan].tobytes() == want[~nan].tobytes()


needs_ml_dtypes = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("ml_dtypes") is None,
    reason="ml_dtypes is not installed (pip install ml_dtypes)",
)


# ------------------------------------------------------------------ the dense shell's array formats

#: Every pair of (variant factor, state storage, grad format, copy format) in some case:
#: the dense shell's formats are compile-time parameters, and their product with the 30
#: variants is a compile bill, not a test.
FORMATS = covering(
    storage=("native", "bfloat16", "8bit"), grads=("float32", "bfloat16", "float16"), copy=(None, "bfloat16", "float16")
)


def _format(name):
    return {"float32": np.float32, "float16": np.float16}.get(name) or __import__("ml_dtypes").bfloat16


@needs_ml_dtypes
@pytest.mark.parametrize("name, case", FORMATS, ids=cover_ids(FORMATS))
def test_a_covering_set_of_variants_and_array_formats_matches_reference_bitwise(name, case):
    p0, grads = problem(1031, np.float32)
    grads = [g.astype(_format(case["grads"])) for g in grads]
    opts = {**VARIANTS[name], "state_storage": case["storage"]}
    copies = [None, None] if case["copy"] is None else [np.zeros(1031, _format(case["copy"])) for _ in range(2)]
    fast = fastrms.RMSprop(p0.copy(), 0.01, copy_to=copies[0], **opts)
    ref = reference.RMSprop(p0.copy(), 0.01, copy_to=copies[1], **opts)
    for t in range(12):
        fast.step(grads[t % 4])
        ref.step(grads[t % 4])
    assert_same_state(fast, ref)
    if case["copy"] is not None:
        assert copies[0].view(np.uint16).tobytes() == copies[1].view(np.uint16).tobytes()
        assert copies[0].astype(np.float32).tobytes() != np.zeros(1031, np.float32).tobytes()
    if case["storage"] == "bfloat16":
        assert str(fast.square_avg.dtype) == "bfloat16" and fast.square_avg.nbytes == fast.params.nbytes // 2
    elif case["storage"] == "8bit":
        assert fast.square_avg.dtype == np.float32  # the decoded values, a copy
        assert fast.state_dict()["square_avg.0"].nbytes == 5 * 260  # 1031 values: 5 blocks of 256 codes and a scale


# ------------------------------------------------------------------ state_storage="bfloat16"


@needs_ml_dtypes
@pytest.mark.parametrize("name", MAIN)
def test_bfloat16_state_matches_reference_on_the_parallel_path(name):
    fast, ref = run_both({**MAIN[name], "state_storage": "bfloat16"}, BIG, np.float32, steps=8)
    assert fast.parallel == [fastrms.info()["parallel_mode"] != "serial"]
    assert_same_state(fast, ref)


@needs_ml_dtypes
@pytest.mark.parametrize("tile", [False, True], ids=["segments", "flat"])
def test_bfloat16_state_over_many_arrays_and_clipped_matches_reference(tile):
    rng = np.random.default_rng(5)
    shapes = [(31, 7), (1,), (1024,), (5, 5)]
    if tile:
        _, params = fastrms.pack([np.asarray(rng.standard_normal(s), np.float32) for s in shapes])
    else:
        params = [np.asarray(rng.standard_normal(s), np.float32) for s in shapes]
    mine = [p.copy() for p in params]
    options = dict(momentum=0.9, centered=True, clip_global_norm=3.0, skip_nonfinite=True, state_storage="bfloat16")
    fast = fastrms.RMSprop(params, 0.01, initial_scale=0.5, **options)
    ref = reference.RMSprop(mine, 0.01, initial_scale=0.5, **options)
    assert fast.kernel_calls == ["flat" if tile else "segments"]
    for t in range(6):
        grads = [np.asarray(rng.standard_normal(s), np.float32) for s in shapes]
        if t == 3:
            grads[2][5] = np.nan  # a refused step: nothing written, counted
        if tile and t % 2:
            _, grads = fastrms.pack(grads)  # grads that tile one buffer: the one flat call
        fast.step(grads)
        ref.step(grads)
    assert fast.skipped_steps == ref.skipped_steps == 1 and fast.last_grad_norm == ref.last_grad_norm
    assert_same_state(fast, ref)


@needs_ml_dtypes
def test_bfloat16_state_starts_at_initial_scale_rounded_as_it_is_stored():
    opt = fastrms.RMSprop(np.zeros(3, np.float32), initial_scale=0.1, state_storage="bfloat16")
    assert opt.square_avg.view(np.uint16).tolist() == [reference.bfloat16_round(np.float32(0.1))] * 3
    assert opt.square_avg.astype(np.float32)[0] == reference.bfloat16_value(reference.bfloat16_round(np.float32(0.1)))


def test_bfloat16_state_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="state_storage='bfloat16' keeps the state of float32 params; these params "
                                         "are float64"):  # fmt: skip
        fastrms.RMSprop([np.zeros(3, np.float32), np.zeros(3)], state_storage="bfloat16")
    with pytest.raises(ValueError, match="dense_rows=True needs state_storage='native'"):
        fastrms.RMSprop(np.zeros((3, 2), np.float32), dense_rows=True, state_storage="bfloat16")
    with pytest.raises(ValueError, match=r"state_storage must be one of \['native', 'bfloat16', '8bit'\], got 'fp8'"):
        fastrms.RMSprop(np.zeros(3, np.float32), state_storage="fp8")
    with pytest.raises(TypeError, match=r"state_storage must be one of \['native', 'bfloat16', '8bit'\], got int"):
        fastrms.RMSprop(np.zeros(3, np.float32), state_storage=16)


@needs_ml_dtypes
def test_step_rows_with_bfloat16_state_is_refused_with_nothing_written():
    opt = fastrms.RMSprop(np.ones((4, 3), np.float32), state_storage="bfloat16")
    before = snapshot(opt)
    with pytest.raises(ValueError, match="step_rows needs state_storage='native'"):
        opt.step_rows(np.array([1]), np.ones((1, 3), np.float32))
    assert_unchanged(opt, before)
    assert opt.step_count == 0


def test_bfloat16_state_without_ml_dtypes_says_what_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ml_dtypes", None)  # `import ml_dtypes` fails
    with pytest.raises(ImportError, match=r"pip install ml_dtypes"):
        fastrms.RMSprop(np.zeros(3, np.float32), state_storage="bfloat16")


# ------------------------------------------------------------------ state_storage="8bit"


@pytest.mark.parametrize("name", MAIN)
def test_8bit_state_matches_reference_on_the_parallel_path(name):
    fast, ref = run_both({**MAIN[name], "state_storage": "8bit"}, BIG, np.float32, steps=8)
    assert fast.parallel == [fastrms.info()["parallel_mode"] != "serial"]
    assert_same_state(fast, ref)


def test_8bit_state_over_many_arrays_clipped_with_a_copy_and_16_bit_grads_matches_reference():
    rng = np.random.default_rng(6)
    shapes = [(31, 7), (1,), (kernels.CHUNK + 300,), (5, 5)]  # one array spans two chunks, mid-block
    _, params = fastrms.pack([np.asarray(rng.standard_normal(s), np.float32) for s in shapes])  # tiles: still a table
    mine = [p.copy() for p in params]
    copies = [np.zeros(s, np.float16) for s in shapes]
    theirs = [np.zeros(s, np.float16) for s in shapes]
    options = dict(momentum=0.9, centered=True, clip_global_norm=3.0, skip_nonfinite=True, state_storage="8bit")
    fast = fastrms.RMSprop(params, 0.01, initial_scale=0.5, copy_to=copies, **options)
    ref = reference.RMSprop(mine, 0.01, initial_scale=0.5, copy_to=theirs, **options)
    assert fast.kernel_calls == ["segments"]  # each param's state starts on a block of its own
    for t in range(6):
        grads = [np.asarray(rng.standard_normal(s) * np.exp(rng.uniform(-9, 3, s)), np.float32) for s in shapes]
        if t == 3:
            grads[2][5] = np.nan  # a refused step: nothing written, counted
        if t % 2:
            grads = [g.astype(np.float16) for g in grads]  # read widened, in the same pass
        fast.step(grads)
        ref.step(grads)
    assert fast.skipped_steps == ref.skipped_steps == 1 and fast.last_grad_norm == ref.last_grad_norm
    assert_same_state(fast, ref)
    for c, d in zip(copies, theirs):
        np.testing.assert_array_equal(c.view(np.uint16), d.view(np.uint16))


def test_8bit_state_starts_at_initial_scale_exactly_and_takes_a_quarter_of_the_bytes():
    opt = fastrms.RMSprop(np.zeros(100_000, np.float32), initial_scale=0.1, state_storage="8bit", momentum=0.9)
    assert (opt.square_avg == np.float32(0.1)).all() and (opt.momentum_buffer == 0).all()
    assert not np.signbit(opt.momentum_buffer).any()  # +0, as a fresh buffer is
    kept = sum(a.nbytes for k, a in opt.state_dict().items() if isinstance(a, np.ndarray))
    assert kept <= 0.27 * 2 * opt.params.nbytes  # the target: at most 0.27x of float32 state


@pytest.mark.parametrize(
    "options, per_element",
    [
        ({}, 4),
        ({"momentum": 0.9, "centered": True}, 12),
        ({"state_storage": "bfloat16"}, 2),
        ({"state_storage": "8bit", "momentum": 0.9}, 2),
    ],  # fmt: skip
    ids=["float32", "3 arrays", "bfloat16", "8bit"],
)
def test_state_nbytes_counts_the_state_as_stored(options, per_element):
    params = [np.zeros(4096, np.float32), np.zeros((64, 32), np.float32)]
    opt = fastrms.RMSprop(params, **options)
    stored = sum(a.nbytes for k, a in opt.state_dict().items() if isinstance(a, np.ndarray))
    assert opt.state_nbytes == stored  # what a checkpoint holds
    n = 4096 + 64 * 32
    assert per_element * n <= opt.state_nbytes <= per_element * n * 1.05  # 8bit: the block scales besides
    rows = fastrms.RMSprop(np.zeros((64, 32), np.float32), dense_rows=True)
    assert rows.state_nbytes == 64 * 32 * 4 + 64 * 8  # and a step counter per row


def test_8bit_state_moves_the_params_as_float32_state_does_within_its_rounding():
    fast, _ = run_both({"state_storage": "8bit"}, 4096, np.float32, steps=20)
    full, _ = run_both({}, 4096, np.float32, steps=20)
    moved = np.abs(full.params - problem(4096, np.float32)[0])
    assert not np.array_equal(fast.params, full.params)  # the rounding is real
    np.testing.assert_allclose(fast.params, full.params, rtol=0, atol=0.05 * moved.max())  # and small
    # each store rounds v by at most h = 2^(1/16) - 1 (4.4%) of itself, and the EMA forgets
    # an old error at the rate beta: v is kept within h / (1 - beta) = 44% (beta 0.9), and
    # typically within one rounding (the block scales move every step, so the roundings do
    # not all agree; the same bits on any machine)
    error, h = np.abs(fast.square_avg / full.square_avg - 1), 2 ** (1 / 16) - 1
    assert error.max() <= h / (1 - 0.9) and np.median(error) < h


def test_8bit_state_is_refused_where_it_does_not_apply():
    with pytest.raises(
        ValueError, match="state_storage='8bit' keeps the state of float32 params; these params are float64"
    ):
        fastrms.RMSprop([np.zeros(3, np.float32), np.zeros(3)], state_storage="8bit")
    with pytest.raises(ValueError, match="dense_rows=True needs state_storage='native'"):
        fastrms.RMSprop(np.zeros((3, 2), np.float32), dense_rows=True, state_storage="8bit")
    opt = fastrms.RMSprop(np.ones((4, 3), np.float32), state_storage="8bit")
    before = snapshot(opt)
    with pytest.raises(ValueError, match="step_rows needs state_storage='native'"):
        opt.step_rows(np.array([1]), np.ones((1, 3), np.float32))
    assert_unchanged(opt, before)


# ------------------------------------------------------------------ state_layout="rowwise"

ROWWISE = covering(keep=lambda name, key: not key.centered)


@pytest.mark.parametrize("name, case", ROWWISE, ids=cover_ids(ROWWISE))
def test_a_covering_set_of_non_centered_variants_with_rowwise_state_matches_reference_bitwise(name, case):
    options = {**VARIANTS[name], "state_layout": "rowwise"}
    fast, ref = run_both(options, None, np.float32, shape=(103, 10))
    assert_same_state(fast, ref)
    assert fast.square_avg.shape == (103,) and fast.kernel_calls == ["rowwise"]


def test_rowwise_state_over_many_params_clipped_and_in_parallel_matches_reference(dtype):
    rng = np.random.default_rng(8)
    shapes = [(BIG // 20, 20), (7,), (3, 4, 5), ()]  # a 1-D param's rows are its elements; a 0-d one is a row
    params = [np.asarray(rng.standard_normal(s), dtype) for s in shapes]
    mine = [p.copy() for p in params]
    options = dict(momentum=0.9, clip_global_norm=50.0, skip_nonfinite=True, state_layout="rowwise", initial_scale=0.1)
    fast, ref = fastrms.RMSprop(params, 0.01, **options), reference.RMSprop(mine, 0.01, **options)
    assert fast.parallel[0] == (fastrms.info()["parallel_mode"] != "serial")
    for t in range(5):
        grads = [np.asarray(rng.standard_normal(s), dtype) for s in shapes]
        if t == 2:
            grads[1][3] = np.nan  # refused: counted, nothing written
        fast.step(grads)
        ref.step(grads)
    assert fast.skipped_steps == 1 and fast.last_grad_norm == ref.last_grad_norm
    assert_same_state(fast, ref)
    assert [a.shape for a in fast.square_avg] == [(BIG // 20,), (7,), (3,), ()]


def test_rowwise_state_is_one_value_a_row_and_moves_the_rows_by_their_mean_square():
    table = np.ones((4, 3), np.float32)
    opt = fastrms.RMSprop(table, 0.1, state_layout="rowwise")
    g = np.array([[3, 4, 0], [1, 1, 1], [0, 0, 0], [-2, 2, 2]], np.float32)
    opt.step(g)
    v = np.float32(0.1) * (g * g).sum(axis=1, dtype=np.float32) / np.float32(3)
    np.testing.assert_array_equal(opt.square_avg, v)
    np.testing.assert_allclose(table, 1 - 0.1 * g / (np.sqrt(v)[:, None] + 1e-8), rtol=1e-6)
    assert opt.state_dict()["square_avg.0"].nbytes == 4 * 4  # a float a row, not one an element


def test_rowwise_state_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="state_layout='rowwise' keeps one square_avg value a row .* centered=False"):
        fastrms.RMSprop(np.zeros((3, 2), np.float32), centered=True, state_layout="rowwise")
    with pytest.raises(ValueError, match="needs state_storage='native' \\(got '8bit'\\)"):
        fastrms.RMSprop(np.zeros((3, 2), np.float32), state_storage="8bit", state_layout="rowwise")
    with pytest.raises(ValueError, match="copy_to cannot be combined with state_layout='rowwise'"):
        fastrms.RMSprop(np.zeros(3, np.float32), copy_to=np.zeros(3, np.float16), state_layout="rowwise")
    with pytest.raises(ValueError, match="state_layout must be one of"):
        fastrms.RMSprop(np.zeros(3, np.float32), state_layout="columnwise")
    with pytest.raises(ValueError, match="keeps the state element by element; state_layout='rowwise'"):
        fastrms.functional.init_state(np.zeros(3), state_layout="rowwise")
    opt = fastrms.RMSprop([np.ones((4, 3), np.float32)], state_layout="rowwise")
    before = snapshot(opt)
    with pytest.raises(TypeError, match="state_layout='rowwise' reads grads in the params' dtype"):
        opt.step([np.ones((4, 3), np.float16)])
    assert_unchanged(opt, before)
    assert opt.step_count == 0


# ------------------------------------------------------------------ 16-bit params over float32 masters


def _low_dtype(dtype_name):
    return np.float16 if dtype_name == "float16" else __import__("ml_dtypes").bfloat16


@needs_ml_dtypes
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", MAIN)
def test_16_bit_params_step_as_a_float32_master_with_its_copy_does(name, dtype_name):
    low = _low_dtype(dtype_name)
    rng = np.random.default_rng(9)
    shapes = [(BIG,), (31, 7), (5,)]
    params = [rng.standard_normal(s).astype(low) for s in shapes]
    masters, copies = [p.astype(np.float32) for p in params], [np.zeros(s, low) for s in shapes]
    fast = fastrms.RMSprop(params, 0.01, **MAIN[name])
    ref = reference.RMSprop(masters, 0.01, copy_to=copies, **MAIN[name])
    for t in range(4):
        grads = [rng.standard_normal(s).astype(low if t % 2 else np.float32) for s in shapes]  # either kind
        fast.step(grads)
        ref.step(grads)
    assert fast.params is not params and all(a is b for a, b in zip(fast.params, params))  # the user's arrays
    for p, c, m, i in zip(params, copies, masters, range(3)):
        assert p.dtype == low and p.view(np.uint16).tobytes() == c.view(np.uint16).tobytes()
        np.testing.assert_array_equal(fast.state_dict()[f"master_param.{i}"], m)
    for k in ref.state[0]:
        np.testing.assert_array_equal(getattr(fast, k)[0], ref.state[0][k], err_msg=k)


@needs_ml_dtypes
@pytest.mark.parametrize("dtype_name, storage", [("bfloat16", "native"), ("float16", "native"), ("float16", "8bit")])
def test_a_write_into_16_bit_params_between_steps_becomes_the_master(dtype_name, storage):
    """A restore or an edit of the 16-bit weights between steps is what the next step starts
    from (as a float32 master run whose master was set to the written values), not
    overwritten from the old master; elements nobody wrote keep their master's precision."""
    low = _low_dtype(dtype_name)
    rng = np.random.default_rng(11)
    shapes = [(BIG if storage == "native" else 3000,), (300,)]  # the parallel path where the others cover it
    params = [rng.standard_normal(s).astype(low) for s in shapes]
    masters, copies = [p.astype(np.float32) for p in params], [p.copy() for p in params]
    options = dict(MAIN["centered_momentum"], state_storage=storage)
    fast = fastrms.RMSprop(params, 0.01, **options)
    ref = reference.RMSprop(masters, 0.01, copy_to=copies, **options)
    for t in range(5):
        if t in (2, 4):  # written from outside: some elements, then the whole of one param
            for p, m, c in zip(params, masters, copies):
                edit = slice(None) if t == 4 and p.size == 300 else slice(3, None, 7)
                old = p[edit].copy()
                p[edit] = (rng.standard_normal(p[edit].shape) * 3).astype(low)
                written = p[edit].view(np.uint16) != old.view(np.uint16)  # the same bits again: no write to see
                m[edit], c[edit] = np.where(written, p[edit].astype(np.float32), m[edit]), p[edit]
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        fast.step(grads)
        ref.step(grads)
        for i, (p, c, m) in enumerate(zip(params, copies, masters)):
            assert p.view(np.uint16).tobytes() == c.view(np.uint16).tobytes(), (t, i)
            assert fast.state_dict()[f"master_param.{i}"].tobytes() == m.tobytes(), (t, i)
    weights = rng.standard_normal(300).astype(low)
    plain = fastrms.RMSprop(weights, 0.01)
    plain.step(np.ones(300, np.float32))
    weights[...] = (np.arange(300) / 7).astype(low)  # e.g. model.load_state_dict(...)
    plain.step(np.zeros(300, np.float32))
    assert weights.tobytes() == (np.arange(300) / 7).astype(low).tobytes()  # a zero-grad step keeps them


@needs_ml_dtypes
def test_a_16_bit_params_checkpoint_keeps_the_masters_and_continues_bitwise(tmp_path):
    bf16 = _low_dtype("bfloat16")
    rng = np.random.default_rng(10)
    p0 = rng.standard_normal((40, 3)).astype(bf16)
    grads = [rng.standard_normal((40, 3)).astype(bf16) for _ in range(4)]
    straight, first = fastrms.RMSprop(p0.copy(), 1e-3, momentum=0.9), fastrms.RMSprop(p0.copy(), 1e-3, momentum=0.9)
    for t in range(6):
        straight.step(grads[t % 4])
        first.step(grads[t % 4])
    first.save(tmp_path / "c.npz")
    resumed = fastrms.RMSprop(first.params.copy(), 1e-3, momentum=0.9)
    resumed.load(tmp_path / "c.npz")
    for t in range(6, 12):
        straight.step(grads[t % 4])
        resumed.step(grads[t % 4])
    assert straight.params.view(np.uint16).tobytes() == resumed.params.view(np.uint16).tobytes()
    # the master keeps what the bfloat16 weights round away: resumed from the weights alone,
    # the run differs
    saved = dict(np.load(tmp_path / "c.npz", allow_pickle=False))
    saved = {k: (v.item() if v.ndim == 0 else v) for k, v in saved.items() if k != "fastrms_checkpoint"}
    rounded = fastrms.RMSprop(p0.copy(), 1e-3, momentum=0.9)
    rounded.load_state_dict({**saved, "master_param.0": saved["master_param.0"].astype(bf16).astype(np.float32)})
    rounded.params[...] = saved["master_param.0"].astype(bf16)
    for t in range(6, 12):
        rounded.step(grads[t % 4])
    assert rounded.params.view(np.uint16).tobytes() != straight.params.view(np.uint16).tobytes()
    d = first.state_dict()
    d["master_param.0"] = d["master_param.0"].astype(np.float64)
    before = snapshot(first)
    with pytest.raises(ValueError, match=r"state_dict\['master_param.0'\] must be float32 of shape \(40, 3\)"):
        first.load_state_dict(d)
    del d["master_param.0"]
    with pytest.raises(ValueError, match="must be float32 of shape"):
        first.load_state_dict(d)
    assert_unchanged(first, before)


@needs_ml_dtypes
def test_16_bit_params_are_refused_where_they_do_not_apply():
    bf16 = _low_dtype("bfloat16")
    with pytest.raises(
        TypeError, match=r"params\[1\] is float32, params\[0\] bfloat16: 16-bit params are all of one dtype"
    ):
        fastrms.RMSprop([np.zeros(3, bf16), np.zeros(3, np.float32)])
    with pytest.raises(TypeError, match=r"params\[1\] is float16, params\[0\] bfloat16"):
        fastrms.RMSprop([np.zeros(3, bf16), np.zeros(3, np.float16)])
    with pytest.raises(ValueError, match="copy_to is for float32 params"):
        fastrms.RMSprop(np.zeros(3, bf16), copy_to=np.zeros(3, bf16))
    with pytest.raises(ValueError, match="must be C-contiguous, aligned and writeable"):
        fastrms.RMSprop(np.zeros((3, 4), bf16)[:, ::2])
    with pytest.raises(ValueError, match="16-bit params .* cannot be combined with dense_rows=True"):
        fastrms.RMSprop(np.zeros((3, 4), bf16), dense_rows=True)
    opt = fastrms.RMSprop(np.ones((4, 3), bf16))
    before = snapshot(opt)
    with pytest.raises(ValueError, match="step_rows does not write 16-bit params from their masters"):
        opt.step_rows(np.array([1]), np.ones((1, 3), np.float32))
    with pytest.raises(TypeError):
        opt.step(np.ones((4, 3), np.float64))  # a float64 grad of a float32 master
    assert_unchanged(opt, before)


# ------------------------------------------------------------------ copy_to: master weights


def _bf16(shape):
    import ml_dtypes

    return np.zeros(shape, ml_dtypes.bfloat16)


@needs_ml_dtypes
@pytest.mark.parametrize("shapes", [[(BIG,)], [(1031,), (7, 3), (BIG,)]], ids=["dense", "segments"])
@pytest.mark.parametrize("storage", ["native", "bfloat16"])
def test_the_copy_matches_the_reference_on_every_shell_with_either_state_storage(shapes, storage):
    rng = np.random.default_rng(4)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    mine = [p.copy() for p in params]
    copies, theirs = [_bf16(s) for s in shapes], [_bf16(s) for s in shapes]
    options = dict(momentum=0.9, clip_global_norm=5.0, skip_nonfinite=True, state_storage=storage)
    fast = fastrms.RMSprop(params, 0.01, copy_to=copies, **options)
    ref = reference.RMSprop(mine, 0.01, copy_to=theirs, **options)
    for t in range(4):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        if t == 2:
            grads[-1][3] = np.inf  # refused: neither params nor copies written
        fast.step(grads)
        ref.step(grads)
    assert fast.skipped_steps == 1 and fast.kernel_calls == ["dense" if len(shapes) == 1 else "segments"]
    assert_same_state(fast, ref)
    for c, d in zip(copies, theirs):
        np.testing.assert_array_equal(c.view(np.uint16), d.view(np.uint16))


@needs_ml_dtypes
def test_bad_copies_are_refused_before_anything_is_built():
    w = np.zeros((3, 2), np.float32)
    cases = [
        (np.zeros((3, 2), np.int16), TypeError, r"must be an ml_dtypes.bfloat16 or numpy.float16 array, got int16"),
        (np.zeros((3, 2), ">f2"), TypeError, r"must be an ml_dtypes.bfloat16 or numpy.float16 array, got >f2"),
        (_bf16((2, 3)), ValueError, r"copy_to must have its param's shape \(3, 2\), got \(2, 3\)"),
        (_bf16((3, 4))[:, :2], ValueError, "copy_to must be C-contiguous, aligned and writeable"),
        ([_bf16((3, 2))], TypeError, "copy_to must be a numpy.ndarray like params, got list"),
    ]
    for copy, error, match in cases:
        with pytest.raises(error, match=match):
            fastrms.RMSprop(w, copy_to=copy)
    with pytest.raises(TypeError, match=r"copy_to\[0\]: a bfloat16 copy is of float32 params; params\[0\] is float64"):
        fastrms.RMSprop([np.zeros(3)], copy_to=[_bf16(3)])
    with pytest.raises(TypeError, match=r"must all have one dtype: copy_to\[0\] is bfloat16, copy_to\[1\] float16"):
        fastrms.RMSprop([w, w.copy()], copy_to=[_bf16((3, 2)), np.zeros((3, 2), np.float16)])
    with pytest.raises(TypeError, match="copy_to must be a list or tuple of 2 arrays, one per param, got 1 arrays"):
        fastrms.RMSprop([w, w.copy()], copy_to=[_bf16((3, 2))])
    shared = _bf16(8)
    with pytest.raises(ValueError, match=r"copy_to\[0\] and copy_to\[1\] share memory"):
        fastrms.RMSprop([np.zeros(4, np.float32), np.zeros(4, np.float32)], copy_to=[shared[:4], shared[2:6]])
    with pytest.raises(ValueError, match="copy_to cannot be combined with dense_rows=True"):
        fastrms.RMSprop(w, copy_to=_bf16((3, 2)), dense_rows=True)


@needs_ml_dtypes
def test_a_grad_over_a_copy_and_step_rows_are_refused_with_nothing_written():
    base = _bf16(8)
    opt = fastrms.RMSprop(np.ones((2, 2), np.float32), 0.1, copy_to=base[:4].reshape(2, 2))
    before, copy_before = snapshot(opt), base.copy()
    with pytest.raises(ValueError, match="shares memory with the params or the optimizer state"):
        opt.step(base.view(np.float32).reshape(2, 2))  # the grad's 16 bytes cover the copy's 8
    with pytest.raises(ValueError, match="step_rows does not write copy_to's copies"):
        opt.step_rows(np.array([0]), np.ones((1, 2), np.float32))
    assert_unchanged(opt, before)
    np.testing.assert_array_equal(base.view(np.uint16), copy_before.view(np.uint16))


# ------------------------------------------------------------------ 16-bit grads, float16 copies


def _low(dtype_name, shape, rng):
    """Random values in the 16-bit dtype named (ml_dtypes.bfloat16 or float16)."""
    if dtype_name == "bfloat16":
        import ml_dtypes

        return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
    return rng.standard_normal(shape).astype(np.float16)


LOW = [
    pytest.param("bfloat16", marks=needs_ml_dtypes),
    "float16",
]


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize(
    "shapes", [[(1031,)], [(BIG,)], [(31, 7), (1,), (1024,), (5, 5)]], ids=["dense", "parallel", "segments"]
)
def test_16_bit_grads_and_copies_match_the_reference_bit_for_bit(shapes, low):
    """A float32 master step reading bfloat16 or float16 grads and writing copies of the same
    dtype, clipped and with a refused step, on every shell: the reference's bits."""
    rng = np.random.default_rng(7)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    mine = [p.copy() for p in params]
    copies, theirs = [_low(low, s, rng) * 0 for s in shapes], [_low(low, s, rng) * 0 for s in shapes]
    single = len(shapes) == 1
    options = dict(momentum=0.9, centered=True, clip_global_norm=30.0, skip_nonfinite=True)
    fast = fastrms.RMSprop(params[0] if single else params, 0.01, copy_to=copies[0] if single else copies, **options)
    ref = reference.RMSprop(mine[0] if single else mine, 0.01, copy_to=theirs[0] if single else theirs, **options)
    for t in range(5):
        grads = [_low(low, s, rng) for s in shapes]
        if t == 2:
            grads[-1].reshape(-1)[3] = np.inf  # refused: nothing written
        fast.step(grads[0] if single else grads)
        ref.step(grads[0] if single else grads)
    assert fast.skipped_steps == 1 and fast.last_grad_norm == ref.last_grad_norm
    assert_same_state(fast, ref)
    for c, d in zip(copies, theirs):
        np.testing.assert_array_equal(c.view(np.uint16), d.view(np.uint16))


@pytest.mark.parametrize("low", LOW)
def test_16_bit_grads_step_float32_params_without_copies_and_packed(low):
    """Without copy_to (plain float32 params), and one flat 16-bit grad for packed params,
    clipped by the norm over each param's part: the reference's bits."""
    rng = np.random.default_rng(8)
    shapes = [(300,), (7, 3), (40,)]
    flat, views = fastrms.pack([rng.standard_normal(s).astype(np.float32) for s in shapes])
    mine = [v.copy() for v in views]
    fast = fastrms.RMSprop(views, 0.01, clip_global_norm=5.0)
    ref = reference.RMSprop(mine, 0.01, clip_global_norm=5.0)
    for _ in range(3):
        g = _low(low, flat.size, rng)
        parts = np.split(g, np.cumsum([int(np.prod(s)) for s in shapes])[:-1])
        fast.step(g)
        ref.step([part.reshape(s) for part, s in zip(parts, shapes)])
    assert fast.last_grad_norm == ref.last_grad_norm
    assert_same_state(fast, ref)


def test_16_bit_grads_are_refused_where_they_do_not_apply_with_nothing_written():
    opt = fastrms.RMSprop([np.ones(3, np.float32), np.ones(2, np.float32), np.ones(2)], 0.1)
    before = snapshot(opt)
    with pytest.raises(TypeError, match=r"grads\[2\] must have dtype float64 like its param, got float16"):
        opt.step([np.ones(3, np.float16), np.ones(2, np.float16), np.ones(2, np.float16)])
    with pytest.raises(TypeError, match=r"grads\[1\] is float16, grads\[0\] float32: the grads of one dtype's"):
        opt.step([np.ones(3, np.float32), np.ones(2, np.float16), np.ones(2)])
    rows = fastrms.RMSprop(np.ones((4, 3), np.float32), 0.1)
    with pytest.raises(TypeError, match="grad_rows"):
        rows.step_rows(np.array([1]), np.ones((1, 3), np.float16))
    assert_unchanged(opt, before)
    assert opt.step_count == rows.step_count == 0


@needs_ml_dtypes
def test_16_bit_grads_with_bfloat16_state_and_a_copy_match_the_reference():
    """Three codecs in one pass: float16 grads read, bfloat16 state, a bfloat16 copy written."""
    rng = np.random.default_rng(9)
    p0 = rng.standard_normal(1031).astype(np.float32)
    copy, theirs = _bf16(1031), _bf16(1031)
    options = dict(state_storage="bfloat16", momentum=0.9)
    fast = fastrms.RMSprop(p0.copy(), 0.01, copy_to=copy, **options)
    ref = reference.RMSprop(p0.copy(), 0.01, copy_to=theirs, **options)
    for _ in range(4):
        g = rng.standard_normal(1031).astype(np.float16)
        fast.step(g)
        ref.step(g)
    assert_same_state(fast, ref)
    np.testing.assert_array_equal(copy.view(np.uint16), theirs.view(np.uint16))


# ------------------------------------------------------------------ hardening: nothing lost, torn or half-written


def test_params_given_as_a_generator_are_all_held_and_stepped():
    arrays = [np.ones(3, np.float32), np.ones((2, 2), np.float32)]
    opt = fastrms.RMSprop((a for a in arrays), 0.1)  # read once: the 16-bit check must not consume it
    assert len(opt.params) == 2 and opt.params[0] is arrays[0] and opt.params[1] is arrays[1]
    opt.step([np.ones(3, np.float32), np.ones((2, 2), np.float32)])
    assert all((a < 1).all() for a in arrays) and opt.step_count == 1


@needs_ml_dtypes
def test_a_copy_made_read_only_after_construction_is_not_written():
    import ml_dtypes

    ws = [np.ones(4, np.float32), np.ones(5, np.float32)]
    copies = [w.astype(ml_dtypes.bfloat16) for w in ws]
    opt = fastrms.RMSprop(ws, 0.1, copy_to=copies)
    copies[1].flags.writeable = False
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"copy_to\[1\] was made read-only after construction"):
        opt.step([np.ones(4, np.float32), np.ones(5, np.float32)])
    assert_unchanged(opt, before)
    assert all((c == 1).all() for c in copies)


def test_8bit_state_views_are_read_only_and_native_views_write_through():
    lean = fastrms.RMSprop(np.ones(300, np.float32), 0.1, state_storage="8bit", momentum=0.9, centered=True)
    lean.step(np.full(300, 0.5, np.float32))
    for view in (lean.square_avg, lean.grad_avg, lean.momentum_buffer):
        with pytest.raises(ValueError, match="read-only"):
            view[0] = 1.0  # a decoded copy: a write would be lost, so it raises
    native = fastrms.RMSprop(np.ones(3, np.float32), 0.1)
    native.square_avg[0] = 2.0  # a view of the state itself
    assert native.state_dict()["square_avg.0"][0] == 2.0


@needs_ml_dtypes
@pytest.mark.parametrize("low", ["bfloat16", "float16"])
def test_a_0d_16_bit_param_takes_a_0d_grad_and_keeps_a_0d_master(low):
    dtype = _format(low)
    scalar, vector = np.array(1.5, dtype), np.array([1.5], dtype)
    one, other = fastrms.RMSprop(scalar, 0.1), fastrms.RMSprop(vector, 0.1)
    for g in (0.5, -0.25, 2.0):
        one.step(np.array(g, np.float32))
        other.step(np.array([g], np.float32))
    assert scalar.shape == () and scalar.tobytes() == vector.tobytes()
    assert one.state_dict()["master_param.0"].shape == ()
    assert one.state_dict()["master_param.0"].tobytes() == other.state_dict()["master_param.0"].tobytes()


@pytest.mark.parametrize("storage", ["native", "8bit"])
def test_snapshots_taken_while_another_thread_steps_are_never_torn(storage):
    """A constant grad gives every element the same state: a snapshot taken mid-step would
    hold two steps' values. Each snapshot must be one step's state, whole."""
    import threading

    n, steps = 1 << 19, 40
    options = dict(MAIN["centered_momentum"], state_storage=storage)
    alone = fastrms.RMSprop(np.zeros(n, np.float32), 0.01, **options)
    expected = {0: alone.state_dict()["square_avg.0"].tobytes()}
    for t in range(1, steps + 1):
        alone.step(np.ones(n, np.float32))
        expected[t] = alone.state_dict()["square_avg.0"].tobytes()
    opt = fastrms.RMSprop(np.zeros(n, np.float32), 0.01, **options)
    done, torn, seen = threading.Event(), [], [0]

    def train():
        try:
            for _ in range(steps):
                opt.step(np.ones(n, np.float32))
        finally:
            done.set()

    worker = threading.Thread(target=train)
    worker.start()
    while not done.is_set():
        d = opt.state_dict()
        seen[0] += 1
        if d["square_avg.0"].tobytes() != expected[d["step_count"]]:
            torn.append(d["step_count"])
    worker.join(30)
    assert seen[0] and not torn, f"{len(torn)} of {seen[0]} snapshots torn"


def test_a_load_racing_a_step_waits_for_it_and_is_never_mixed_with_it():
    import threading

    n = 1 << 19
    hold, inside, release = threading.Event(), threading.Event(), threading.Event()

    def schedule(count):  # with `hold` set, the step waits inside, holding its state
        if hold.is_set():
            inside.set()
            release.wait(10)
        return 0.01

    opt = fastrms.RMSprop(np.zeros(n, np.float32), schedule, **MAIN["centered_momentum"])
    start = opt.state_dict()
    hold.set()
    worker = threading.Thread(target=opt.step, args=(np.ones(n, np.float32),))
    worker.start()
    assert inside.wait(10)
    hold.clear()
    loader = threading.Thread(target=opt.load_state_dict, args=(start,))
    loader.start()
    loader.join(0.3)
    assert loader.is_alive()  # waiting for the step: it may not write into the state mid-step
    release.set()
    worker.join(10)
    loader.join(10)
    d = opt.state_dict()  # the load came last, whole
    assert d["step_count"] == 0 and not d["square_avg.0"].any() and not d["momentum_buffer.0"].any()
