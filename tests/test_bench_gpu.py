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
    assert "fastrms 8-bit state, 20 tensors" in rows
    assert "fastrms float16 params over float32 masters, 20 tensors" in rows


def test_cuda_steps_run_end_to_end_on_the_simulator():
    """Every case `fastrms bench --cuda` times runs (the simulator cannot time them: this
    checks that a GPU machine's first run does not fail on the bench's own code)."""
    import json
    import os

    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (pip install 'fastrms[cuda]')")
    code = (
        "import json; from fastrms.bench import gpu\n"
        "rows = gpu.cuda_steps(n=2048, k=3, total=3000, rounds=1, target=1e-4)\n"
        "print(json.dumps({case: row['GB/s'] for case, row in rows.items()}))"
    )
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"fastrms, one array of 2048", "same traffic, one array of 2048", "fastrms, 3 tensors",
            "fastrms 8-bit state, 3 tensors",
            "fastrms float16 params over float32 masters, 3 tensors"} <= set(rows)  # fmt: skip
    assert all(rate > 0 for rate in rows.values())
