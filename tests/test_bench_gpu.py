"""`fastrms bench --cuda` (`fastrms.bench.gpu`): refused in one line without a GPU; on a
machine with one, the step against the same-traffic kernel and torch."""

import subprocess
import sys

import pytest

from fastrms.backend import cuda_target

GPU = cuda_target()["available"] and "simulator" not in (cuda_target()["device"] or "")


@pytest.mark.skipif(GPU, reason="a CUDA GPU is present: the bench runs instead of refusing")
@pytest.mark.parametrize("simulated", ["0", "1"])
def test_bench_cuda_without_a_gpu_is_one_line_on_stderr_and_exit_2(simulated):
    import os

    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": simulated}
    out = subprocess.run([sys.executable, "-m", "fastrms", "bench", "--cuda"], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastrms: error: fastrms bench --cuda needs a CUDA GPU: ")


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (numba-cuda finds none here)")
def test_cuda_steps_time_fastrms_against_the_same_traffic_kernel_on_the_device():
    from fastrms.bench import gpu

    rows = gpu.cuda_steps(n=1 << 20, k=20, total=1 << 20, rounds=1, target=0.001)
    assert f"fastrms, one array of {1 << 20}" in rows and f"same traffic, one array of {1 << 20}" in rows
    assert "fastrms, 20 tensors" in rows
    assert all(row["seconds"] > 0 for row in rows.values())
    assert all(row["GB/s"] is None or row["GB/s"] > 0 for row in rows.values())
