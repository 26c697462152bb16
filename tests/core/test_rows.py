"""Sparse rows: RMSprop.step_rows (lazy and dense-equivalent) and the row kernel."""

import re

import numpy as np
import pytest
from conftest import assert_unchanged, snapshot

import fastrms
from fastrms import kernels, reference, schedules
from fastrms.core import options, spec

VARIANTS = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "lr_in_momentum": True, "nesterov": True},
    {"centered": True, "momentum": 0.5, "nesterov": True},
    {"weight_decay": 0.1, "decoupled_weight_decay": True, "momentum": 0.9},
    {"bias_correction": True, "centered": True, "eps_in_sqrt": True},
]


def _batch(rng, n, k, width, dtype, pool=None):
    rows = rng.choice(n if pool is None else pool, size=k, replace=True)
    return rows, rng.standard_normal((k, width)).astype(dtype)


def _lazy_reference(table, state, rows, grad_rows, t, lr, opts):
    """The lazy rule in NumPy: duplicates summed, then the touched rows stepped with the
    global step number t; every other row untouched."""
    unique, inverse = np.unique(rows, return_inverse=True)
    summed = np.zeros((unique.size, table.shape[1]), table.dtype)
    for i, j in enumerate(inverse):  # in the order given, as the kernel adds them
        summed[j] += grad_rows[i]
    sub = {k: v[unique] for k, v in state.items()}
    table[unique] = reference.rmsprop_step(table[unique], summed, sub, t, lr, **opts)
    for k, v in sub.items():
        state[k][unique] = v


@pytest.mark.parametrize("opts", VARIANTS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.lower_bound
def test_lazy_rows_match_the_numpy_lazy_rule_bit_for_bit(opts, dtype):
    rng = np.random.default_rng(0)
    n, width = 500, 6
    t0 = rng.standard_normal((n, width)).astype(dtype)
    opt = fastrms.RMSprop(t0.copy(), 0.01, **opts)
    table = t0.copy()
    state = {name: np.zeros_like(table) for name in spec.of(opts).names}
    touched = np.zeros(n, bool)
    for t in range(1, 41):
        rows, grad_rows = _batch(rng, n, 25, width, dtype, pool=np.arange(0, n, 3))
        opt.step_rows(rows.astype(np.int32 if t % 2 else np.int64), grad_rows)
        _lazy_reference(table, state, rows, grad_rows, t, 0.01, opts)
        touched[rows] = True
    np.testing.assert_array_equal(opt.params, table)
    for name, value in state.items():
        np.testing.assert_array_equal(getattr(opt, name), value)
    np.testing.assert_array_equal(opt.params[~touched], t0[~touched])  # untouched rows: the same bits
    assert opt.step_count == 40


@pytest.mark.parametrize("opts", VARIANTS + [{"weight_decay": 0.1, "decoupled_weight_decay": True}],
                         ids=lambda o: ",".join(o) or "plain")  # fmt: skip
def test_dense_rows_equal_a_dense_run_with_zero_rows(opts, dtype):
    """Over 240 steps, rows revisited after gaps of up to ~200 steps: the sparse run equals
    RMSprop.step on the dense grads (zero rows elsewhere) to rounding."""
    rng = np.random.default_rng(1)
    n, width = 400, 5
    t0 = rng.standard_normal((n, width)).astype(dtype)
    sparse = fastrms.RMSprop(t0.copy(), 0.01, dense_rows=True, **opts)
    dense = fastrms.RMSprop(t0.copy(), 0.01, **opts)
    for t in range(240):
        pool = np.arange(0, 40) if t < 200 else np.arange(n)  # rows >= 40 wait ~200 steps
        rows, grad_rows = _batch(rng, n, 12, width, dtype, pool=pool)
        sparse.step_rows(rows, grad_rows)
        g = np.zeros((n, width), dtype)
        np.add.at(g, rows, grad_rows)
        dense.step(g)
    sparse.step_rows(np.arange(n), np.zeros((n, width), dtype))  # bring every row up to date
    dense.step(np.zeros((n, width), dtype))
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    for name in ("params", *spec.of(opts).names):
        a, b = getattr(sparse, name), getattr(dense, name)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=name)
    assert not np.allclose(sparse.params, t0)


