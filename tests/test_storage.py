"""fastrms.kernels.storage: the state read and written through a codec chosen at compile time.
The native codec is every other test's; here the bfloat16 state against the reference, bit
for bit, and its rounding against ml_dtypes."""

import numpy as np
import pytest
from conftest import BIG
from numba import njit

from fastrms import kernels, reference
from fastrms.bench.cases import MAIN
from fastrms.core import options, spec
from fastrms.kernels import storage

try:
    import ml_dtypes
except ImportError:  # an optional dependency (the dev extra has it)
    ml_dtypes = None


def _patterns(dropped=16):
    """float32 values around every value of a format that keeps all but the low `dropped`
    bits of float32's (bfloat16: 16): each kept pattern with the low bits that decide its
    rounding (0, 1, just below, at and just above the tie, the largest)."""
    upper = np.arange(1 << (32 - dropped), dtype=np.uint32) << dropped
    tie = 1 << (dropped - 1)
    lower = np.array([0, 1, tie - 1, tie, tie + 1, 2 * tie - 1], dtype=np.uint32)
    return (upper[:, None] | lower[None, :]).reshape(-1).view(np.float32)


def _loops(codec):
    """`(encode_all(x, out), load_all(bits, out))`: `codec`'s rounding and widening over arrays."""
    encode, load = codec.encode, codec.load

    @njit
    def encode_all(x, out):
        for i in range(x.size):
            out[i] = encode(x[i])

    @njit
    def load_all(bits, out):
        for i in range(bits.size):
            out[i] = load(bits, i)

    return encode_all, load_all


_round_all, _widen_all = _loops(storage.BFLOAT16)
_half_all, _unhalf_all = _loops(storage.FLOAT16)


def test_the_bfloat16_store_rounds_to_nearest_even_as_the_reference_does():
    x = _patterns()
    got = np.empty(x.size, np.uint16)
    _round_all(x, got)
    np.testing.assert_array_equal(got, reference.bfloat16_round(x))
    assert np.isnan(reference.bfloat16_value(got[np.isnan(x)])).all()
    # ties go to the even pattern: 1 + 2^-8 is halfway between 1 and 1 + 2^-7
    assert reference.bfloat16_round(np.float32(1 + 2**-8)) == 0x3F80
    assert reference.bfloat16_round(np.float32(1 + 3 * 2**-8)) == 0x3F82


@pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes is not installed (pip install ml_dtypes)")
def test_the_bfloat16_store_rounds_as_ml_dtypes_does():
    x = _patterns()
    got = np.empty(x.size, np.uint16)
    _round_all(x, got)
    with np.errstate(invalid="ignore"):  # ml_dtypes warns on casting a NaN
        theirs = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(got[finite], theirs[finite])
    assert np.isnan(reference.bfloat16_value(theirs[~finite])).all()


def test_the_bfloat16_load_is_exact():
    bits = np.arange(1 << 16, dtype=np.uint16)
    got = np.empty(bits.size, np.float32)
    _widen_all(bits, got)
    np.testing.assert_array_equal(got.view(np.uint32), bits.astype(np.uint32) << 16)
    np.testing.assert_array_equal(reference.bfloat16_round(got[~np.isnan(got)]), bits[~np.isnan(got)])


def _run(name, n, parallel, steps=10):
    opts = MAIN[name]
    hyper = options.resolve({**opts, "learning_rate": 0.01})
    key = options.variant_key(hyper)
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    p = p0.copy()
    state = {k: np.zeros(n, np.uint16) for k in ("square_avg", "grad_avg", "momentum_buffer")}
    empty = np.zeros(0, np.uint16)
    arrays = [state[k] if k in spec.of(hyper).names else empty for k in state]
    ref = reference.RMSprop(p0.copy(), 0.01, state_storage="bfloat16", **opts)
    shell = kernels.dense(key, parallel, storage.BFLOAT16)
    for t in range(1, steps + 1):
        shell(tuple(options.scalars(hyper, 0.01, t)), p, grads[t % 3], *arrays)
        ref.step(grads[t % 3])
    return p, state, ref, hyper


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("name", MAIN)
@pytest.mark.lower_bound
def test_a_bfloat16_state_step_matches_the_reference_bit_for_bit(name, parallel):
    n = BIG if parallel else 1031
    p, state, ref, hyper = _run(name, n, parallel)
    np.testing.assert_array_equal(p, ref.params[0])
    for k in spec.of(hyper).names:
        np.testing.assert_array_equal(reference.bfloat16_value(state[k]), ref.state[0][k], err_msg=k)


