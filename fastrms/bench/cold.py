"""Cold starts, in fresh processes: what a new Python process pays before its first step.

Every case runs in its own `python -c` process, `rounds` times (medians reported), with
a cache folder of its own (`NUMBA_CACHE_DIR`) warmed once first, so that the runs measure
loading from the disk cache; the first-ever compiles are timed in processes with an empty
cache folder. The baselines come from the same run:

- `import numba, numpy`: the wall time of a process that only imports them;
- *Numba's floor*: that import plus the first call of a one-line `@njit(cache=True)`
  function loaded from the cache. Numba loads its typing and lowering registries on the
  first call of any compiled function, cached or not; no Numba package starts below it.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

_CLOCK = "import time; _t0 = time.perf_counter()\n"
_REPORT = "\nimport json; print(json.dumps({'inside': time.perf_counter() - _t0, **globals().get('_parts', {})}))\n"

#: name -> script; each script may leave `_parts` (seconds of a phase, measured inside).
CASES = {
    "import numba, numpy": "import numba, numpy",
    "Numba's floor: import + one cached @njit call": (
        "import numpy as np\nfrom numba import njit\n"
        "from fastrms_cold_probe import bump\n"
        "_a = time.perf_counter(); bump(np.zeros(2)); _parts = {'first call': time.perf_counter() - _a}"
    ),
    "import fastrms + first dense step": (
        "import numpy as np\nimport fastrms\n_a = time.perf_counter()\n"
        "w = np.zeros(1000, np.float32); fastrms.RMSprop(w, 1e-3).step(np.ones_like(w))\n"
        "_parts = {'first step': time.perf_counter() - _a}"
    ),
    "first step_rows": (
        "import numpy as np\nimport fastrms\n_a = time.perf_counter()\n"
        "t = np.zeros((1000, 64), np.float32)\n"
        "fastrms.RMSprop(t, 1e-3).step_rows(np.array([3, 9, 3]), np.ones((3, 64), np.float32))\n"
        "_parts = {'first step': time.perf_counter() - _a}"
    ),
    "first fastrms.torch step": (
        "import torch\nimport fastrms.torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 1))\n"
        "m(torch.ones(8, 64)).sum().backward()\n_a = time.perf_counter()\n"
        "o = fastrms.torch.RMSprop(m.parameters(), lr=0.01); _b = time.perf_counter(); o.step()\n"
        "_parts = {'construction': _b - _a, 'first step': time.perf_counter() - _b}"
    ),
    "torch.optim.RMSprop, the same (no fastrms)": (
        "import torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 1))\n"
        "m(torch.ones(8, 64)).sum().backward()\n_a = time.perf_counter()\n"
        "o = torch.optim.RMSprop(m.parameters(), lr=0.01); _b = time.perf_counter(); o.step()\n"
        "_parts = {'construction': _b - _a, 'first step': time.perf_counter() - _b}"
    ),
}

#: shell -> a script that makes its first call (the plain float32 variant).
SHELLS = {
    "dense, serial": "w = np.zeros(1000, np.float32); fastrms.RMSprop(w, 1e-3).step(np.ones_like(w))",
    "dense, parallel": "w = np.zeros(1 << 20, np.float32); fastrms.RMSprop(w, 1e-3).step(np.ones_like(w))",
    "chunk table (many arrays)": (
        "ws = [np.zeros(100, np.float32) for _ in range(3)]\n"
        "fastrms.RMSprop(ws, 1e-3).step([np.ones_like(x) for x in ws])"
    ),
    "dense, out of place (the pure step)": (
        "fastrms.functional.rmsprop_step(np.zeros(10, np.float32), np.ones(10, np.float32), None, 1, 1e-3)"
    ),
    "rows (step_rows)": (
        "t = np.zeros((100, 8), np.float32)\n"
        "fastrms.RMSprop(t, 1e-3).step_rows(np.array([1, 5, 5]), np.ones((3, 8), np.float32))"
    ),
    "clipped (sum of squares + dense)": (
        "w = np.zeros(1000, np.float32); fastrms.RMSprop(w, 1e-3, clip_global_norm=1.0).step(np.ones_like(w))"
    ),
}

_PROBE = "from numba import njit\n\n\n@njit(cache=True)\ndef bump(a):\n    a[0] += 1.0\n"


def _run(script, env):
    out = subprocess.run(
        [sys.executable, "-c", _CLOCK + script + _REPORT], env=env, capture_output=True, text=True, timeout=900
    )
    if out.returncode != 0:
        raise RuntimeError(f"a cold-start process failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _timed(script, env):
    """`(wall seconds of the whole process, what it measured inside)`."""
    import time

    start = time.perf_counter()
    inside = _run(script, env)
    return time.perf_counter() - start, inside


def measure(rounds=5, torch=None, shells=True):
    """Median wall times of each case in fresh processes (cache warm), and the first-ever
    compile of each shell (cache empty, one process each)."""
    import importlib.util

    torch = importlib.util.find_spec("torch") is not None if torch is None else torch
    cases = {k: v for k, v in CASES.items() if torch or "torch" not in k}
    with tempfile.TemporaryDirectory(prefix="fastrms-cold-") as tmp:
        with open(os.path.join(tmp, "fastrms_cold_probe.py"), "w") as f:
            f.write(_PROBE)
        env = dict(
            os.environ,
            NUMBA_CACHE_DIR=os.path.join(tmp, "warm"),
            PYTHONPATH=os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        )
        for script in cases.values():  # warm the cache
            _run(script, env)
        samples = {name: [] for name in cases}
        for _ in range(rounds):  # interleaved: drift on a shared machine hits every case alike
            for name, script in cases.items():
                samples[name].append(_timed(script, env))
        result = {
            name: {
                "wall": statistics.median(w for w, _ in runs),
                **{k: statistics.median(i[k] for _, i in runs) for k in runs[0][1] if k != "inside"},
            }
            for name, runs in samples.items()
        }
        compiles = {}
        if shells:
            for i, (name, code) in enumerate(SHELLS.items()):
                cold = dict(env, NUMBA_CACHE_DIR=os.path.join(tmp, f"empty-{i}"))
                script = "import numpy as np\nimport fastrms\n_a = time.perf_counter()\n" + code
                script += "\n_parts = {'first call': time.perf_counter() - _a}"
                compiles[name] = _run(script, cold)["first call"]
    return {"rounds": rounds, "cases": result, "first compile": compiles}


def report(r, file=sys.stdout):
    """Print `measure`'s result with the ratios the cold-start targets use."""
    from .. import __version__

    cases = r["cases"]
    base = cases["import numba, numpy"]["wall"]
    floor = cases["Numba's floor: import + one cached @njit call"]
    rounds = r["rounds"]
    print(f"fastrms {__version__}, cold starts in fresh processes, warm disk cache, medians of {rounds}:", file=file)
    for name, c in cases.items():
        phase = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in c.items() if k != "wall")
        phase = f"  ({phase})" if phase else ""
        print(f"  {name:46s} {c['wall'] * 1e3:7.0f} ms  {c['wall'] / base:5.2f}x import numba, numpy{phase}", file=file)
    print(
        f"  Numba's own first call of a cached function costs {floor['first call'] * 1e3:.0f} ms (its registries):"
        f" the floor of any Numba package is {floor['wall'] / base:.2f}x import numba, numpy",
        file=file,
    )
    if r["first compile"]:
        print("first-ever compile of each shell (empty cache, plain float32, a new process's first call):", file=file)
        for name, seconds in r["first compile"].items():
            print(f"  {name:46s} {seconds:7.2f} s", file=file)