def test_dense_rows_with_a_schedule_where_a_closed_form_exists():
    rng = np.random.default_rng(2)
    lr = schedules.exponential_decay(0.01, 0.9, 20)
    for opts in ({}, {"momentum": 0.9, "lr_in_momentum": True}):
        t0 = rng.standard_normal((50, 3))
        sparse, dense = fastrms.RMSprop(t0.copy(), lr, dense_rows=True, **opts), fastrms.RMSprop(t0.copy(), lr, **opts)
        for _ in range(100):
            rows, grad_rows = _batch(rng, 50, 4, 3, np.float64)
            sparse.step_rows(rows, grad_rows)
            g = np.zeros((50, 3))
            np.add.at(g, rows, grad_rows)
            dense.step(g)
        sparse.step_rows(np.arange(50), np.zeros((50, 3)))
        dense.step(np.zeros((50, 3)))
        np.testing.assert_allclose(sparse.params, dense.params, rtol=1e-12)


def test_dense_steps_and_row_steps_mix():
    rng = np.random.default_rng(3)
    t0 = rng.standard_normal((30, 4))
    sparse, dense = (fastrms.RMSprop(t0.copy(), 0.01, momentum=0.9, dense_rows=True),
                     fastrms.RMSprop(t0.copy(), 0.01, momentum=0.9))  # fmt: skip
    for t in range(30):
        rows, grad_rows = _batch(rng, 30, 3, 4, np.float64)
        g = np.zeros((30, 4))
        np.add.at(g, rows, grad_rows)
        if t % 7 == 0:
            sparse.step(g)
        else:
            sparse.step_rows(rows, grad_rows)
        dense.step(g)
    sparse.step_rows(np.arange(30), np.zeros((30, 4)))
    dense.step(np.zeros((30, 4)))
    np.testing.assert_allclose(sparse.params, dense.params, rtol=1e-12)


def test_duplicates_are_summed_first():
    rng = np.random.default_rng(4)
    t0 = rng.standard_normal((20, 3)).astype(np.float32)
    a, b = fastrms.RMSprop(t0.copy(), 0.1), fastrms.RMSprop(t0.copy(), 0.1)
    rows = np.array([3, 7, 3, 3, 9])
    grad_rows = rng.standard_normal((5, 3)).astype(np.float32)
    a.step_rows(rows, grad_rows)
    b.step_rows(np.array([3, 7, 9]), np.stack([grad_rows[0] + grad_rows[2] + grad_rows[3], grad_rows[1], grad_rows[4]]))
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.square_avg, b.square_avg)


def test_the_row_shell_is_the_same_bits_serial_and_parallel(dtype):
    rng = np.random.default_rng(5)
    n, width, k = 20_000, 64, 5000
    key = options.variant_key(options.resolve({"momentum": 0.9, "centered": True}))
    rows = rng.choice(n, k, replace=False).astype(np.int64)
    g = rng.standard_normal(k * width).astype(dtype)
    out = []
    for parallel in (False, True):
        arrays = [np.random.default_rng(6).standard_normal(n * width).astype(dtype) for _ in range(4)]
        arrays[1] = np.abs(arrays[1])
        last = np.zeros(n, np.int64)
        s = tuple(options.scalars(options.resolve({"momentum": 0.9, "centered": True}), 0.01, 3))
        ran = kernels.rows(key, parallel)(s, arrays[0], g, arrays[1], arrays[2], arrays[3], rows, width, last, 3, True,
                                          True, 1.0, 0.01)  # fmt: skip
        assert ran == parallel
        out.append((arrays, last))
    for x, y in zip(out[0][0], out[1][0]):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(out[0][1], out[1][1])


def test_checkpoints_carry_the_row_counters(tmp_path):
    rng = np.random.default_rng(7)
    t0 = rng.standard_normal((60, 4))
    a = fastrms.RMSprop(t0.copy(), 0.01, momentum=0.9, dense_rows=True)
    for _ in range(15):
        a.step_rows(*_batch(rng, 60, 5, 4, np.float64))
    d = a.state_dict()
    assert d["row_step.0"].dtype == np.int64 and d["row_step.0"].max() == 15
    a.save(tmp_path / "rows.npz")
    b = fastrms.RMSprop(a.params.copy(), 0.01, momentum=0.9, dense_rows=True)
    b.load(tmp_path / "rows.npz")
    c = fastrms.RMSprop(a.params.copy(), 0.01, momentum=0.9, dense_rows=True)
    c.load_state_dict(d)
    rows, grad_rows = _batch(rng, 60, 60, 4, np.float64)
    for opt in (a, b, c):
        opt.step_rows(rows, grad_rows)
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.params, c.params)
    before = snapshot(c)
    for bad in (d["row_step.0"] + 100, d["row_step.0"].astype(np.int32), d["row_step.0"][:-1]):
        with pytest.raises(ValueError, match="row_step.0"):
            c.load_state_dict({**d, "row_step.0": bad})
    with pytest.raises(ValueError, match="dense_rows"):
        fastrms.RMSprop(a.params.copy(), 0.01, momentum=0.9).load_state_dict(d)  # lazy optimizer: another formula
    after = snapshot(c)
    assert all(np.array_equal(before[k], after[k]) for k in before if k != "params")