def test_the_bfloat16_state_changes_the_result_and_halves_the_state_bytes():
    p, state, ref, _ = _run("plain", 1031, False)
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(1031).astype(np.float32)
    grads = [rng.standard_normal(1031).astype(np.float32) for _ in range(3)]
    full = reference.RMSprop(p0, 0.01)
    for t in range(1, 11):
        full.step(grads[t % 3])
    assert not np.array_equal(p, full.params[0])  # the rounding is real
    np.testing.assert_allclose(p, full.params[0], rtol=0, atol=2e-3)  # and small
    assert state["square_avg"].nbytes * 2 == full.state[0]["square_avg"].nbytes


@pytest.mark.lower_bound
def test_the_chunk_table_shell_reads_the_state_through_the_codec():
    hyper = options.resolve({"centered": True, "momentum": 0.9, "learning_rate": 0.01})
    key = options.variant_key(hyper)
    rng = np.random.default_rng(2)
    sizes = [kernels.CHUNK + 5, 3, 700]
    params = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    states = [[np.zeros(n, np.uint16) for _ in range(3)] for n in sizes]
    alone = [(p.copy(), [s.copy() for s in st]) for p, st in zip(params, states)]
    ptrs = np.array(
        [[kernels.address(a) for a in (p, g, *st)] for p, g, st in zip(params, grads, states)], dtype=np.int64
    )
    sizes_ = np.array(sizes, dtype=np.int64)
    table = kernels.chunk_table(sizes_)
    scalars = tuple(options.scalars(hyper, 0.01, 1))
    kernels.segments(key, True, storage.BFLOAT16)(scalars, params[0][:0], ptrs, sizes_, table)
    for (p, st), g, p_table, st_table in zip(alone, grads, params, states):
        kernels.dense(key, False, storage.BFLOAT16)(scalars, p, g, *st)
        assert p.tobytes() == p_table.tobytes()
        assert all(a.tobytes() == b.tobytes() for a, b in zip(st, st_table))
        assert st[0].any() and st[2].any()  # the state was written, in bfloat16


def test_codecs_name_their_storage():
    assert storage.state_dtype(storage.NATIVE, np.float64) == np.float64
    assert storage.state_dtype(storage.BFLOAT16, np.float32) == np.uint16
    assert storage.CODECS["bfloat16"] is storage.BFLOAT16 and storage.suffix(storage.NATIVE) == ""


# ------------------------------------------------------------------ float16, and 16-bit grads


def test_the_float16_store_rounds_as_numpy_does():
    x = _patterns(13)  # around every float16 mantissa, at every float32 exponent: subnormal, huge
    got = np.empty(x.size, np.uint16)
    _half_all(x, got)
    want = reference.float16_round(x)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(got[finite], want[finite])  # subnormals, ties to even, overflow to inf
    assert np.isnan(got[~finite].view(np.float16)).all() and (got[~finite] & 0x0200).all()  # NaN, quiet
    assert got[x == np.float32(65520.0)][0] == 0x7C00 and got[x == np.float32(65504.0)][0] == 0x7BFF


def test_the_float16_load_is_exact():
    bits = np.arange(1 << 16, dtype=np.uint16)
    got = np.empty(bits.size, np.float32)
    _unhalf_all(bits, got)
    np.testing.assert_array_equal(got.view(np.uint32), bits.view(np.float16).astype(np.float32).view(np.uint32))


