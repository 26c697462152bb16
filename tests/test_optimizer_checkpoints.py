"""RMSprop.save / load, skip_nonfinite, memmap and odd arrays: state survives, nothing is torn."""

import os
import pickle
import zipfile

import numpy as np
import pytest
from conftest import assert_unchanged, problem, snapshot

import fastrms
from fastrms import schedules
from fastrms.bench.cases import MAIN
from fastrms.kernels import storage


@pytest.mark.parametrize("name", MAIN)
def test_save_load_continues_bitwise_like_a_run_that_never_stopped(name, dtype, tmp_path):
    sched = schedules.linear_warmup(schedules.cosine_decay(0.01, 30), 5)
    p0, grads = problem(5000, dtype)
    straight = fastrms.RMSprop(p0.copy(), sched, **MAIN[name])
    first = fastrms.RMSprop(p0.copy(), sched, **MAIN[name])
    for t in range(17):
        straight.step(grads[t % 4])
        first.step(grads[t % 4])
    first.save(tmp_path / "ckpt.npz")
    params_on_disk = first.params.copy()  # the params are the caller's to save
    del first
    resumed = fastrms.RMSprop(params_on_disk, sched, **MAIN[name])
    resumed.load(tmp_path / "ckpt.npz")
    for t in range(17, 50):
        straight.step(grads[t % 4])
        resumed.step(grads[t % 4])
    np.testing.assert_array_equal(straight.params, resumed.params)
    assert resumed.step_count == 50 and resumed.hyperparameters == straight.hyperparameters


def test_the_checkpoint_is_a_plain_npz_without_pickles(tmp_path):
    opt = fastrms.RMSprop([np.ones(3), np.ones((2, 2), np.float32)], 0.1, momentum=0.9)
    opt.step([np.ones(3), np.ones((2, 2), np.float32)])
    opt.save(tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        assert z["momentum_buffer.1"].dtype == np.float32 and z["momentum_buffer.1"].shape == (2, 2)
        assert int(z["step_count"]) == 1 and str(z["fastrms_checkpoint"]) == "fastrms.RMSprop"
        assert all(z[k].dtype != object for k in z.files)
    assert os.listdir(tmp_path) == ["c.npz"]  # no temporary left behind


def test_save_is_atomic_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    opt = fastrms.RMSprop(np.ones(4), 0.1)
    opt.save(path)
    before = path.read_bytes()
    opt.step(np.ones(4))

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated mid-write)")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        opt.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.npz"]


