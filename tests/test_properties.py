"""Property tests: random variants, hyperparameters, dtypes and sizes.

- the optimizer matches fastrms.reference bit for bit;
- the serial and parallel drivers give identical bits;
- invalid input raises and leaves params and state bitwise unchanged.
"""

import numpy as np
import pytest
from conftest import assert_same_state, assert_unchanged, snapshot
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

import fastrms
from fastrms import kernels, reference
from fastrms.bench.cases import MAIN

# derandomize: the same examples on every run, so that a CI run cannot fail on an example no
# earlier run tried (hypothesis's database is off with -p no:cacheprovider and on fresh clones)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def configs(draw):
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9, draw(st.floats(0.0, 0.99))]))
    opts = dict(
        learning_rate=draw(st.floats(0.0, 0.5)),
        beta=draw(st.floats(0.0, 0.999)),
        epsilon=draw(st.floats(1e-10, 1e-2)),
        momentum=momentum,
        centered=draw(st.booleans()),
        nesterov=momentum > 0 and draw(st.booleans()),
        lr_in_momentum=draw(st.booleans()),
        weight_decay=draw(st.sampled_from([0.0, draw(st.floats(0.0, 0.2))])),
        decoupled_weight_decay=draw(st.booleans()),
        maximize=draw(st.booleans()),
        bias_correction=draw(st.booleans()),
        eps_in_sqrt=draw(st.booleans()),
        initial_scale=draw(st.sampled_from([0.0, 1.0, draw(st.floats(0.0, 2.0))])),
    )
    return opts, draw(st.sampled_from([np.float32, np.float64])), draw(st.integers(0, 3000)), draw(st.integers(1, 12))


@SETTINGS
@given(configs(), st.integers(0, 2**32 - 1))
def test_random_configurations_match_the_reference_bitwise(config, seed):
    opts, dtype, n, steps = config
    rng = np.random.default_rng(seed)
    p0 = (rng.standard_normal(n) * rng.uniform(0.01, 10)).astype(dtype)
    grads = [(rng.standard_normal(n) * rng.uniform(0.01, 10)).astype(dtype) for _ in range(3)]
    lr = opts.pop("learning_rate")
    fast = fastrms.RMSprop(p0.copy(), lr, **opts)
    ref = reference.RMSprop(p0.copy(), lr, **opts)
    for t in range(steps):
        fast.step(grads[t % 3])
        try:
            with np.errstate(over="raise", invalid="raise"):
                ref.step(grads[t % 3])
        except FloatingPointError:
            # a diverging run (lr 0.5 with coupled weight decay can grow p to 1e26 and square it
            # past float32): bit equality is the contract for finite values only
            reject()
    assert_same_state(fast, ref)


@SETTINGS
@given(
    st.booleans(),
    st.sampled_from([0, 1, 2]),
    st.sampled_from([0, 1, 2]),
    st.booleans(),
    st.sampled_from([np.float32, np.float64]),
    st.integers(0, 70_000),
    st.integers(0, 2**32 - 1),
)
def test_serial_and_parallel_drivers_agree_bitwise(centered, wd, mom, nesterov, dtype, n, seed):
    serial, parallel = kernels.drivers(centered, wd, mom, nesterov and mom > 0)
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(n).astype(dtype) for _ in range(5)]
    arrays[2] = np.abs(arrays[2])
    a, b = [x.copy() for x in arrays], [x.copy() for x in arrays]
    scalars = kernels.Scalars(
        rng.uniform(0, 0.1),
        rng.uniform(0, 0.999),
        0.0,
        1e-8,
        rng.uniform(0, 0.1),
        0.9,
        -1.0,
        rng.uniform(0.1, 1),
    )
    serial(tuple(scalars), *a)
    parallel(tuple(scalars), *b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


BAD_OPTIONS = st.one_of(
    st.fixed_dictionaries({"learning_rate": st.one_of(st.floats(max_value=-1e-12), st.just(float("nan")))}),
    st.fixed_dictionaries(
        {"beta": st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-12), st.just(float("inf")))}
    ),
    st.fixed_dictionaries({"epsilon": st.one_of(st.floats(max_value=0.0), st.just(float("nan")))}),
    st.fixed_dictionaries({"momentum": st.floats(max_value=-1e-12)}),
    st.fixed_dictionaries({"weight_decay": st.one_of(st.floats(max_value=-1e-12), st.just(float("inf")))}),
    st.fixed_dictionaries({"nesterov": st.just(True), "momentum": st.just(0.0)}),
    st.fixed_dictionaries({"centered": st.one_of(st.integers(), st.text(max_size=3), st.none())}),
)


@SETTINGS
@given(BAD_OPTIONS)
def test_bad_hyperparameters_always_raise(options):
    with pytest.raises((TypeError, ValueError)):
        fastrms.RMSprop(np.ones(3), **options)