def _low(n, name, seed=0):
    """`n` random grads of the 16-bit dtype `name`, and their float32 values."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 3).astype(np.float32)
    x[::97] = 1e-6  # subnormal in float16
    bits = reference.low_round(x, name if name == "float16" else "bfloat16")
    wide = bits.view(np.float16).astype(np.float32) if name == "float16" else reference.bfloat16_value(bits)
    return bits, wide


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("name", ["bfloat16", "float16"])
@pytest.mark.lower_bound
def test_a_shell_reads_16_bit_grads_as_their_float32_values(name, parallel):
    """The dense and chunk-table shells fed 16-bit grads give the bits of the float32 shells
    fed the same values widened, with the copy written too."""
    hyper = options.resolve({"centered": True, "momentum": 0.9, "learning_rate": 0.01})
    key, scalars = options.variant_key(hyper), tuple(options.scalars(hyper, 0.01, 1))
    n = BIG if parallel else 1031
    bits, wide = _low(n, name)
    codec = storage.ARRAYS[name]
    p0 = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    mine, theirs, tabled = ([p0.copy(), *[np.zeros(n, np.float32) for _ in range(3)]] for _ in range(3))
    copy, copy_tabled = np.zeros(n, np.uint16), np.zeros(n, np.uint16)
    kernels.dense(key, parallel, storage.NATIVE, codec, codec)(scalars, mine[0], bits, *mine[1:], copy)
    kernels.dense(key, parallel)(scalars, theirs[0], wide, *theirs[1:])
    assert all(a.tobytes() == b.tobytes() for a, b in zip(mine, theirs))
    np.testing.assert_array_equal(copy, reference.low_round(mine[0], name))
    ptrs = np.array([[kernels.address(a) for a in (tabled[0], bits, *tabled[1:], copy_tabled)]], dtype=np.int64)
    sizes = np.array([n], dtype=np.int64)
    kernels.segments(key, parallel, storage.NATIVE, codec, codec)(
        scalars, p0[:0], ptrs, sizes, kernels.chunk_table(sizes)
    )
    assert all(a.tobytes() == b.tobytes() for a, b in zip(tabled, theirs)) and copy_tabled.tobytes() == copy.tobytes()


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
@pytest.mark.lower_bound
def test_the_reductions_read_16_bit_grads_as_their_values(name):
    codec = storage.ARRAYS[name]
    bits, wide = _low(kernels.BLOCK + 1001, name, seed=3)
    assert kernels.sumsq(False, codec)(bits) == kernels.sumsq(True, codec)(bits) == kernels.sumsq_serial(wide)
    sizes = np.array([bits.size, 5], dtype=np.int64)
    other, other_wide = _low(5, name, seed=4)
    ptrs = np.zeros((2, 5), dtype=np.int64)
    ptrs[:, 1] = [kernels.address(bits), kernels.address(other)]
    table = (np.zeros(0, np.float32), ptrs, sizes, kernels.chunk_table(sizes))
    assert kernels.sumsq_segments(True, codec)(*table) ** 0.5 == reference.global_norm([wide, other_wide])
    assert not kernels.nonfinite(False, codec)(bits) and not kernels.nonfinite_segments(True, codec)(*table)
    other[2] = 0x7C00 if name == "float16" else 0x7F80  # +inf
    assert kernels.nonfinite_segments(False, codec)(*table) and kernels.nonfinite(True, codec)(other)


# ------------------------------------------------------------------ stochastic rounding


@njit
def _stochastic_all(x, key, out):
    for i in range(x.size):
        out[i] = storage.bfloat16_stochastic_bits(x[i], storage.stochastic_noise(key, i))


def test_stochastic_rounding_is_the_references_and_rounds_only_between_neighbours():
    x = _patterns()
    got = np.empty(x.size, np.uint16)
    _stochastic_all(x, 12345, got)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(got[finite], reference.bfloat16_stochastic_round(x, 12345)[finite])
    assert np.isnan(reference.bfloat16_value(got[~finite])).all()
    down = x.view(np.uint32) >> 16  # truncation, and the next pattern up: the only two results
    assert np.isin(got[finite].astype(np.uint32) - down[finite], [0, 1]).all()
    exact = (x.view(np.uint32) & 0xFFFF) == 0
    np.testing.assert_array_equal(got[exact & finite], down[exact & finite])  # a bfloat16 value stays itself
    assert storage.stochastic_key(7, 3, 11) == reference.stochastic_key(7, 3, 11)
    assert storage.stochastic_key(2**64 - 1, 0, 1) == reference.stochastic_key(2**64 - 1, 0, 1)


def test_stochastic_rounding_is_unbiased():
    """Each value rounded under 4096 keys: the mean of the results is the value, within six
    standard errors of a rounding whose error is at most one bfloat16 step."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(512) * np.exp2(rng.integers(-20, 20, 512))).astype(np.float32)
    keys = 4096
    total = np.zeros(x.size)
    out = np.empty(x.size, np.uint16)
    for key in range(keys):
        _stochastic_all(x, storage.stochastic_key(1, 0, key + 1), out)
        total += reference.bfloat16_value(out)
    mean = total / keys
    down = (x.view(np.uint32) >> 16).astype(np.uint16)
    ulp = np.abs(reference.bfloat16_value(down + np.uint16(1)) - reference.bfloat16_value(down))
    assert (np.abs(mean - x) <= 6 * ulp / (2 * np.sqrt(keys))).all()
    nearest = reference.bfloat16_value(reference.bfloat16_round(x))
    assert np.abs(mean - x).mean() < 0.1 * np.abs(nearest - x).mean()  # round to nearest is biased here


