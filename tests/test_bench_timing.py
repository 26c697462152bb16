"""fastrms.bench.timing: interleaved medians, the serial/parallel crossover, the machine."""

import numpy as np
import pytest

from fastrms.bench import peers, timing


def test_measure_returns_a_positive_median_for_each_available_implementation():
    res = timing.measure(peers.Problem(1000, np.float32), ["fastrms", "numpy_seed", "traffic"], rounds=3, target=0.002)
    assert set(res) == {"fastrms", "numpy_seed", "traffic"} and all(v > 0 for v in res.values())


def test_machine_names_cpu_and_versions():
    info = timing.machine()
    assert {"cpu", "cores", "threads", "numpy", "numba", "python"} <= info.keys()


def test_crossover_times_both_drivers_on_the_same_arrays():
    rows, first = timing.crossover({}, "float32", sizes=(1024, 4096), rounds=1)
    assert [r[0] for r in rows] == [1024, 4096] and [r[1] for r in rows] == [20480, 81920]
    assert all(s > 0 and p > 0 for _, _, s, p in rows)
    assert first == next((n for n, _, s, p in rows if p < s), None)


def test_many_arrays_times_each_layout_against_one_array():
    times = timing.many_arrays("float32", total=20_000, rounds=1, target=0.001)
    assert set(times) == {
        "one array",
        "200 arrays, mixed sizes",
        "200 arrays, mixed sizes, packed",
        "1000 arrays, equal",
        "1000 arrays, equal, packed",
    }
    assert all(t > 0 for t in times.values())


def test_clipped_times_every_clip_case_and_the_read_pass():
    rows = timing.clipped("float64", sizes=(5000,), variants=["plain"], rounds=1, target=0.001)
    assert [(r["variant"], r["size"]) for r in rows] == [("plain", 5000)]
    assert set(rows[0]) == {"variant", "size", "read pass", *timing.CLIP_CASES}
    assert all(rows[0][k] > 0 for k in (*timing.CLIP_CASES, "read pass"))


@pytest.mark.slow
def test_torch_steps_times_each_optimizer_and_a_training_step():
    pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")
    r = timing.torch_steps(layers=2, width=8, rounds=1, target=0.001)
    assert r["tensors"] == 4 and r["params"] == 2 * (8 * 8 + 8)
    compiled = "torch.compile(torch.optim.RMSprop.step)"
    assert set(r["train"]) == {
        "fastrms.torch.RMSprop",
        "fastrms.torch.RMSprop(flatten=True)",
        "torch.optim.RMSprop",
        "torch.optim.RMSprop(foreach=True)",
        compiled,
    }
    assert set(r["compile"]) == {compiled} and r["compile"][compiled] > 0
    assert set(r["step"]) == set(r["train"]) | {"fastrms.RMSprop, one flat array", "limit: the same bytes, no math"}
    assert all(t > 0 for t in [*r["step"].values(), *r["train"].values()])


def test_torch_tensors_times_the_per_tensor_step_beside_the_numpy_front_ends():
    pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")
    r = timing.torch_tensors(k=3, n=5, rounds=1, target=0.001)
    assert set(r) == {
        "fastrms.torch.RMSprop, per tensor",
        "torch.optim.RMSprop(foreach=True)",
        "fastrms.RMSprop, a list of arrays",
        "fastrms.RMSprop, one array",
    }
    assert all(t > 0 for t in r.values())


def test_torch_dtensors_times_both_optimizers_on_a_mesh_of_one_and_tears_it_down():
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")
    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    r = timing.torch_dtensors(k=2, shape=(5, 3), rounds=1, target=0.001)
    assert set(r) == {"fastrms.torch.RMSprop", "torch.optim.RMSprop"} and all(t > 0 for t in r.values())
    assert not torch.distributed.is_initialized()


def test_torch_embedding_times_the_sparse_and_the_dense_steps_of_a_table():
    pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")
    r = timing.torch_embedding(n=50, width=4, k=8, rounds=1, target=0.001)
    assert list(r) == [
        "fastrms.torch, sparse grad, lazy",
        "fastrms.torch, sparse grad, dense_rows",
        "fastrms.torch, dense grad",
        "torch.optim.RMSprop, dense grad",
    ]
    assert all(t > 0 for t in r.values())


def test_dask_step_times_the_fused_map_the_expressions_and_one_process():
    pytest.importorskip("distributed", reason="dask is not installed (pip install 'dask[array]' distributed zarr)")
    r = timing.dask_step(total=40_000, chunk=10_000, rounds=1)
    assert r["tasks"] == 4
    cases = ("fastrms.dask, fused map", "fastrms.dask, fused map, donate=True", "dask.array NumPy expressions",
             "fastrms.RMSprop, one process")  # fmt: skip
    assert all(r[k] > 0 for k in (*cases, "out-of-place fused step, one process"))
    assert all(r[f"kernel, {k}"] > 0 and 0 < r[f"busy, {k}"] <= 1 for k in cases[:2])


def test_fixed_cost_times_the_step_against_the_raw_kernel_call_per_size():
    times = timing.fixed_cost(sizes=(16, 64), rounds=1, target=0.001)
    assert list(times) == [16, 64]
    for cases in times.values():
        assert set(cases) == {"RMSprop.step", "kernels.rmsprop_update"}
        assert all(0 < s < 1 for s in cases.values())