@pytest.mark.parametrize(
    "opts, error",
    [
        ({"weight_decay": 0.1}, "dense_rows=True cannot be combined with coupled weight_decay"),
        ({"momentum": 0.9, "learning_rate": schedules.cosine_decay(0.1, 100)}, "needs a constant learning_rate"),
        ({"weight_decay": 0.1, "decoupled_weight_decay": True, "learning_rate": schedules.cosine_decay(0.1, 100)},
         "decoupled weight_decay needs a constant learning_rate"),
    ],
)  # fmt: skip
def test_dense_rows_refuses_what_has_no_closed_form(opts, error):
    with pytest.raises(ValueError, match=error):
        fastrms.RMSprop(np.ones((3, 2)), dense_rows=True, **opts)


def test_bad_rows_and_grads_are_refused_with_nothing_written():
    table = np.ones((10, 3), np.float32)
    opt = fastrms.RMSprop(table, 0.1, dense_rows=True)
    g = np.ones((2, 3), np.float32)
    cases = [
        ((np.array([1, 10]), g), ValueError, r"rows\[1\] = 10 is outside \[0, 10\)"),
        ((np.array([-1, 2]), g), ValueError, "negative indices are not accepted"),
        ((np.array([1.0, 2.0]), g), TypeError, "integers"),
        ((np.array([True, False]), g), TypeError, "integers"),
        ((np.array([[1, 2]]), g), TypeError, "1-D"),
        ((np.array([1, 2]), np.ones((2, 4), np.float32)), ValueError, r"grad_rows must be float32 of shape \(2, 3\)"),
        ((np.array([1, 2]), np.ones((2, 3))), ValueError, "grad_rows must be float32"),
        ((np.array([1, 2]), table[:2]), ValueError, "shares memory"),
        ((np.array([1, 2]), opt.square_avg[4:6]), ValueError, "shares memory"),
    ]
    before = snapshot(opt)
    for args, kind, error in cases:
        with pytest.raises(kind, match=error):
            opt.step_rows(*args)
    after = snapshot(opt)
    assert all(np.array_equal(before[k], after[k]) for k in before if k != "params")
    np.testing.assert_array_equal(table, 1.0)
    with pytest.raises(ValueError, match="needs a 2-D param"):
        fastrms.RMSprop(np.ones(5)).step_rows(np.array([0]), np.ones((1, 1)))
    two = fastrms.RMSprop([np.ones((4, 2)), np.ones((3, 2))])
    with pytest.raises(TypeError, match="needs param="):
        two.step_rows(np.array([0]), np.ones((1, 2)))
    two.step_rows(np.array([2]), np.ones((1, 2)), param=1)
    assert two.params[1][2, 0] < 1 and np.all(two.params[0] == 1) and np.all(two.params[1][[0, 1]] == 1)


def test_skip_nonfinite_and_clipping_apply_to_the_rows():
    opt = fastrms.RMSprop(np.ones((5, 2)), 0.1, skip_nonfinite=True)
    opt.step_rows(np.array([1]), np.array([[np.nan, 1.0]]))
    assert opt.skipped_steps == 1 and opt.step_count == 0 and np.all(opt.params == 1)
    clipped = fastrms.RMSprop(np.ones((5, 2)), 0.1, clip_global_norm=1.0)
    clipped.step_rows(np.array([1, 1]), np.array([[3.0, 0.0], [0.0, 4.0]]))  # summed: (3, 4), norm 5
    assert clipped.last_grad_norm == 5.0