@pytest.mark.parametrize("name", ["plain", "centered_momentum"])
@pytest.mark.lower_bound
def test_the_stochastic_shells_give_the_same_bits_serial_parallel_and_chunked(name):
    hyper = options.resolve({**MAIN[name], "learning_rate": 0.01})
    key, scalars = options.variant_key(hyper), tuple(options.scalars(hyper, 0.01, 1))
    n = BIG
    params, _ = _low(n, "bfloat16", seed=6)
    grads, _ = _low(n, "bfloat16", seed=7)
    names = spec.of(hyper).names
    runs = []
    for parallel in (False, True):
        p = params.copy()
        state = {k: np.zeros(n if k in names else 0, np.float32) for k in ("square_avg", "grad_avg", "momentum_buffer")}
        kernels.stochastic(key, parallel)(scalars, p, grads, *state.values(), 0, 99)
        runs.append((p, state))
    assert runs[0][0].tobytes() == runs[1][0].tobytes()
    p = params.copy()
    state = {k: np.zeros(n if k in names else 0, np.float32) for k in ("square_avg", "grad_avg", "momentum_buffer")}
    ptrs = np.array([[kernels.address(p), kernels.address(grads),
                      *[kernels.address(a) if a.size else 0 for a in state.values()], 99]], dtype=np.int64)  # fmt: skip
    sizes = np.array([n], dtype=np.int64)
    kernels.stochastic_segments(key, True)(scalars, np.zeros(0, np.float32), ptrs, sizes, kernels.chunk_table(sizes))
    assert p.tobytes() == runs[0][0].tobytes()
    assert all(state[k].tobytes() == runs[0][1][k].tobytes() for k in names)
    wide = reference.bfloat16_value(params)
    ref_state = {k: np.zeros(n, np.float32) for k in names}
    stepped = reference.rmsprop_step(wide, reference.bfloat16_value(grads), ref_state, 1, 0.01, **MAIN[name])
    np.testing.assert_array_equal(p, reference.bfloat16_stochastic_round(stepped, 99))


# ------------------------------------------------------------------ 8-bit blockwise state


def test_the_8bit_maps_step_by_a_fixed_ratio_up_to_1_and_have_no_zero():
    u, s = storage.UNSIGNED8, storage.SIGNED8
    assert u.size == s.size == 256 and u[-1] == 1 and s[-1] == 1 and s[0] == -1
    np.testing.assert_allclose(u[1:] / u[:-1], 2 ** (1 / 8), rtol=1e-6)  # 8 codes an octave
    np.testing.assert_allclose(s[129:] / s[128:-1], 2 ** (1 / 4), rtol=1e-6)  # 4, each sign
    np.testing.assert_array_equal(s[:128], -s[128:][::-1])
    assert (u > 0).all() and u[0] == np.float32(2 ** (-255 / 8)) and (s != 0).all()


@njit
def _codes(y, signed):
    out = np.empty(y.size, np.uint8)
    for i in range(y.size):
        out[i] = storage.signed8_code(y[i]) if signed else storage.unsigned8_code(y[i])
    return out


def _probes(table):
    """Every midpoint of `table`'s, its float32 neighbours, random values over 40 octaves, and
    the edges (0, the smallest subnormal, 1, inf, NaN)."""
    mid = storage.midpoints(table)
    rng = np.random.default_rng(3)
    spread = np.exp2(rng.uniform(-40, 0.1, 100_000)).astype(np.float32)
    edges = np.array([0, 1e-45, 1, 1.0000001, np.inf, np.nan], np.float32)
    return np.concatenate([mid, np.nextafter(mid, np.float32(2)), np.nextafter(mid, np.float32(-2)), spread, edges])


def test_the_unsigned_code_is_the_nearest_map_entry_as_searchsorted_finds_it():
    y = _probes(storage.UNSIGNED8)
    y = y[~(y < 0)]
    np.testing.assert_array_equal(_codes(y, False), np.searchsorted(storage.midpoints(storage.UNSIGNED8), y))