def _write(path, kind):
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"square_avg.0": np.ones(4)}))
    elif kind == "object array":
        np.savez(path, fastrms_checkpoint=np.asarray("fastrms.RMSprop"), x=np.array([{"a": 1}], dtype=object))
    elif kind == "junk":
        path.write_bytes(b"\x00\x01 this is not a checkpoint" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        opt = fastrms.RMSprop(np.ones(4000), 0.1)
        opt.save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "other npz":
        np.savez(path, weights=np.ones(4))
    elif kind == "wrong shape":
        fastrms.RMSprop(np.ones(5), 0.1, momentum=0.5).save(path)
    elif kind == "wrong dtype":
        fastrms.RMSprop(np.ones(4, np.float32), 0.1, momentum=0.5).save(path)
    elif kind == "other variant":
        fastrms.RMSprop(np.ones(4), 0.1, centered=True).save(path)


@pytest.mark.parametrize(
    "kind",
    [
        "pickle",
        "object array",
        "junk",
        "empty",
        "truncated",
        "other npz",
        "wrong shape",
        "wrong dtype",
        "other variant",
    ],
)
def test_a_bad_checkpoint_is_refused_and_the_optimizer_left_as_it_was(kind, tmp_path):
    path = tmp_path / "bad.npz"
    _write(path, kind)
    opt = fastrms.RMSprop(np.linspace(0, 1, 4), 0.2, momentum=0.5)
    opt.step(np.full(4, 0.5))
    before = snapshot(opt)
    with pytest.raises(ValueError):
        opt.load(path)
    assert_unchanged(opt, before)


def test_a_missing_checkpoint_raises_file_not_found(tmp_path):
    opt = fastrms.RMSprop(np.ones(2))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        opt.load(tmp_path / "nope.npz")


def test_truncated_checkpoints_are_really_truncated_zips(tmp_path):
    path = tmp_path / "t.npz"
    _write(path, "truncated")
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(path).testzip()


# ---------------------------------------------------------------- skip_nonfinite


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("n", [7, 1_000_003])
def test_skip_nonfinite_leaves_everything_bitwise_unchanged_and_counts(bad, n, dtype):
    p0, grads = problem(n, dtype)
    opt = fastrms.RMSprop(
        [p0, np.ones(3, dtype)], schedules.step_decay(0.01, 0.5, 1), momentum=0.9, centered=True, skip_nonfinite=True
    )
    opt.step([grads[0], np.ones(3, dtype)])
    before = snapshot(opt)
    g = grads[1].copy()
    g[n // 2] = bad
    opt.step([grads[2], np.array([1, bad, 1], dtype)])  # the bad value in the second array
    opt.step([g, np.ones(3, dtype)])
    assert opt.skipped_steps == 2 and opt.step_count == 1
    after = snapshot(opt)
    after["skipped_steps"] = before["skipped_steps"]
    assert all(
        (a.tobytes() == b.tobytes()) if isinstance(a, np.ndarray) else (a == b)
        for key in before
        if key != "params"
        for a, b in [(before[key], after[key])]
    )
    assert all(a.tobytes() == b.tobytes() for a, b in zip(before["params"], after["params"]))
    assert opt.current_learning_rate == 0.005  # the schedule did not advance
    opt.step([grads[3], np.ones(3, dtype)])
    assert opt.step_count == 2 and opt.skipped_steps == 2


def test_without_skip_nonfinite_a_nan_grad_is_applied():
    opt = fastrms.RMSprop(np.ones(3), 0.1)
    opt.step(np.array([1.0, np.nan, 1.0]))
    assert np.isnan(opt.params[1]) and opt.skipped_steps == 0


# ---------------------------------------------------------------- odd arrays


def test_memmap_params_are_updated_in_place_on_disk(tmp_path):
    path = tmp_path / "w.dat"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(1000,))
    mm[:] = 1.0
    opt = fastrms.RMSprop(mm, 0.1)
    for _ in range(3):
        opt.step(np.full(1000, 0.5, np.float32))
    mm.flush()
    on_disk = np.fromfile(path, dtype=np.float32)
    ref = fastrms.RMSprop(np.ones(1000, np.float32), 0.1)
    for _ in range(3):
        ref.step(np.full(1000, 0.5, np.float32))
    np.testing.assert_array_equal(on_disk, ref.params)
    assert opt.params is mm


def test_readonly_memmap_is_refused(tmp_path):
    path = tmp_path / "w.dat"
    np.ones(10, np.float32).tofile(path)
    with pytest.raises(ValueError, match="writeable"):
        fastrms.RMSprop(np.memmap(path, dtype=np.float32, mode="r"))


def test_byte_swapped_grads_are_refused_clearly():
    opt = fastrms.RMSprop(np.ones(4))
    swapped = np.ones(4).astype(np.dtype(np.float64).newbyteorder())
    with pytest.raises(TypeError, match="dtype float64"):
        opt.step(swapped)


def test_zero_size_arrays_step_and_checkpoint(tmp_path):
    opt = fastrms.RMSprop([np.ones(0), np.ones((3, 0), np.float32)], momentum=0.9, skip_nonfinite=True)
    opt.step([np.ones(0), np.ones((3, 0), np.float32)])
    opt.save(tmp_path / "z.npz")
    other = fastrms.RMSprop([np.ones(0), np.ones((3, 0), np.float32)], momentum=0.9, skip_nonfinite=True)
    other.load(tmp_path / "z.npz")
    assert other.step_count == 1


def test_skip_nonfinite_matches_the_reference_over_a_run_with_bad_steps(dtype):
    from fastrms import reference

    p0, grads = problem(1031, dtype)
    bad = grads[1].copy()
    bad[7] = np.inf
    fast = fastrms.RMSprop(p0.copy(), 0.01, momentum=0.9, skip_nonfinite=True)
    ref = reference.RMSprop(p0.copy(), 0.01, momentum=0.9, skip_nonfinite=True)
    for t in range(30):
        g = bad if t % 5 == 2 else grads[t % 4]
        fast.step(g)
        ref.step(g)
    np.testing.assert_array_equal(fast.params, ref.params[0])
    assert fast.skipped_steps == ref.skipped_steps == 6 and fast.step_count == ref.step_count == 24


needs_ml_dtypes = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("ml_dtypes") is None,
    reason="ml_dtypes is not installed (pip install ml_dtypes)",
)