@SETTINGS
@given(
    st.sampled_from([np.float32, np.float64]),
    st.integers(2, 50),  # a 1-element strided view is C-contiguous, and rightly accepted
    st.sampled_from(["dtype", "shape", "overlap", "noncontig", "type"]),
)
def test_bad_grads_always_raise_and_change_nothing(dtype, n, kind):
    p = np.linspace(-1, 1, n).astype(dtype)
    opt = fastrms.RMSprop(p, 0.1, momentum=0.9, centered=True)
    opt.step(np.full(n, 0.25, dtype))
    before = snapshot(opt)
    other = np.float64 if dtype == np.float32 else np.float32
    bad = {
        "dtype": np.ones(n, other),
        "shape": np.ones(n + 1, dtype),
        "overlap": p,
        "noncontig": np.ones(2 * n, dtype)[::2],
        "type": list(range(n)),
    }[kind]
    with pytest.raises((TypeError, ValueError)):
        opt.step(bad)
    assert_unchanged(opt, before)


# ------------------------------------------------------------------ adversarial: a clear error or a correct step


class _Tagged(np.ndarray):
    """A harmless ndarray subclass."""


class _LyingReshape(np.ndarray):
    """A subclass whose reshape keeps the shape, as np.matrix's keeps two dimensions."""

    def reshape(self, *shape, **kw):
        return np.ndarray.reshape(self, self.shape)


def _as_kind(a, kind):
    """``a`` (a plain C-contiguous array) turned into one of many array kinds."""
    import warnings

    if kind == "plain":
        return a
    if kind == "subclass":
        return a.view(_Tagged)
    if kind == "lying reshape":
        return a.view(_LyingReshape)
    if kind == "matrix":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            return np.asmatrix(a.reshape(1, -1) if a.ndim != 2 else a)
    if kind == "masked":
        return np.ma.array(a)
    if kind == "fortran 2-D":
        return np.asfortranarray(a.reshape(-1, 1) @ np.ones((1, 2), a.dtype))
    if kind == "strided":
        return np.repeat(a, 2)[::2]
    if kind == "read-only":
        b = a.copy()
        b.flags.writeable = False
        return b
    if kind == "byte-swapped":
        return a.astype(a.dtype.newbyteorder())
    if kind == "float16":
        return a.astype(np.float16)
    if kind == "unaligned":
        raw = np.zeros(a.nbytes + 1, np.uint8)
        b = raw[1:].view(a.dtype).reshape(a.shape)
        b[...] = a
        return b
    raise AssertionError(kind)


KINDS = [
    "plain",
    "subclass",
    "lying reshape",
    "matrix",
    "masked",
    "fortran 2-D",
    "strided",
    "read-only",
    "byte-swapped",
    "float16",
    "unaligned",
]


def _magnitude(draw):
    return draw(st.sampled_from([0.0, 1e-50, 1e-46, 1e-40, 1e-20, 1e-8, 1e-3, 0.5, 0.999999999, 1e20, 1e39, 1e300]))


@SETTINGS
@given(st.data())
def test_any_array_kind_and_any_magnitude_is_a_clear_error_or_a_correct_step(data):
    """Arrays of every kind (subclasses, matrices, masked, strided, unaligned, ...) as param
    and as grad, and hyperparameters of every magnitude against each dtype: the optimizer
    either raises TypeError/ValueError before writing anything, or steps exactly as the
    reference does on the same values, and never writes outside the param."""
    draw = data.draw
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    n = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    guard = np.zeros(n + 32, dtype)
    body = guard[16 : 16 + n]
    body[...] = rng.standard_normal(n)
    param = _as_kind(body, draw(st.sampled_from(KINDS)))
    grad = _as_kind(rng.standard_normal(n).astype(dtype), draw(st.sampled_from(KINDS)))
    options = dict(
        learning_rate=_magnitude(draw),
        epsilon=draw(st.sampled_from([1e-46, 1e-40, 1e-8, 1.0])),
        beta=draw(st.sampled_from([0.0, 0.9, 0.999999999])),
        momentum=draw(st.sampled_from([0.0, 0.9, 1e39])),
        weight_decay=draw(st.sampled_from([0.0, 1e-2, 1e39])),
        initial_scale=draw(st.sampled_from([0.0, 1.0, 1e39])),
        centered=draw(st.booleans()),
    )
    start = body.copy()
    start_param = np.array(np.asarray(param), order="C")  # its values, whatever kind it is
    try:
        opt = fastrms.RMSprop(param, **options)
    except (TypeError, ValueError):
        assert body.tobytes() == start.tobytes()
        return
    before = snapshot(opt)
    try:
        opt.step(grad)
    except (TypeError, ValueError):
        assert_unchanged(opt, before)
        assert np.all(guard[:16] == 0) and np.all(guard[16 + n :] == 0)
        return
    # accepted: the values must be exactly the reference's on plain copies
    ref_p = start_param.copy()
    ref = reference.RMSprop(ref_p, **options)
    with np.errstate(all="ignore"):  # g / eps may overflow for some data: both must agree then too
        ref.step(np.array(np.asarray(grad), order="C"))
    got, want = np.asarray(param).reshape(-1), ref_p.reshape(-1)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan) and got[~nan].tobytes() == want[~nan].tobytes()
    assert np.all(guard[:16] == 0) and np.all(guard[16 + n :] == 0)