def test_the_signed_code_is_the_nearest_magnitude_on_the_values_side():
    y = _probes(storage.SIGNED8)
    y = np.concatenate([y, -y])
    k = np.searchsorted(storage.midpoints(storage.SIGNED8[128:]), np.abs(y))
    want = np.where(y < 0, 127 - k, 128 + k)
    np.testing.assert_array_equal(_codes(y, True), want)
    finite = np.isfinite(y) & (np.abs(y) <= 1) & (np.abs(y) >= storage.SIGNED8[128])
    kept = storage.SIGNED8[_codes(y[finite], True)]
    assert (np.abs(kept / y[finite] - 1) <= 2 ** (1 / 8) - 1 + 1e-6).all()  # within half a step (ratio 2^(1/4))


def _block_run(name, n, parallel, steps=4):
    """Params stepped `steps` times by the 8-bit shell, and by the reference."""
    hyper = options.resolve({**MAIN[name], "learning_rate": 0.01, "state_storage": "8bit"})
    key, rng = options.variant_key(hyper), np.random.default_rng(7)
    p = rng.standard_normal(n).astype(np.float32)
    ref = reference.RMSprop(p.copy(), 0.01, **{k: v for k, v in MAIN[name].items()}, state_storage="8bit")
    state = spec.of(hyper).allocate(storage.extent(storage.BLOCKWISE8, n), np.float32)
    arrays = [state.get(k, np.zeros(0, np.uint8)) for k in ("square_avg", "grad_avg", "momentum_buffer")]
    shell = kernels.dense(key, parallel, storage.BLOCKWISE8)
    for t in range(1, steps + 1):
        g = (rng.standard_normal(n) * np.exp(rng.uniform(-12, 4, n))).astype(np.float32)
        shell(tuple(options.scalars(hyper, 0.01, t)), p, g, *arrays)
        ref.step(g)
    return p, state, ref


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("name", MAIN)
@pytest.mark.lower_bound
def test_an_8bit_state_step_matches_the_reference_bit_for_bit(name, parallel):
    n = BIG if parallel else 1031  # a partial last block
    p, state, ref = _block_run(name, n, parallel)
    np.testing.assert_array_equal(p, ref.params[0])
    for k, stored in state.items():
        signed = k != "square_avg"
        codes, scales = storage.block_parts(stored, n)
        want_codes, want_scales = storage.block_parts(reference.blockwise8_encode(ref.state[0][k], signed), n)
        np.testing.assert_array_equal(codes, want_codes, err_msg=k)
        assert scales.tobytes() == want_scales.tobytes(), k


def test_an_8bit_block_with_a_nan_is_all_nan_and_its_neighbours_are_not():
    hyper = options.resolve({"learning_rate": 0.01, "state_storage": "8bit"})
    p, g = np.ones(600, np.float32), np.ones(600, np.float32)
    g[300] = np.nan  # block 1 of 3
    v = spec.of(hyper).allocate(storage.extent(storage.BLOCKWISE8, 600), np.float32)["square_avg"]
    kernels.dense(options.variant_key(hyper), False, storage.BLOCKWISE8)(
        tuple(options.scalars(hyper, 0.01, 1)), p, g, v, v[:0], v[:0]
    )
    values = storage.decode(storage.BLOCKWISE8, v, 600)
    assert np.isnan(values[256:512]).all() and np.isfinite(values[:256]).all() and np.isfinite(values[512:]).all()
    np.testing.assert_array_equal(values[:256], np.float32(0.1))  # 0.1 * g^2: its block's scale, code 255


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_an_overflowing_square_or_a_subnormal_block_is_encoded_as_the_reference_and_keeps_its_neighbours(parallel):
    """Block 0: one grad beyond 2^64 (its v overflows to inf); block 1: grads near 1e-20 (v
    subnormal, below 2^-126). The shell stores both as the reference does, the scale stays
    finite, block 0's other values keep training, and block 1's keep their values."""
    n = BIG if parallel else 600
    hyper = options.resolve({"learning_rate": 0.01, "state_storage": "8bit", "momentum": 0.9, "centered": True})
    p = np.zeros(n, np.float32)
    ref = reference.RMSprop(p.copy(), 0.01, momentum=0.9, centered=True, state_storage="8bit")
    state = spec.of(hyper).allocate(storage.extent(storage.BLOCKWISE8, n), np.float32)
    arrays = [state.get(k, np.zeros(0, np.uint8)) for k in ("square_avg", "grad_avg", "momentum_buffer")]
    shell = kernels.dense(options.variant_key(hyper), parallel, storage.BLOCKWISE8)
    rng = np.random.default_rng(3)
    for t in range(1, 4):
        g = rng.uniform(0.05, 0.2, n).astype(np.float32)
        g[256:512] *= np.float32(1e-19)  # g^2 about 1e-40: subnormal in float32
        if t == 1:
            g[3] = 2e19  # g^2 overflows: v = inf
        before = p.copy()
        shell(tuple(options.scalars(hyper, 0.01, t)), p, g, *arrays)
        with np.errstate(over="ignore", invalid="ignore"):
            ref.step(g)
        assert p.tobytes() == ref.params[0].tobytes()
        if t > 1:
            assert (p[:256] != before[:256]).all()  # block 0 keeps training
    codes, scales = storage.block_parts(state["square_avg"], n)
    want_codes, want_scales = storage.block_parts(reference.blockwise8_encode(ref.state[0]["square_avg"]), n)
    assert codes.tobytes() == want_codes.tobytes() and scales.tobytes() == want_scales.tobytes()
    assert np.isfinite(scales).all() and 0 < scales[1] < np.finfo(np.float32).tiny  # block 1: a subnormal scale
    x = np.geomspace(2.0**-140, 2.0**-127, 256).astype(np.float32)  # a block of subnormals alone
    kept = reference.blockwise8_decode(reference.blockwise8_encode(x), 256)
    assert (np.abs(kept / x - 1) < 0.05).all()  # 4.4% of the map, and the subnormal spacing (2^-149)


