"""fastrms.backend.layout and the many-array step: one kernel call per dtype, pack(), bit for bit."""

import numpy as np
import pytest
from conftest import DTYPES, assert_same_state, assert_unchanged, cover_ids, covering, snapshot

import fastrms
from fastrms import kernels, reference
from fastrms.bench.cases import MAIN, all_variants

SHAPES = [(3, 4), (5,), (), (7, 1, 3), (1,), (40_000,), (2, 0)]


def _arrays(dtype, seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


SEGMENTS = covering(dtype=DTYPES)


@pytest.mark.parametrize("name, case", SEGMENTS, ids=cover_ids(SEGMENTS))
@pytest.mark.lower_bound
def test_a_covering_set_of_variants_in_one_call_matches_the_reference_bitwise(name, case):
    opts, dtype = all_variants()[name], case["dtype"]
    params = _arrays(dtype)
    grads = [_arrays(dtype, seed=k) for k in range(1, 4)]
    fast = fastrms.RMSprop([p.copy() for p in params], 0.01, **opts)
    ref = reference.RMSprop([p.copy() for p in params], 0.01, **opts)
    assert fast.kernel_calls == ["segments"]
    for t in range(12):
        fast.step(grads[t % 3])
        ref.step(grads[t % 3])
    assert_same_state(fast, ref)


@pytest.mark.parametrize("name", MAIN)
@pytest.mark.lower_bound
def test_the_chunked_parallel_call_equals_one_call_per_array(name, dtype):
    """Arrays larger than a chunk, split across threads: the same bits as stepping each
    array on its own optimizer."""
    shapes = [(kernels.CHUNK * 2 + 17,), (3, 1000), (kernels.CHUNK,), (1,)]
    params = _arrays(dtype, shapes=shapes)
    grads = [_arrays(dtype, seed=k, shapes=shapes) for k in range(1, 3)]
    together = fastrms.RMSprop([p.copy() for p in params], 0.01, **MAIN[name])
    alone = [fastrms.RMSprop(p.copy(), 0.01, **MAIN[name]) for p in params]
    assert together.parallel == [fastrms.info()["parallel_mode"] != "serial"] * len(shapes)
    for t in range(6):
        together.step(grads[t % 2])
        for opt, g in zip(alone, grads[t % 2]):
            opt.step(g)
    for a, b in zip(together.params, alone):
        assert a.tobytes() == b.params.tobytes()


def test_two_dtypes_make_two_calls_and_stay_exact():
    params = [np.ones(5, np.float32), np.ones(3), np.full((2, 2), 2.0, np.float32), np.zeros(4)]
    grads = [np.full_like(p, 0.5) for p in params]
    fast = fastrms.RMSprop([p.copy() for p in params], 0.1, momentum=0.9)
    ref = reference.RMSprop([p.copy() for p in params], 0.1, momentum=0.9)
    assert fast.kernel_calls == ["segments", "segments"]
    for _ in range(5):
        fast.step(grads)
        ref.step(grads)
    assert_same_state(fast, ref)


def test_pack_copies_into_one_buffer_and_returns_views_of_it(dtype):
    arrays = _arrays(dtype)
    flat, views = fastrms.pack(arrays)
    assert flat.ndim == 1 and flat.size == sum(a.size for a in arrays) and flat.dtype == dtype
    for a, v in zip(arrays, views):
        assert v.shape == a.shape and np.array_equal(v, a) and v.base is flat
    views[0][...] = 7
    assert flat[: arrays[0].size].tolist() == [7.0] * arrays[0].size and not np.all(arrays[0] == 7)


@pytest.mark.parametrize(
    "arrays, exc, match",
    [
        ([], ValueError, "empty"),
        ([np.ones(2), np.ones(2, np.float32)], TypeError, "one dtype"),
        ([np.ones(2, np.int64)], TypeError, "float32 or float64"),
        ([np.ones(2), [1.0, 2.0]], TypeError, r"arrays\[1\]"),
        (np.ones(3), TypeError, "sequence"),
        ([np.ma.array(np.ones(2))], TypeError, "plain"),
    ],
)
def test_pack_refuses_what_it_cannot_pack(arrays, exc, match):
    with pytest.raises(exc, match=match):
        fastrms.pack(arrays)


@pytest.mark.parametrize("name", MAIN)
def test_an_optimizer_over_packed_views_is_one_flat_call_bit_for_bit(name, dtype):
    params = [a for a in _arrays(dtype) if a.size]
    flat, views = fastrms.pack([p.copy() for p in params])
    gflat, gviews = fastrms.pack(_arrays(dtype, seed=5, shapes=[p.shape for p in params]))
    packed = fastrms.RMSprop(views, 0.01, **MAIN[name])
    ref = reference.RMSprop([p.copy() for p in params], 0.01, **MAIN[name])
    assert packed.kernel_calls == ["flat"]
    for t in range(9):
        # one flat grad, the grad views (they tile in the same layout), or separate copies
        grads = (gflat, gviews, [g.copy() for g in gviews])[t % 3]
        packed.step(grads)
        ref.step(gviews)
    assert_same_state(packed, ref)
    assert all(np.shares_memory(v, flat) for v in packed.params)


def test_a_flat_grad_is_checked_like_any_grad():
    flat, views = fastrms.pack([np.ones(3), np.ones((2, 2))])
    opt = fastrms.RMSprop(views, 0.1)
    before = snapshot(opt)
    for bad, exc in [(np.ones(6), ValueError), (np.ones(7, np.float32), TypeError), (np.ones(14)[::2], ValueError)]:
        with pytest.raises(exc):
            opt.step(bad)
        assert_unchanged(opt, before)
    with pytest.raises(ValueError, match="shares memory"):
        opt.step(flat)
    with pytest.raises(TypeError, match="list or tuple"):
        fastrms.RMSprop([np.ones(3), np.ones(3)], 0.1).step(np.ones(6))


def test_views_that_do_not_tile_are_segments():
    buf = np.zeros(10)
    assert fastrms.RMSprop([buf[:3], buf[5:8]], 0.1).kernel_calls == ["segments"]  # a gap
    assert fastrms.RMSprop([buf[5:8], buf[:3]], 0.1).kernel_calls == ["segments"]  # out of order
    assert fastrms.RMSprop([buf[:3], buf[3:8]], 0.1).kernel_calls == ["flat"]
    assert fastrms.RMSprop(buf, 0.1).kernel_calls == ["dense"]
