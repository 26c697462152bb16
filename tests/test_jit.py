"""fastrms.kernels._jit: the kernels' disk cache hits in every new process, follows every change
to the source it compiles, and stays bounded. Each test runs fresh Python processes."""

import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

import fastrms
from fastrms import kernels, reference

HAS_TORCH = importlib.util.find_spec("torch") is not None

#: One of every kind of entry, each variant kind once: dense serial and parallel, a chunk
#: table, the pure step, rows (lazy, merged and dense-equivalent), clipped with skip, user
#: code's rmsprop_update, and fastrms.torch when torch is there. Prints the cache statistics.
ENTRIES = """
import json, sys
import numpy as np
import fastrms
from fastrms import kernels

for opts in ({}, {"momentum": 0.9, "centered": True}, {"weight_decay": 0.1, "momentum": 0.9, "nesterov": True}):
    for n in (1000, 1 << 18):
        w = np.zeros(n, np.float32)
        fastrms.RMSprop(w, 1e-3, **opts).step(np.ones_like(w))
    ws = [np.zeros(300) for _ in range(5)]
    fastrms.RMSprop(ws, 1e-3, **opts).step([np.ones_like(x) for x in ws])
    fastrms.functional.rmsprop_step(np.zeros(10), np.ones(10), None, 1, 1e-3, **opts)
    t = np.zeros((100, 8), np.float32)
    fastrms.RMSprop(t, 1e-3, **opts).step_rows(np.array([1, 5, 5]), np.ones((3, 8), np.float32))
    clipped = fastrms.RMSprop(t, 1e-3, clip_global_norm=1.0, skip_nonfinite=True, **opts)
    clipped.step(np.ones_like(t))
    clipped.step_rows(np.array([1, 5, 5]), np.ones((3, 8), np.float32))
    if "weight_decay" not in opts:
        exact = fastrms.RMSprop(t, 1e-3, dense_rows=True, **opts)
        exact.step_rows(np.array([1, 5]), np.ones((2, 8), np.float32))
        exact.step_rows(np.array([3]), np.ones((1, 8), np.float32))
kernels.rmsprop_update(np.zeros(16), np.ones(16), np.zeros(16), 0.1, 0.9, 1e-8)
for shapes in ([(1000,)], [(300,), (40,)]):  # float16 grads and copies: the 16-bit codecs' shells
    ws = [np.zeros(s, np.float32) for s in shapes]
    fastrms.RMSprop(ws, 1e-3, copy_to=[np.zeros(s, np.float16) for s in shapes], clip_global_norm=1.0,
                    skip_nonfinite=True).step([np.ones(s, np.float16) for s in shapes])
for shapes in ([(1 << 18,)], [(300,), (40,)]):  # 8-bit state: the blockwise shells, dense and in a table
    ws = [np.zeros(s, np.float32) for s in shapes]
    fastrms.RMSprop(ws, 1e-3, momentum=0.9, state_storage="8bit").step([np.ones(s, np.float32) for s in shapes])
rw = fastrms.RMSprop([np.zeros((300, 8), np.float32)], 1e-3, momentum=0.9, state_layout="rowwise")  # rowwise rows
rw.step([np.ones((300, 8), np.float32)])
rw.step_rows(np.array([1, 5, 5]), np.ones((3, 8), np.float32), param=0)
if "torch" in sys.argv:
    import torch
    import fastrms.torch as ft

    m = torch.nn.Linear(4, 3)
    for flatten in (False, True):
        o = ft.RMSprop(m.parameters(), lr=0.01, momentum=0.9, flatten=flatten)
        m(torch.ones(2, 4)).sum().backward()
        o.step()
    low = torch.nn.Linear(4, 3).to(torch.bfloat16)  # a bfloat16 model: over masters, and rounded stochastically
    for rounding in (False, True):
        o = ft.RMSprop(low.parameters(), lr=0.01, stochastic_rounding=rounding)
        low(torch.ones(2, 4, dtype=torch.bfloat16)).float().sum().backward()
        o.step()
print(json.dumps(kernels.cache_stats()))
"""


def _run(script, *args, env=None, cwd=None):
    out = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cache_files(folder):
    return sorted(p.name for p in Path(folder).rglob("*") if p.suffix in (".nbi", ".nbc"))


@pytest.mark.slow
def test_a_second_process_loads_every_kernel_from_the_disk_cache():
    """Numba's own key pickles a closure's cells, and a cell holding a dispatcher pickles
    differently in each process: every loop shell missed in every new process. (The
    environment's cache location is used, so what this test session compiled is reused.)"""
    args = ("torch",) if HAS_TORCH else ()
    _run(ENTRIES, *args)  # warm up: compiles or loads
    second = _run(ENTRIES, *args)
    assert second["misses"] == 0 and second["compiled"] == [], second
    assert second["hits"] >= 20, second  # the entries really went through cached kernels