def test_coalescing_sums_each_row_in_the_order_given():
    rng = np.random.default_rng(8)
    rows = rng.integers(0, 300, 20_000).astype(np.int64)
    g = rng.standard_normal(20_000 * 8).astype(np.float32)
    unique, summed, bad = kernels.coalesce(rows, 300, g, 8)
    assert bad == -1 and sorted(unique.tolist()) == sorted(set(rows.tolist()))
    expected = np.zeros((unique.size, 8), np.float32)
    where = {r: i for i, r in enumerate(unique.tolist())}
    for i, r in enumerate(rows.tolist()):  # in the order given, float32 additions
        expected[where[r]] += g[i * 8 : (i + 1) * 8]
    np.testing.assert_array_equal(summed.reshape(-1, 8), expected)
    distinct = rng.permutation(300)[:50]
    u, same, _ = kernels.coalesce(distinct, 300, g[:400], 8)
    assert np.array_equal(u, distinct) and np.array_equal(same, g[:400])  # no duplicates: the grads as given
    assert kernels.coalesce(np.array([1, 5, 300, 2]), 300, g[:32], 8)[2] == 2
    assert kernels.coalesce(np.array([1, 5, -1, 300]), 300, g[:32], 8)[2] == 2  # the first bad one


@pytest.mark.parametrize("opts", VARIANTS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.lower_bound
def test_merged_rows_are_the_same_bits_in_any_number_of_parts_and_as_coalescing_first(opts):
    """The merged shell splits the rows into parts (one per thread) by a hash: however many
    parts, serial or parallel, each row's grads are added in the order given and the result
    has the bits of merging first (coalesce) and then stepping the distinct rows."""
    rng = np.random.default_rng(9)
    n, width, k = 500, 7, 3000
    rows = np.concatenate([rng.integers(0, n, k - 40), rng.choice(n, 40, replace=False)]).astype(np.int64)
    g = rng.standard_normal(k * width)
    key = options.variant_key(options.resolve(opts))
    s = tuple(options.scalars(options.resolve(opts), 0.01, 4))
    start = [rng.random(n * width) for _ in range(4)]
    last = rng.integers(0, 3, n).astype(np.int64)

    def run(step):
        arrays, seen = [a.copy() for a in start], last.copy()
        step(*arrays, seen)
        return arrays + [seen]

    def merged(parallel, parts):
        def step(p, v, m, b, seen):
            shell = kernels.merged_rows(key, parallel)
            assert shell(s, p, g, v, m, b, rows, n, width, parts, seen, 4, True, 1.0, 0.01) == -1

        return step

    def coalesced(p, v, m, b, seen):
        unique, summed, _ = kernels.coalesce(rows, n, g, width)
        kernels.rows(key, False)(s, p, summed, v, m, b, unique, width, seen, 4, True, True, 1.0, 0.01)

    expected = run(coalesced)
    assert not np.array_equal(expected[0], start[0])
    for parallel, parts in ((False, 1), (False, 3), (True, 1), (True, 2), (True, 5)):
        for a, b in zip(expected, run(merged(parallel, parts))):
            assert np.array_equal(a, b), (parallel, parts)


def test_merged_rows_refuse_a_bad_row_before_writing_anything():
    key = options.variant_key(options.resolve({}))
    s = tuple(options.scalars(options.resolve({}), 0.01, 1))
    for parallel in (False, True):
        table, v = np.ones(40), np.zeros(40)
        rows = np.array([3, 1, 3, 10, -2])
        bad = kernels.merged_rows(key, parallel)(s, table, np.ones(5 * 4), v, v[:0], v[:0], rows, 10, 4, 2, rows[:0],
                                                 1, False, 1.0, 0.01)  # fmt: skip
        assert bad == 3 and np.all(table == 1) and np.all(v == 0)


def test_the_row_shells_refuse_arrays_they_could_run_past():
    opts = {"centered": True, "momentum": 0.9}
    key, s = options.variant_key(options.resolve(opts)), tuple(options.scalars(options.resolve(opts), 0.01, 1))
    rows, last = np.array([0, 2]), np.zeros(3, np.int64)
    for parallel in (False, True):
        rows_shell, merged_shell = kernels.rows(key, parallel), kernels.merged_rows(key, parallel)
        shells = (
            lambda a, shell=rows_shell: shell(s, *a, rows, 4, last, 1, False, True, 1.0, 0.01),
            lambda a, shell=merged_shell: shell(s, *a, rows, 3, 4, 2, last, 1, False, 1.0, 0.01),
        )
        for call in shells:
            for short in (1, 2, 3, 4):  # grad_rows, square_avg, grad_avg, momentum_buffer one element short
                arrays = [np.ones(12), np.ones(8), np.zeros(12), np.zeros(12), np.zeros(12)]
                arrays[short] = arrays[short][:-1]
                before = [a.copy() for a in arrays]
                with pytest.raises(ValueError, match="width elements per row" if short == 1 else "size of param"):
                    call(arrays)
                assert all(np.array_equal(a, b) for a, b in zip(arrays, before))
            arrays = [np.ones(12), np.ones(8), np.zeros(12), np.zeros(12), np.zeros(12)]
            call(arrays)  # the right sizes: rows 0 and 2 stepped, row 1 not
            assert not np.array_equal(arrays[0][:4], 1) and np.array_equal(arrays[0][4:8], np.ones(4))
        # the shells index whole arrays: a row past the table, or a short last, is refused
        arrays = [np.ones(12), np.ones(8), np.zeros(12), np.zeros(12), np.zeros(12)]
        before = [a.copy() for a in arrays]
        with pytest.raises(ValueError, match=r"in \[0, n\)"):
            rows_shell(s, *arrays, np.array([0, 3]), 4, last, 1, False, True, 1.0, 0.01)
        for shell, args in ((rows_shell, (rows, 4)), (merged_shell, (rows, 3, 4, 2))):
            with pytest.raises(ValueError, match="last"):
                shell(s, *arrays, *args, last[:2], 2, True, *((True,) if shell is rows_shell else ()), 1.0, 0.01)
        with pytest.raises(ValueError, match="param n rows"):
            merged_shell(s, *arrays, rows, 4, 4, 2, last, 1, False, 1.0, 0.01)
        assert all(np.array_equal(a, b) for a, b in zip(arrays, before)) and not last.any()


def test_the_row_shells_prefetch_the_rows_ahead():
    """Random rows of a big table are bound by memory latency: both shells (recompiled from
    their source, cached code cannot be inspected) ask for the rows ahead with write
    prefetches (the shell's code, around any variant's element update: one with a momentum
    buffer is checked), and step them to the same bits as without (the tests above)."""
    from numba import njit

    for opts in VARIANTS[3:4]:  # one variant: the prefetches are the shell's, not the variant's
        key = options.variant_key(options.resolve(opts))
        s = tuple(options.scalars(options.resolve(opts), 0.01, 1))
        x = np.ones(4 * 8, np.float32)
        for shell, rows in ((kernels.rows, (np.array([1]), 8)), (kernels.merged_rows, (np.array([1]), 4, 8, 2))):
            fresh = njit(parallel=True, error_model="numpy", nogil=True)(shell(key, True).py_func)
            head = (s, x, x[:8].copy(), x.copy(), x.copy(), x.copy(), *rows, np.zeros(4, np.int64), 1, True)
            fresh(*head, *((True,) if shell is kernels.rows else ()), 1.0, 0.01)
            ir = "\n".join(fresh.inspect_llvm().values())
            assert re.search(r"call void @llvm\.prefetch[.\w]*\(.*i32 1, i32 3, i32 1\)", ir), (shell, opts)


RACING_ROWS = """
import sys, threading
import numpy as np
import fastrms

n, width, k = 4096, 64, 4096  # a parallel step: k rows of 64 float64
rng = np.random.default_rng(0)
table = np.ones((n, width))
raw = table.view(np.int64)
rows = raw.reshape(-1)[:k]  # the index buffer is the table's first k // width rows themselves
rows[:] = rng.integers(0, k // width, size=k)  # ... and names only those rows: each write changes an index
expected_rows = rows.copy()
grads = rng.standard_normal((k, width))
opt = fastrms.RMSprop(table, 1e-2)
assert opt.parallel == [True] or "serial" in sys.argv[1:]
ref = table.copy(); ref_opt = fastrms.RMSprop(ref, 1e-2)
ref_opt.step_rows(expected_rows, grads)
opt.step_rows(rows, grads)  # the indices checked must be the indices used
assert np.array_equal(table, ref), "the step used indices other than the ones it was given"

# a loader thread refilling the batch buffer while the optimizer steps from it
buf = rng.integers(0, n, size=k)
stop = threading.Event()
def refill():
    r = np.random.default_rng(1)
    while not stop.is_set():
        buf[:] = r.integers(-n, 2 * n, size=k)  # out-of-range values too
t = threading.Thread(target=refill); t.start()
refused = 0
try:
    for _ in range(200):
        try:
            opt.step_rows(buf, grads)
        except ValueError as exc:
            assert "outside" in str(exc)
            refused += 1
finally:
    stop.set(); t.join()
assert np.isfinite(table).all()
print("ok", refused)
"""


@pytest.mark.slow
def test_step_rows_uses_the_indices_it_checked(tmp_path):
    """Rows that alias the table, or a buffer another thread refills during the call: the
    kernel once read the indices again after the bounds check (threads indexed out of bounds:
    SIGSEGV, or a glibc abort). Run in a subprocess: a crash is a failed test, not a dead run."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", RACING_ROWS], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.startswith("ok"), (out.returncode, out.stderr[-2000:])


def test_rows_may_be_a_list_of_ints_and_a_row_past_the_end_says_so():
    a, b = np.zeros((5, 3)), np.zeros((5, 3))
    fastrms.RMSprop(a, 0.1).step_rows([0, 4, 4], np.ones((3, 3)))
    fastrms.RMSprop(b, 0.1).step_rows(np.array([0, 4, 4]), np.ones((3, 3)))
    np.testing.assert_array_equal(a, b)
    opt = fastrms.RMSprop(a, 0.1)
    with pytest.raises(ValueError, match=r"rows\[1\] = 5 is outside \[0, 5\) \(the table has 5 rows\)"):
        opt.step_rows([1, 5], np.ones((2, 3)))
    with pytest.raises(TypeError, match="rows must be integers"):
        opt.step_rows([1.0, 2.0], np.ones((2, 3)))
    with pytest.raises(TypeError, match="rows must be integers"):
        opt.step_rows([True, False], np.ones((2, 3)))


# ------------------------------------------------------------------ several tables, one step


@pytest.mark.parametrize("dense_rows", [False, True], ids=["lazy", "dense_rows"])
def test_several_tables_in_one_call_are_one_step(dense_rows):
    """Two tables stepped by one call count one step: each ends bit for bit as an optimizer
    over that table alone stepped once per batch (the schedule and the bias correction see
    one count), while two calls per batch count two steps and differ."""
    rng = np.random.default_rng(21)
    shapes = [(40, 8), (25, 3)]
    opts = dict(momentum=0.9, lr_in_momentum=True, bias_correction=True, dense_rows=dense_rows)
    schedule = schedules.step_decay(0.05, 0.5, 2)
    tables = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    alone = [t.copy() for t in tables]
    twice = [t.copy() for t in tables]
    both = fastrms.RMSprop(tables, schedule, **opts)
    singles = [fastrms.RMSprop(t, schedule, **opts) for t in alone]
    counted_twice = fastrms.RMSprop(twice, schedule, **opts)
    for _ in range(5):
        batch = [_batch(rng, s[0], 12, s[1], np.float32) for s in shapes]
        both.step_rows([b[0] for b in batch], [b[1] for b in batch], param=[0, 1])
        for opt, (rows, g) in zip(singles, batch):
            opt.step_rows(rows, g)
        for i, (rows, g) in enumerate(batch):
            counted_twice.step_rows(rows, g, param=i)
    assert both.step_count == 5 and counted_twice.step_count == 10
    for mine, single in zip(tables, alone):
        np.testing.assert_array_equal(mine, single)
    assert not np.array_equal(twice[0], tables[0])


def test_several_tables_share_one_global_norm_and_one_nonfinite_check():
    rng = np.random.default_rng(22)
    shapes = [(30, 4), (20, 6)]
    tables = [rng.standard_normal(s) for s in shapes]
    dense = [t.copy() for t in tables]
    opt = fastrms.RMSprop(tables, 0.1, clip_global_norm=0.5)
    ref = fastrms.RMSprop(dense, 0.1, clip_global_norm=0.5)
    rows = [rng.permutation(s[0]) for s in shapes]  # every row once: the lazy step is the dense one
    grads = [rng.standard_normal((s[0], s[1])) for s in shapes]
    opt.step_rows(rows, grads, param=[0, 1])
    full = [np.zeros(s) for s in shapes]
    for f, r, g in zip(full, rows, grads):
        f[r] = g
    ref.step(full)
    assert opt.last_grad_norm == pytest.approx(float(np.sqrt(sum(np.sum(g * g) for g in grads))), rel=1e-13)
    assert opt.last_grad_norm == pytest.approx(ref.last_grad_norm, rel=1e-13)
    for mine, theirs in zip(tables, dense):
        np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-14)
    # a NaN in the second table skips the first's rows too
    skipping = fastrms.RMSprop([t.copy() for t in tables], 0.1, skip_nonfinite=True)
    before = snapshot(skipping)
    bad = [grads[0], grads[1].copy()]
    bad[1][3, 2] = np.nan
    skipping.step_rows(rows, bad, param=[0, 1])
    assert skipping.skipped_steps == 1 and skipping.step_count == 0
    assert_unchanged(skipping, {**before, "skipped_steps": 1})


def test_several_tables_are_all_checked_before_any_is_written():
    tables = [np.ones((6, 2), np.float32), np.ones((4, 3), np.float32)]
    opt = fastrms.RMSprop(tables, 0.1)
    good = (np.array([0, 5]), np.ones((2, 2), np.float32))
    cases = [
        (([good[0], np.array([1, 4])], [good[1], np.ones((2, 3), np.float32)], [0, 1]), ValueError,
         r"rows\[1\]\[1\] = 4 is outside \[0, 4\)"),
        (([good[0], np.array([1])], [good[1], np.ones((1, 2), np.float32)], [0, 1]), ValueError,
         r"grad_rows\[1\] must be float32 of shape \(1, 3\)"),
        (([good[0], good[0]], [good[1], good[1]], [0, 0]), ValueError, r"names params\[0\] twice"),
        (([good[0]], [good[1]], [0, 1]), TypeError, "lists or tuples of 2 arrays"),
        (([], [], []), TypeError, "at least one table"),
        (([good[0], np.array([1])], [good[1], np.ones((1, 3), np.float32)], [0, 2]), ValueError,
         r"param\[1\] must be an index in \[0, 2\)"),
        ((good[0], good[1], "01"), TypeError, "an index or a sequence of indices"),
    ]  # fmt: skip
    before = snapshot(opt)
    for (rows, grads, param), kind, error in cases:
        with pytest.raises(kind, match=error):
            opt.step_rows(rows, grads, param=param)
    assert_unchanged(opt, before)
    assert all(np.all(t == 1) for t in tables)


# ------------------------------------------------------------------ state_layout="rowwise"

ROWWISE = [{**o, "state_layout": "rowwise"} for o in VARIANTS if not o.get("centered")]


@pytest.mark.parametrize("opts", ROWWISE, ids=lambda o: ",".join(k for k in o if k != "state_layout") or "plain")
@pytest.mark.lower_bound
def test_rowwise_lazy_rows_match_the_numpy_lazy_rule_bit_for_bit(opts, dtype):
    rng = np.random.default_rng(3)
    n, width = 500, 6
    t0 = rng.standard_normal((n, width)).astype(dtype)
    opt = fastrms.RMSprop(t0.copy(), 0.01, **opts)
    table = t0.copy()
    state = {name: np.zeros_like(table) for name in spec.of(opts).names}
    state["square_avg"] = np.zeros(n, dtype)  # one value a row
    for t in range(1, 31):
        rows, grad_rows = _batch(rng, n, 25, width, dtype, pool=np.arange(0, n, 3))
        if t == 7:
            opt.step(np.zeros_like(t0))  # a dense step between: every row, the same rule
            table[...] = reference.rmsprop_step(table, np.zeros_like(t0), state, t, 0.01, **opts)
            continue
        opt.step_rows(rows, grad_rows)
        _lazy_reference(table, state, rows, grad_rows, t, 0.01, opts)
    np.testing.assert_array_equal(opt.params, table)
    for name, value in state.items():
        np.testing.assert_array_equal(getattr(opt, name), value, err_msg=name)
    assert opt.square_avg.shape == (n,) and opt.kernel_calls == ["rowwise"]


@pytest.mark.parametrize("opts", ROWWISE, ids=lambda o: ",".join(k for k in o if k != "state_layout") or "plain")
def test_rowwise_dense_rows_equal_a_dense_run_with_zero_rows(opts):
    rng = np.random.default_rng(4)
    n, width = 300, 4
    t0 = rng.standard_normal((n, width))
    sparse = fastrms.RMSprop(t0.copy(), 0.01, dense_rows=True, **opts)
    dense = fastrms.RMSprop(t0.copy(), 0.01, **opts)
    for t in range(150):
        pool = np.arange(0, 30) if t < 120 else np.arange(n)
        rows, grad_rows = _batch(rng, n, 10, width, np.float64, pool=pool)
        sparse.step_rows(rows, grad_rows)
        g = np.zeros((n, width))
        np.add.at(g, rows, grad_rows)
        dense.step(g)
    sparse.step_rows(np.arange(n), np.zeros((n, width)))
    dense.step(np.zeros((n, width)))
    for name in ("params", *spec.of(opts).names):
        a, b = getattr(sparse, name), getattr(dense, name)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max(), err_msg=name)
    assert not np.allclose(sparse.params, t0)


@pytest.mark.lower_bound
def test_the_rowwise_row_shell_is_the_same_bits_serial_and_parallel():
    rng = np.random.default_rng(5)
    hyper = options.resolve({"momentum": 0.9, "learning_rate": 0.01, "state_layout": "rowwise", "clip_value": 1.0})
    key = options.variant_key(hyper)
    n, width = 2000, 37  # 4 whole lanes of 8 and a tail of 5
    p0 = rng.standard_normal(n * width).astype(np.float32)
    rows = rng.choice(n, 1500, replace=False).astype(np.int64)
    grads = rng.standard_normal(rows.size * width).astype(np.float32)
    results = []
    for parallel in (False, True):
        p, v, b = p0.copy(), np.zeros(n, np.float32), np.zeros(n * width, np.float32)
        kernels.rows(key, parallel, True)(
            tuple(options.scalars(hyper, 0.01, 1)), p, grads, v, v[:0], b, rows, width, np.zeros(0, np.int64), 1,
            False, True, 1.0, 0.01,
        )  # fmt: skip
        results.append((p.tobytes(), v.tobytes(), b.tobytes()))
    assert results[0] == results[1]
    assert np.count_nonzero(np.frombuffer(results[0][1], np.float32)) == rows.size  # the touched rows only
    with pytest.raises(ValueError, match="merged_rows keeps the state element by element"):
        kernels.merged_rows(key, False, True)


@pytest.mark.parametrize("dense_rows", [False, True], ids=["lazy", "dense_rows"])
def test_a_rowwise_table_of_width_0_steps_alone_and_beside_another(dense_rows):
    """A (k, 0) table holds no elements: its rows step (nothing to write, the rowwise v of an
    empty row kept, as the reference keeps it) beside a table that does, in one step."""
    options = dict(state_layout="rowwise", dense_rows=dense_rows)
    a, empty = np.ones((4, 3), np.float32), np.ones((4, 0), np.float32)
    both = fastrms.RMSprop([a, empty], 0.1, **options)
    both.step_rows([np.array([0, 1]), np.array([0, 3])], [np.ones((2, 3), np.float32), np.ones((2, 0), np.float32)],
                   param=[0, 1])  # fmt: skip
    alone = fastrms.RMSprop(np.ones((4, 3), np.float32), 0.1, **options)
    alone.step_rows(np.array([0, 1]), np.ones((2, 3), np.float32))
    assert both.step_count == 1 and a.tobytes() == alone.params.tobytes()
    assert both.square_avg[1].tolist() == [0, 0, 0, 0]  # an empty row's v is kept
    only = fastrms.RMSprop(np.ones((4, 0), np.float32), 0.1, **options)
    only.step_rows(np.array([2]), np.ones((1, 0), np.float32))
    assert only.step_count == 1
    if dense_rows:
        assert both.state_dict()["row_step.1"].tolist() == [1, 0, 0, 1]
    with pytest.raises(ValueError, match=r"rows\[1\]\[0\] = 4 is outside \[0, 4\)"):
        both.step_rows([np.array([0]), np.array([4])], [np.ones((1, 3), np.float32), np.ones((1, 0), np.float32)],
                       param=[0, 1])  # fmt: skip
    assert both.step_count == 1 and a.tobytes() == alone.params.tobytes()  # refused before anything was written


def test_a_uint64_row_beyond_int64_is_reported_as_given_not_wrapped():
    opt = fastrms.RMSprop(np.ones((4, 3), np.float32), 0.1)
    with pytest.raises(ValueError, match=r"rows\[1\] = 18446744073709551615 is outside any table"):
        opt.step_rows(np.array([0, 2**64 - 1], np.uint64), np.ones((2, 3), np.float32))
    assert opt.step_count == 0 and (opt.params == 1).all()
