"""fastrms.bench.precision: the state storages' steps and limits it times."""

import numpy as np
import pytest

import fastrms
from fastrms import cli
from fastrms.bench import precision
from fastrms.kernels import storage

pytest.importorskip("ml_dtypes", reason="ml_dtypes is not installed (pip install ml_dtypes)")


def test_the_bfloat16_bespoke_loop_is_the_optimizers_step_bit_for_bit():
    rng = np.random.default_rng(2)
    p = rng.standard_normal(1031).astype(np.float32)
    mine, v = p.copy(), np.zeros(p.size, np.uint16)
    opt = fastrms.RMSprop(p, state_storage="bfloat16")  # the bench's hyperparameters: the defaults
    for _ in range(4):
        g = rng.standard_normal(p.size).astype(np.float32)
        opt.step(g)
        precision.bespoke_bf16(mine, g, v)
    np.testing.assert_array_equal(opt.params, mine)
    np.testing.assert_array_equal(opt.square_avg.view(np.uint16), v)


def test_the_copy_bespoke_loop_is_the_optimizers_step_with_copy_to_bit_for_bit():
    import ml_dtypes

    rng = np.random.default_rng(3)
    p = rng.standard_normal(1031).astype(np.float32)
    mine, v, c = p.copy(), np.zeros(p.size, np.float32), np.zeros(p.size, np.uint16)
    copy = np.zeros(p.size, ml_dtypes.bfloat16)
    opt = fastrms.RMSprop(p, copy_to=copy)
    for _ in range(4):
        g = rng.standard_normal(p.size).astype(np.float32)
        opt.step(g)
        precision.bespoke_copy(mine, g, v, c)
    np.testing.assert_array_equal(opt.params, mine)
    np.testing.assert_array_equal(copy.view(np.uint16), c)


@pytest.mark.parametrize("mode", ["bf16 master", "f16 master"])
def test_the_master_bespoke_loops_are_the_optimizers_16_bit_step_bit_for_bit(mode):
    rng = np.random.default_rng(4)
    p = rng.standard_normal(1031).astype(np.float32)
    low = precision._low_like(p, mode)
    mine, v, c = p.copy(), np.zeros(p.size, np.float32), np.zeros(p.size, np.uint16)
    opt = fastrms.RMSprop(p, copy_to=low)
    for _ in range(4):
        g = rng.standard_normal(p.size).astype(low.dtype)
        opt.step(g)
        precision.bespoke_master(mine, g.view(np.uint16), v, c, mode)
    np.testing.assert_array_equal(opt.params, mine)
    np.testing.assert_array_equal(low.view(np.uint16), c)


def test_each_mode_is_timed_with_its_limit_and_summarized():
    rows = precision.measure(sizes=(2000,), rounds=1, target=0.001)
    timed = {(m, w) for m in precision.MODES for w in ("fastrms", "traffic", "bespoke")}
    assert set(rows[0]["seconds"]) - {("8bit", "bitsandbytes")} == timed  # bitsandbytes: where installed
    assert all(t > 0 for t in rows[0]["seconds"].values())
    summary = precision.summarize(rows[0])
    assert summary["native"]["x_native"] == 1.0
    assert (summary["bfloat16"]["bytes_per_param_step"], summary["bfloat16"]["state_bytes_per_param"]) == (16, 2)
    assert summary["bf16 copy"]["bytes_per_param_step"] == 22
    assert summary["8bit"]["state_bytes_per_param"] == 260 / 256 <= 0.27 * 4  # the target: <= 0.27x of float32
    assert summary["bf16 master"]["bytes_per_param_step"] == summary["f16 master"]["bytes_per_param_step"] == 20


def test_bench_precision_prints_a_row_per_mode_and_size(capsys):
    assert cli.main(["bench", "--precision", "--sizes", "1000", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16" in out and "native" in out and "% limit" in out and "16, 2" in out and "f16 master" in out
    assert "8bit" in out and "14.03, 1.016" in out


def test_the_8bit_bespoke_loop_is_the_optimizers_step_bit_for_bit():
    rng = np.random.default_rng(5)
    p = rng.standard_normal(1031).astype(np.float32)
    mine, v = p.copy(), np.zeros(5 * 260, np.uint8)
    opt = fastrms.RMSprop(p, state_storage="8bit")  # the bench's hyperparameters: the defaults
    for _ in range(4):
        g = (rng.standard_normal(p.size) * np.exp(rng.uniform(-8, 2, p.size))).astype(np.float32)
        opt.step(g)
        precision.bespoke_8bit(mine, g, v)
    np.testing.assert_array_equal(opt.params, mine)
    kept = opt.state_dict()["square_avg.0"]
    assert all(
        a.tobytes() == b.tobytes() for a, b in zip(storage.block_parts(kept, 1031), storage.block_parts(v, 1031))
    )