def _copy_package(tmp_path):
    root = tmp_path / "src"
    shutil.copytree(Path(fastrms.__file__).parent, root / "fastrms", ignore=shutil.ignore_patterns("__pycache__"))
    # No .pyc files: CPython itself trusts a .pyc whose source kept its size and mtime, which
    # would hide what this tests (Numba's cache) behind a stale module.
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    return root / "fastrms", env


#: The plain step through every public entry, from w = 0 and g = 1: the moved params, in order.
PUBLIC_ENTRIES = """
import json
import numpy as np
import fastrms
from fastrms import kernels

assert fastrms.__file__.startswith(%r), fastrms.__file__
out = []
w = np.zeros(8, np.float32); fastrms.RMSprop(w, 1e-3).step(np.ones_like(w)); out.append(float(w[0]))
w = np.zeros(8); kernels.rmsprop_update(w, np.ones(8), np.zeros(8), 1e-3, 0.9, 1e-8); out.append(float(w[0]))
for shell in kernels.drivers():
    w = np.zeros(8)
    shell(tuple(kernels.Scalars(1e-3, 0.9, 0.0, 1e-8, 0.0, 0.0, 1.0, 1.0)), w, np.ones(8), np.zeros(8), w[:0], w[:0])
    out.append(float(w[0]))
t = np.zeros((4, 2)); fastrms.RMSprop(t, 1e-3).step_rows(np.array([1, 1]), np.ones((2, 2)) / 2); out.append(t[1, 0])
stats = kernels.cache_stats()
print(json.dumps({"moved": out, "misses": stats["misses"], "hits": stats["hits"], "folder": stats["folder"]}))
"""


