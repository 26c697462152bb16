"""fastrms.core.runtime: threads and processes never crash the host, whatever the threading layer."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastrms
from fastrms.core import runtime

SCRIPT = textwrap.dedent(
    """
    import multiprocessing as mp
    import sys
    import threading

    import numpy as np

    import fastrms

    N = 200_000  # 200k float32, centered + momentum: 7 MB moved a step, the parallel driver


    def run(seed, steps=10):
        rng = np.random.default_rng(seed)
        p = rng.standard_normal(N).astype(np.float32)
        g = rng.standard_normal(N).astype(np.float32)
        opt = fastrms.RMSprop(p, 0.01, momentum=0.9, centered=True, skip_nonfinite=True)
        assert opt.parallel == [fastrms.info()["parallel_mode"] != "serial"]
        for _ in range(steps):
            opt.step(g)
        return p


    def child(seed, conn):
        conn.send_bytes(run(seed).tobytes())
        conn.close()


    if __name__ == "__main__":
        mode = sys.argv[1]
        if mode == "threads":
            sequential = [run(i) for i in range(8)]
            results = [None] * 8
            barrier = threading.Barrier(8)

            def worker(i):
                barrier.wait()
                results[i] = run(i)

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert all(np.array_equal(a, b) for a, b in zip(sequential, results)), "threads differ"
        else:
            parent = run(0)  # the parent runs parallel code before it forks
            ctx = mp.get_context(mode)
            for seed, want in ((0, parent), (1, run(1))):
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=child, args=(seed, send))
                proc.start()
                send.close()
                got = np.frombuffer(recv.recv_bytes(), dtype=np.float32)
                proc.join(120)
                assert proc.exitcode == 0, f"child exit code {proc.exitcode}"
                assert np.array_equal(got, want), "child result differs"
        info = fastrms.info()
        print("ok", info["threading_layer"], info["parallel_mode"])
    """
)


def _layers():
    layers = ["omp", "workqueue"]
    try:
        runtime._load_tbb()
        from numba.np.ufunc import tbbpool  # noqa: F401

        layers.insert(0, "tbb")
    except ImportError:
        pass
    return layers


@pytest.mark.parametrize("scenario", ["threads", "fork", "spawn"])
@pytest.mark.parametrize("layer", [None, *_layers()], ids=lambda x: x or "default")
def test_threads_and_processes_under_every_layer(layer, scenario, tmp_path):
    script = tmp_path / "scenario.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    if layer:
        env["NUMBA_THREADING_LAYER"] = layer
    out = subprocess.run([sys.executable, str(script), scenario], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    words = out.stdout.split()
    assert words[0] == "ok"
    if layer:
        assert words[1] == layer
    assert words[2] == ("serialized" if words[1] == "workqueue" else "free")


def test_the_default_layer_is_tbb_when_tbb_is_installed():
    if "tbb" not in _layers():
        pytest.skip("the tbb package is not installed here (it is in the dev extra)")
    out = subprocess.run(
        [sys.executable, "-c", "import fastrms; i = fastrms.info(); print(i['threading_layer'], '|', i['reason'])"],
        env={k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"},
        capture_output=True,
        text=True,
        check=True,
    )
    layer, reason = out.stdout.strip().split(" | ")
    assert layer == "tbb" and "TBB" in reason


def test_a_users_layer_is_respected_and_reported():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import fastrms; i = fastrms.info(); print(i['threading_layer'], i['user_threading_layer'])",
        ],
        env=dict(os.environ, NUMBA_THREADING_LAYER="workqueue"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["workqueue", "workqueue"]


def test_a_forked_child_after_omp_moves_every_optimizer_to_serial_kernels(monkeypatch):
    opt = fastrms.RMSprop(np.zeros(1_000_000, np.float32))
    assert opt.parallel == [runtime.parallel_mode() != "serial"]
    monkeypatch.setattr(runtime, "active_layer", lambda: "omp")
    monkeypatch.setitem(runtime._STATE, "forked_after_omp", False)
    monkeypatch.setattr(runtime, "_GENERATION", runtime.generation())
    runtime._after_fork_in_child()  # what os.register_at_fork runs in the child
    assert runtime.parallel_mode() == "serial"
    assert opt.parallel == [False]  # chosen again at its next step: the generation changed
    assert fastrms.RMSprop(np.zeros(1_000_000)).parallel == [False]
    opt.step(np.ones(1_000_000, np.float32))
    assert opt.step_count == 1 and np.all(opt.params < 0)
    monkeypatch.setitem(runtime._STATE, "forked_after_omp", False)


def test_serialized_kernels_run_one_at_a_time():
    import threading
    import time

    inside, worst = [0], [0]

    def kernel(x):
        inside[0] += 1
        worst[0] = max(worst[0], inside[0])
        time.sleep(0.002)
        inside[0] -= 1
        return x

    wrapped = runtime.serialized(kernel)
    threads = [threading.Thread(target=lambda: [wrapped(1) for _ in range(5)]) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert worst[0] == 1 and wrapped.kernel is kernel


def test_info_reports_layer_threads_and_why(capsys):
    i = fastrms.info()
    assert i["threading_layer"] in ("tbb", "omp", "workqueue")
    assert i["num_threads"] >= 1 and i["reason"] and i["cache"]
    from fastrms import cli

    assert cli.main(["info"]) == 0
    assert "threading_layer" in capsys.readouterr().out


CACHE_SCRIPT = (
    "import numpy as np, fastrms; o = fastrms.RMSprop(np.zeros(10)); o.step(np.ones(10));"
    " print(o.params[0], fastrms.kernels.CACHE_STATUS)"
)


def test_an_unwritable_numba_cache_dir_still_works_and_is_not_overridden(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(blocker / "cache"))
    out = subprocess.run(
        [sys.executable, "-c", CACHE_SCRIPT + "; import os; print(os.environ['NUMBA_CACHE_DIR'])"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    assert float(lines[0].split()[0]) < 0  # the step ran: 0 - lr * 1 / (sqrt(0.1) + eps)
    assert lines[1] == str(blocker / "cache")


def test_a_read_only_install_with_no_cache_location_compiles_in_memory(tmp_path):
    """No writable __pycache__ next to the package and no writable user cache: Numba refuses
    cache=True outright; fastrms then compiles without the cache instead of failing."""
    import shutil

    pkg = tmp_path / "site" / "fastrms"
    shutil.copytree(os.path.dirname(fastrms.__file__), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for folder in [pkg, *(d for d in pkg.rglob("*") if d.is_dir())]:  # every package of it
        (folder / "__pycache__").write_text("a file where the cache folder would go")
    blocker = tmp_path / "home"
    blocker.write_text("not a folder")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(
        HOME=str(blocker),
        XDG_CACHE_HOME=str(blocker / "cache"),
        PYTHONPATH=str(pkg.parent),
        PYTHONDONTWRITEBYTECODE="1",
    )
    out = subprocess.run(
        [sys.executable, "-c", CACHE_SCRIPT], env=env, capture_output=True, text=True, cwd=str(tmp_path)
    )
    assert out.returncode == 0, out.stderr[-2000:]
    value, status = out.stdout.split(maxsplit=1)
    assert status.startswith("off: cannot cache")
    assert float(value) < 0


def test_if_numba_cannot_start_tbb_the_default_layer_is_used_instead():
    if "tbb" not in _layers():
        pytest.skip("the tbb package is not installed here (it is in the dev extra)")
    code = textwrap.dedent(
        """
        import numba.np.ufunc.parallel as parallel

        def too_old():
            raise ImportError("simulated: TBB too old for this Numba")

        parallel._check_tbb_version_compatible = too_old
        import numpy as np
        import fastrms

        opt = fastrms.RMSprop(np.zeros(1_000_000, np.float32))
        opt.step(np.ones(1_000_000, np.float32))
        i = fastrms.info()
        print(i["threading_layer"], "|", i["reason"], "|", opt.params[0])
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    layer, reason, value = out.stdout.strip().split(" | ")
    assert layer in ("omp", "workqueue") and "could not start" in reason and float(value) < 0


_UNSTARTABLE = """
import sys
sys.modules["numba.np.ufunc.tbbpool"] = None  # TBB's library cannot be loaded in this process
import numpy as np
import fastrms
p = np.linspace(-1, 1, 1_000_000).astype(np.float32)
before = p.tobytes()
try:
    opt = fastrms.RMSprop(p, 0.01)  # large: the parallel driver, so the layer must start
    opt.step(np.ones_like(p))
except RuntimeError as exc:
    assert p.tobytes() == before
    print(exc)
else:
    print("no error")
"""


def test_a_chosen_layer_that_cannot_start_says_which_what_was_tried_and_the_fix():
    env = dict(os.environ, NUMBA_THREADING_LAYER="tbb")
    out = subprocess.run([sys.executable, "-c", _UNSTARTABLE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    message = out.stdout.strip()
    assert "'tbb'" in message and "NUMBA_THREADING_LAYER" in message
    assert "pip install" in message and "conda" not in message
    assert "libtbb" in message or "Numba still could not start TBB" in message