@pytest.mark.lower_bound
def test_the_chunk_table_shell_steps_8bit_state_block_by_block_as_the_dense_shell_does():
    hyper = options.resolve({"centered": True, "momentum": 0.9, "learning_rate": 0.01, "state_storage": "8bit"})
    key, rng = options.variant_key(hyper), np.random.default_rng(2)
    sizes = [kernels.CHUNK + 5, 3, 700]
    params = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    held = [storage.extent(storage.BLOCKWISE8, n) for n in sizes]
    states = [[np.zeros(h, np.uint8) for _ in range(3)] for h in held]
    alone = [(p.copy(), [s.copy() for s in st]) for p, st in zip(params, states)]
    ptrs = np.array(
        [[kernels.address(a) for a in (p, g, *st)] for p, g, st in zip(params, grads, states)], dtype=np.int64
    )
    sizes_ = np.array(sizes, dtype=np.int64)
    scalars = tuple(options.scalars(hyper, 0.01, 1))
    kernels.segments(key, True, storage.BLOCKWISE8)(scalars, params[0][:0], ptrs, sizes_, kernels.chunk_table(sizes_))
    for (p, st), g, p_table, st_table in zip(alone, grads, params, states):
        kernels.dense(key, False, storage.BLOCKWISE8)(scalars, p, g, *st)
        assert p.tobytes() == p_table.tobytes()
        assert all(a.tobytes() == b.tobytes() for a, b in zip(st, st_table))
        assert st[0].any() and st[2].any()


def test_an_8bit_shell_refuses_state_of_the_wrong_size():
    hyper = options.resolve({"learning_rate": 0.01, "state_storage": "8bit"})
    shell = kernels.dense(options.variant_key(hyper), False, storage.BLOCKWISE8)
    p = np.ones(300, np.float32)
    with pytest.raises(ValueError, match="8-bit state: the bytes of its blocks"):
        shell(
            tuple(options.scalars(hyper, 0.01, 1)),
            p,
            p,
            np.zeros(300, np.uint8),
            p[:0].view(np.uint8),
            p[:0].view(np.uint8),
        )
    assert (p == 1).all()


def test_filled_8bit_state_decodes_to_the_value_exactly():
    a = np.zeros(3 * 260, np.uint8)
    storage.fill(storage.BLOCKWISE8, a, np.float32, 0.1)
    np.testing.assert_array_equal(storage.decode(storage.BLOCKWISE8, a, 700), np.float32(0.1))
    storage.fill(storage.BLOCKWISE8, a, np.float32, 0.0)
    assert not np.signbit(storage.decode(storage.BLOCKWISE8, a, 700, signed=True)).any()


def test_the_shells_that_read_state_element_by_element_refuse_8bit_blocks():
    key = options.variant_key(options.resolve({}))
    with pytest.raises(ValueError, match="dense_out: the q8 state is kept in blocks"):
        kernels.dense_out(key, False, storage.BLOCKWISE8)
    with pytest.raises(ValueError, match="stochastic: the q8 state is kept in blocks"):
        kernels.stochastic(key, False, storage.BLOCKWISE8)
    with pytest.raises(ValueError, match="stochastic: the q8 state is kept in blocks"):
        kernels.stochastic_segments(key, False, storage.BLOCKWISE8)