@SETTINGS
@given(data=st.data())
def test_any_mutated_checkpoint_is_a_valueerror_or_a_faithful_load(data, tmp_path_factory):
    """Random byte flips, truncations and member swaps of a real checkpoint: loading either
    raises ValueError and changes nothing, or restores values the original file holds."""
    draw = data.draw
    path = tmp_path_factory.mktemp("ckpt") / "c.npz"
    opt = fastrms.RMSprop([np.ones(5), np.ones((2, 3), np.float32)], 0.1, momentum=0.9, centered=True)
    opt.step([np.full(5, 0.5), np.full((2, 3), -0.5, np.float32)])
    opt.save(path)
    raw = bytearray(path.read_bytes())
    mutation = draw(st.sampled_from(["flip", "truncate", "zero run"]))
    if mutation == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << draw(st.integers(0, 7))
    elif mutation == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    else:
        i = draw(st.integers(0, len(raw) - 1))
        raw[i : i + draw(st.integers(1, 64))] = bytes(min(64, len(raw) - i))[: len(raw[i : i + 64])]
    path.write_bytes(bytes(raw))
    target = fastrms.RMSprop([np.ones(5), np.ones((2, 3), np.float32)], 0.1, momentum=0.9, centered=True)
    before = snapshot(target)
    try:
        target.load(path)
    except ValueError:
        assert_unchanged(target, before)
        return
    state = target.state_dict()
    for key, value in opt.state_dict().items():
        if isinstance(value, np.ndarray):
            assert state[key].shape == value.shape and np.isfinite(state[key]).all()


#: every state storage, the rowwise layout and both 16-bit param dtypes (with float32 masters),
#: each with one of the main variants (a momentum buffer in each, centring in some)
CHECKPOINTED = [
    ("native", "elementwise", "float32", "nesterov"),
    ("bfloat16", "elementwise", "float32", "nesterov"),
    ("8bit", "elementwise", "float32", "centered_momentum"),
    ("native", "rowwise", "float32", "nesterov"),
    ("native", "elementwise", "bfloat16", "centered_momentum"),
    ("8bit", "elementwise", "float16", "nesterov"),
]
_BIGGEST32 = float(np.finfo(np.float32).max)


@pytest.mark.parametrize("storage, layout, params, variant", CHECKPOINTED)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(data=st.data())
def test_any_finite_run_saved_loads_back_continuing_bitwise(storage, layout, params, variant, data, tmp_path_factory):
    """Whatever finite grads a run took (huge ones, whose squares overflow to inf, included),
    its own checkpoint loads back and the resumed run equals the one that never stopped. (The
    centered variant takes grads below 2^60: where both v and m^2 overflow, v - m^2 is NaN, as
    in torch, and `save` refuses that state by name.)"""
    low = storage == "bfloat16" or params != "float32"
    if low and __import__("importlib.util").util.find_spec("ml_dtypes") is None:
        pytest.skip("ml_dtypes is not installed (pip install ml_dtypes)")
    dtype = {"float32": np.float32, "float16": np.float16}.get(params) or __import__("ml_dtypes").bfloat16
    options = dict(MAIN[variant], state_storage=storage, state_layout=layout)
    bound = 2.0**60 if options.get("centered") else _BIGGEST32
    rows, width = data.draw(st.integers(1, 40)), 7
    before, after = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3))

    def array(elements):
        return np.array(data.draw(st.lists(elements, min_size=rows * width, max_size=rows * width)), np.float32)

    grads = [array(st.floats(-bound, bound, width=32)).reshape(rows, width) for _ in range(before + after)]
    p0 = array(st.floats(-2.0, 2.0, width=32)).reshape(rows, width).astype(dtype)
    straight, first = (fastrms.RMSprop(p0.copy(), 0.01, **options) for _ in range(2))
    for g in grads[:before]:
        straight.step(g)
        first.step(g)
    path = tmp_path_factory.mktemp("ckpt") / "c.npz"
    first.save(path)
    resumed = fastrms.RMSprop(first.params.copy(), 0.01, **options)
    resumed.load(path)
    for g in grads[before:]:
        straight.step(g)
        resumed.step(g)
    assert straight.params.tobytes() == resumed.params.tobytes()
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes() for k in a)


def test_derandomized_examples_do_not_depend_on_the_local_modules_loaded(tmp_path, monkeypatch):
    """conftest keeps hypothesis's pool of local constants empty: loading a module full of
    integer constants (as an editable fastrms is, and an installed one is not) must not
    change what a derandomized test draws."""
    import importlib
    import sys

    def draws():
        seen = []

        @settings(max_examples=200, deadline=None, derandomize=True, database=None)
        @given(st.integers(0, 10**9))
        def collect(x):
            seen.append(x)

        collect()
        return seen

    before = draws()
    (tmp_path / "many_constants.py").write_text(
        "VALUES = [" + ", ".join(str(123_456_789 + 7919 * i) for i in range(500)) + "]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        importlib.import_module("many_constants")
        assert draws() == before
    finally:
        sys.modules.pop("many_constants", None)