@pytest.mark.slow
def test_a_changed_element_function_is_compiled_again_whatever_the_files_size_and_mtime(tmp_path):
    """Numba keys a cached function on its own file's stamp; the shells inline the element
    function from another file, so a change there kept the old formula after an upgrade.
    (The package's own __pycache__, the folder whose name does not follow the content.)"""
    pkg, env = _copy_package(tmp_path)
    del env["NUMBA_CACHE_DIR"]
    script = PUBLIC_ENTRIES % str(pkg)
    element = pkg / "kernels" / "element.py"
    original = element.read_text()
    plain = "            p = p - lr * u\n"
    assert original.count(plain) == 1

    expected = float(reference.rmsprop_step(np.zeros(1), np.ones(1), {"square_avg": np.zeros(1)}, 1, 1e-3)[0])
    warm = _run(script, env=env, cwd=tmp_path)
    assert warm["moved"] == pytest.approx([expected] * 5, rel=1e-6)
    assert warm["folder"] == str(pkg / "kernels" / "__pycache__")
    assert _run(script, env=env, cwd=tmp_path)["misses"] == 0  # the cache works before the change
    files = _cache_files(pkg)

    stat = element.stat()
    for text, sign in ((plain.replace("-", "+"), -1), (plain, 1)):  # each of the same size, mtime kept
        element.write_text(original.replace(plain, text))
        os.utime(element, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert element.stat().st_size == stat.st_size and element.stat().st_mtime_ns == stat.st_mtime_ns
        changed = _run(script, env=env, cwd=tmp_path)
        assert changed["moved"] == pytest.approx([sign * expected] * 5, rel=1e-6), text
        assert changed["misses"] > 0
    # the stale entries were replaced, not piled up
    assert _cache_files(pkg) == files


@pytest.mark.slow
@pytest.mark.lower_bound
def test_under_numba_cache_dir_the_folder_follows_the_content_not_the_path(tmp_path):
    """Numba names its folder after the source's path: a second copy of the same fastrms
    compiled everything again. Two copies share one folder; a changed copy gets its own, and
    its kernels compute the changed formula (never the other copy's)."""
    pkg, env = _copy_package(tmp_path)
    other = tmp_path / "other"
    shutil.copytree(pkg, other / "fastrms")
    first = _run(PUBLIC_ENTRIES % str(pkg), env=env, cwd=tmp_path)
    assert first["misses"] > 0 and Path(first["folder"]).parent == tmp_path / "cache"
    assert Path(first["folder"]).name.startswith("fastrms-")
    second = _run(PUBLIC_ENTRIES % str(other), env=dict(env, PYTHONPATH=str(other)), cwd=tmp_path)
    assert second["misses"] == 0 and second["folder"] == first["folder"] and second["moved"] == first["moved"]

    element = other / "fastrms" / "kernels" / "element.py"
    plain = "            p = p - lr * u\n"
    element.write_text(element.read_text().replace(plain, plain.replace("-", "+")))
    changed = _run(PUBLIC_ENTRIES % str(other), env=dict(env, PYTHONPATH=str(other)), cwd=tmp_path)
    assert changed["misses"] > 0 and changed["folder"] != first["folder"]
    assert changed["moved"] == pytest.approx([-m for m in first["moved"]], rel=1e-6)
    assert _run(PUBLIC_ENTRIES % str(pkg), env=env, cwd=tmp_path)["misses"] == 0  # the first folder is intact


def test_only_the_folders_used_last_are_kept(tmp_path):
    """Every upgrade makes a new content folder: one root keeps `KEEP_FOLDERS` of them."""
    from fastrms.kernels import _jit

    folders = [tmp_path / f"fastrms-{k:016x}" for k in range(_jit.KEEP_FOLDERS + 3)]
    for age, folder in enumerate(folders):
        folder.mkdir()
        (folder / "x.nbi").write_bytes(b"")
        os.utime(folder, (1e9 + age, 1e9 + age))
    (tmp_path / "someone-elses").mkdir()
    oldest = folders[0]
    _jit._claim(str(tmp_path), str(oldest))  # in use now: kept, though it was the oldest
    kept = sorted(p.name for p in tmp_path.iterdir())
    expected = [oldest.name] + [f.name for f in folders[-(_jit.KEEP_FOLDERS - 1) :]] + ["someone-elses"]
    assert kept == sorted(expected)


@pytest.mark.lower_bound
def test_corrupt_or_foreign_cache_files_are_never_unpickled(tmp_path):
    """A truncated, flipped or foreign index or data file is ignored (the kernel is compiled
    again); in particular a pickle Numba itself would load is not run."""
    from fastrms.kernels import _jit

    cache = _jit._BoundedIndex(str(tmp_path), "dense.f-1.py311", "stamp", "dense.")
    cache.save("key", b"data")
    assert cache.load("key") == b"data"
    index, data = tmp_path / "dense.f-1.py311.nbi", tmp_path / "dense.f-1.py311.1.nbc"
    good = data.read_bytes()
    for bad in (good[:-1], good[:-1] + bytes([good[-1] ^ 1]), b"", b"garbage"):
        data.write_bytes(bad)
        assert cache.load("key") is None
    data.write_bytes(good)

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for victim in (index, data):  # Numba's own format: a pickled version, then the pickled payload
        saved = victim.read_bytes()
        victim.write_bytes(pickle.dumps(numba.__version__) + pickle.dumps(("stamp", {"key": Payload()})))
        assert cache.load("key") is None and not marker.exists()
        victim.write_bytes(saved)
    assert cache.load("key") == b"data"


@pytest.mark.slow
def test_repeated_processes_do_not_grow_the_cache(tmp_path):
    """One key per function and signature in every process: the file count stays put. (A
    per-process key, the old failure, added a file at the second process already.)"""
    pkg, env = _copy_package(tmp_path)
    script = PUBLIC_ENTRIES % str(pkg)
    _run(script, env=env, cwd=tmp_path)
    files = _cache_files(tmp_path / "cache")
    assert files
    for _ in range(3):
        assert _run(script, env=env, cwd=tmp_path)["misses"] == 0
        assert _cache_files(tmp_path / "cache") == files


def test_stale_index_files_of_the_same_module_are_pruned(tmp_path):
    """An index whose stamp is not the current one (another fastrms, another Numba) goes with
    its data when an index of the same source file is written."""
    from fastrms.kernels import _jit

    cache = _jit._BoundedIndex(str(tmp_path), "dense.f-1.py311", "stamp-now", "dense.")
    stale = _jit._BoundedIndex(str(tmp_path), "dense.g-9.py311", "stamp-before", "dense.")
    fresh = _jit._BoundedIndex(str(tmp_path), "dense.h-5.py311", "stamp-now", "dense.")
    other = _jit._BoundedIndex(str(tmp_path), "rows.k-1.py311", "stamp-before", "rows.")
    for index in (stale, fresh, other):
        index.save("key", b"data")
    (tmp_path / "dense.f-1.py311.7.nbc").write_bytes(b"orphan")  # named by no index
    cache.save("key", b"data")
    assert sorted(os.listdir(tmp_path)) == sorted(
        [
            "dense.f-1.py311.nbi",
            "dense.f-1.py311.1.nbc",
            "dense.h-5.py311.nbi",
            "dense.h-5.py311.1.nbc",
            "rows.k-1.py311.nbi",  # another source file's: not this index's to judge
            "rows.k-1.py311.1.nbc",
            _jit.LOCK_NAME,  # the folder's save lock (`_BoundedIndex.save`)
        ]
    )
    assert cache.load("key") == b"data" and fresh.load("key") == b"data"


def test_the_key_describes_closure_cells_by_value():
    """The same variant has the same key in every process: a dispatcher cell is named, not
    pickled (its pickle holds a per-process id)."""
    from fastrms.kernels import _jit

    at = kernels.element(kernels.variant())
    assert _jit._cell_key(at) == (
        "dispatcher",
        at.py_func.__module__,
        at.py_func.__qualname__,
        at.py_func.__code__.co_firstlineno,
    )
    assert _jit._cell_key(True) != _jit._cell_key(1) and _jit._cell_key((1, 2.0)) == (
        "tuple",
        (("int", "1"), ("float", "2.0")),
    )
    shell = kernels.dense(kernels.variant(), False)
    assert isinstance(shell._cache, _jit.KernelCache) or kernels.CACHE_STATUS != "on"


def test_cache_stats_and_info_report_the_cache():
    w = np.zeros(4, np.float32)
    fastrms.RMSprop(w, 1e-3).step(np.ones_like(w))
    stats = kernels.cache_stats()
    assert stats["hits"] + stats["misses"] >= 1
    info = fastrms.info()
    for key in ("fastrms", "numpy", "numba", "python", "cache_folder", "cache_hits", "cache_misses"):
        assert key in info
    assert info["fastrms"] == fastrms.__version__ and info["numpy"] == np.__version__
    if kernels.CACHE_STATUS == "on":
        assert info["cache_folder"] and os.path.isdir(info["cache_folder"])


#: Step 1 compiles a parallel shell; step 2 loads it and compiles rmsprop_update (a serial
#: caller of it); step 3 loads rmsprop_update and compiles a user's @njit caller of it, with
#: nothing else having started Numba's threads.
CALLERS = """
import sys
import numpy as np
from numba import njit
from fastrms import kernels

step = sys.argv[1]
w = np.zeros(8)
if step == "1":
    scalars = kernels.Scalars(1e-3, 0.9, 0.0, 1e-8, 0.0, 0.0, 1.0, 1.0)
    kernels.drivers()[1](tuple(scalars), w, np.ones(8), np.zeros(8), w[:0], w[:0])
elif step == "2":
    kernels.rmsprop_update(w, np.ones(8), np.zeros(8), 1e-3, 0.9, 1e-8)
else:
    @njit
    def train(w, v, g):
        for _ in range(3):
            kernels.rmsprop_update(w, g, v, 1e-3, 0.9, 1e-8)

    train(w, np.zeros(8), np.ones(8))
print("ok", w[0])
"""


@pytest.mark.slow
@pytest.mark.lower_bound
def test_a_caller_compiled_against_a_cached_parallel_kernel_still_starts_numbas_threads(tmp_path):
    """Numba re-runs a cached parallel function's reload hooks (they start its threads), but a
    library it loads from the cache forgets them, so a caller compiled against it was cached
    without them: the next process aborted linking it ("LLVM ERROR: Symbol not found:
    allocate_sched"). The cache hands the hooks on to the loaded library."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    for step in ("1", "2", "3"):
        out = subprocess.run([sys.executable, "-c", CALLERS, step], env=env, capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.startswith("ok"), (step, out.returncode, out.stderr[-2000:])


_SAVER = """
import sys, time
from fastrms.kernels import _jit

folder, who, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
index = _jit._BoundedIndex(folder, "shell-1.py311", "stamp", "shell-")
while time.time() < start:  # every process starts saving at once
    pass
for j in range(60):
    index.save(("signature", who, j), {"who": who, "j": j})
"""


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32", reason="advisory file locks are POSIX's")
def test_processes_saving_signatures_of_one_function_at_once_lose_none(tmp_path):
    """Three processes save 60 signatures each into one index at the same time: every one is
    in the index afterwards, with its own data (unlocked, an index read before another
    process wrote it was written back without that process's signatures)."""
    import time

    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path), str(who), str(start)]) for who in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    index = kernels._jit._BoundedIndex(str(tmp_path), "shell-1.py311", "stamp", "shell-")
    for who in range(3):
        for j in range(60):
            assert index.load(("signature", who, j)) == {"who": who, "j": j}, (who, j)