@needs_ml_dtypes
def test_a_bfloat16_state_checkpoint_stores_the_bits_and_continues_bitwise(tmp_path):
    options = dict(momentum=0.9, centered=True, state_storage="bfloat16")
    p0, grads = problem(3000, np.float32)
    straight, first = fastrms.RMSprop(p0.copy(), 0.01, **options), fastrms.RMSprop(p0.copy(), 0.01, **options)
    for t in range(9):
        straight.step(grads[t % 4])
        first.step(grads[t % 4])
    first.save(tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        assert z["square_avg.0"].dtype == np.uint16 and str(z["state_storage"]) == "bfloat16"
        np.testing.assert_array_equal(z["grad_avg.0"], first.grad_avg.view(np.uint16))
    resumed = fastrms.RMSprop(first.params.copy(), 0.01, **options)
    resumed.load(tmp_path / "c.npz")
    for t in range(9, 20):
        straight.step(grads[t % 4])
        resumed.step(grads[t % 4])
    np.testing.assert_array_equal(straight.params, resumed.params)
    np.testing.assert_array_equal(straight.square_avg.view(np.uint16), resumed.square_avg.view(np.uint16))


@needs_ml_dtypes
def test_a_checkpoint_of_the_other_storage_or_with_bad_bits_is_refused(tmp_path):
    native = fastrms.RMSprop(np.ones(4, np.float32), 0.1)
    native.save(tmp_path / "native.npz")
    lean = fastrms.RMSprop(np.ones(4, np.float32), 0.1, state_storage="bfloat16")
    lean.step(np.full(4, 0.5, np.float32))
    before = snapshot(lean)
    with pytest.raises(ValueError, match=r"another variant: state_storage=native \(this optimizer: bfloat16\)"):
        lean.load(tmp_path / "native.npz")
    d = lean.state_dict()
    d["square_avg.0"] = np.full(4, 0x7FC0, np.uint16)  # the bits of a NaN
    with pytest.raises(ValueError, match="holds NaN values"):
        lean.load_state_dict(d)
    d["square_avg.0"] = np.full(4, 0xBF80, np.uint16)  # -1.0
    with pytest.raises(ValueError, match="holds negative values"):
        lean.load_state_dict(d)
    d["square_avg.0"] = np.ones(4, np.float32)
    with pytest.raises(ValueError, match=r"must be uint16 of shape \(4,\), got float32"):
        lean.load_state_dict(d)
    assert_unchanged(lean, before)
    with pytest.raises(ValueError, match="another variant: state_storage=bfloat16"):
        native.load_state_dict(lean.state_dict())


def test_an_8bit_state_checkpoint_stores_codes_and_scales_and_continues_bitwise(tmp_path):
    options = dict(momentum=0.9, centered=True, state_storage="8bit")
    p0, grads = problem(3000, np.float32)
    straight, first = fastrms.RMSprop(p0.copy(), 0.01, **options), fastrms.RMSprop(p0.copy(), 0.01, **options)
    for t in range(9):
        straight.step(grads[t % 4])
        first.step(grads[t % 4])
    first.save(tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        assert z["square_avg.0"].dtype == np.uint8 and z["square_avg.0"].shape == (12 * 260,)  # 12 blocks
        assert str(z["state_storage"]) == "8bit"
        codes, scales = storage.block_parts(z["grad_avg.0"], 3000)
        np.testing.assert_array_equal(storage.SIGNED8[codes] * np.repeat(scales, 256)[:3000], first.grad_avg)
    resumed = fastrms.RMSprop(first.params.copy(), 0.01, **options)
    resumed.load(tmp_path / "c.npz")
    for t in range(9, 20):
        straight.step(grads[t % 4])
        resumed.step(grads[t % 4])
    np.testing.assert_array_equal(straight.params, resumed.params)
    assert straight.state_dict()["square_avg.0"].tobytes() == resumed.state_dict()["square_avg.0"].tobytes()


def test_an_8bit_checkpoint_with_bad_scales_or_shapes_is_refused(tmp_path):
    lean = fastrms.RMSprop(np.ones(300, np.float32), 0.1, state_storage="8bit")
    lean.step(np.full(300, 0.5, np.float32))
    before = snapshot(lean)
    d = lean.state_dict()
    good = d["square_avg.0"]
    for scale in (np.nan, np.inf, -1.0):  # no run makes them: a scale is a largest finite magnitude
        d["square_avg.0"] = good.copy()
        d["square_avg.0"][256:260] = np.frombuffer(np.float32(scale).astype("<f4").tobytes(), np.uint8)
        with pytest.raises(ValueError, match="negative or non-finite block scale"):
            lean.load_state_dict(d)
    d["square_avg.0"] = np.ones(300, np.float32)
    with pytest.raises(ValueError, match=r"must be uint8 of shape \(520,\), got float32 of shape \(300,\)"):
        lean.load_state_dict(d)
    d["square_avg.0"] = good[:260]
    with pytest.raises(ValueError, match=r"must be uint8 of shape \(520,\)"):
        lean.load_state_dict(d)
    lean.save(tmp_path / "c.npz")
    native = fastrms.RMSprop(np.ones(300, np.float32), 0.1)
    with pytest.raises(ValueError, match="another variant: state_storage=8bit"):
        native.load(tmp_path / "c.npz")
    assert_unchanged(lean, before)


def test_a_rowwise_checkpoint_stores_a_value_a_row_and_continues_bitwise(tmp_path):
    options = dict(momentum=0.9, state_layout="rowwise", dense_rows=True)
    p0, grads = problem(None, np.float32, shape=(300, 8))
    straight, first = fastrms.RMSprop(p0.copy(), 0.01, **options), fastrms.RMSprop(p0.copy(), 0.01, **options)
    for t in range(9):
        for opt in (straight, first):
            opt.step_rows(np.array([t, 2 * t, 5]), grads[t % 4][:3]) if t % 3 else opt.step(grads[t % 4])
    first.save(tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        assert z["square_avg.0"].shape == (300,) and z["momentum_buffer.0"].shape == (300, 8)
        assert str(z["state_layout"]) == "rowwise"
    resumed = fastrms.RMSprop(first.params.copy(), 0.01, **options)
    resumed.load(tmp_path / "c.npz")
    for t in range(9, 15):
        for opt in (straight, resumed):
            opt.step_rows(np.array([t, 7]), grads[t % 4][:2]) if t % 2 else opt.step(grads[t % 4])
    np.testing.assert_array_equal(straight.params, resumed.params)
    np.testing.assert_array_equal(straight.square_avg, resumed.square_avg)
    elementwise = fastrms.RMSprop(p0.copy(), 0.01, momentum=0.9, dense_rows=True)
    before = snapshot(elementwise)
    with pytest.raises(ValueError, match="another variant: state_layout=rowwise"):
        elementwise.load(tmp_path / "c.npz")
    assert_unchanged(elementwise, before)


def _storages():
    return [pytest.param(s, marks=needs_ml_dtypes) if s == "bfloat16" else s for s in ("native", "bfloat16", "8bit")]


@pytest.mark.parametrize("storage", _storages())
def test_a_grad_whose_square_overflows_saves_loads_and_its_neighbours_keep_training(storage, tmp_path):
    """One finite grad beyond 2^64 makes its element's v overflow to inf: the run's own
    checkpoint must load back, and the 8-bit block's other 255 values must keep moving."""
    options = dict(MAIN["nesterov"], state_storage=storage)
    g = np.full(600, 0.1, np.float32)
    g[3] = 2e19
    straight, first = (fastrms.RMSprop(np.zeros(600, np.float32), 0.01, **options) for _ in range(2))
    for opt in (straight, first):
        opt.step(g)
    first.save(tmp_path / "c.npz")
    resumed = fastrms.RMSprop(first.params.copy(), 0.01, **options)
    resumed.load(tmp_path / "c.npz")
    before = straight.params.copy()
    for opt in (straight, resumed):
        for _ in range(3):
            opt.step(np.full(600, 0.1, np.float32))
    assert straight.params.tobytes() == resumed.params.tobytes()
    moved = straight.params != before
    assert moved[np.arange(600) != 3].all()  # native: the overflowed element stays (its v is inf)
    assert np.isfinite(straight.params).all()


def test_save_refuses_nan_state_and_writes_nothing(tmp_path):
    opt = fastrms.RMSprop(np.zeros(4, np.float32), 0.01, momentum=0.9)
    g = np.ones(4, np.float32)
    g[1] = np.nan
    opt.step(g)  # without skip_nonfinite the NaN reaches the state
    with pytest.raises(ValueError, match=r"not saved: state_dict\['square_avg.0'\] holds NaN.*skip_nonfinite"):
        opt.save(tmp_path / "c.npz")
    assert not list(tmp_path.iterdir())


def test_an_8bit_checkpoint_with_a_negative_scale_on_signed_blocks_is_refused():
    lean = fastrms.RMSprop(np.ones(300, np.float32), 0.1, state_storage="8bit", momentum=0.9)
    lean.step(np.full(300, 0.5, np.float32))
    before = snapshot(lean)
    d = lean.state_dict()
    d["momentum_buffer.0"] = d["momentum_buffer.0"].copy()
    d["momentum_buffer.0"][256:260] = np.frombuffer(np.float32(-0.5).astype("<f4").tobytes(), np.uint8)
    with pytest.raises(ValueError, match=r"momentum_buffer.0'\] holds a negative or non-finite block scale"):
        lean.load_state_dict(d)
    assert_unchanged(lean, before)
