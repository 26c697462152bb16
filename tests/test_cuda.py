"""The CUDA target (`fastrms.kernels.cuda`, `fastrms.backend.cuda`, `fastrms.optimizer.DeviceRMSprop`), on a
machine without a GPU: every kernel compiled to PTX for sm_80 and sm_90 and, where `ptxas`
is found, assembled with its registers and spills checked; every kernel run on numba-cuda's
simulator through `fastrms.RMSprop` against `fastrms.reference` (to the simulator's
tolerance: it computes each element's constants in float64, and a GPU fuses multiply-adds:
neither is bit for bit with the CPU). The device check itself (`python -m fastrms bench
--cuda`) needs a GPU."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

HAS_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
needs_numba_cuda = pytest.mark.skipif(
    not HAS_NUMBA_CUDA, reason="numba-cuda is not installed (pip install 'fastrms[cuda]')"
)
PTXAS = shutil.which("ptxas")


def test_importing_fastrms_never_imports_numba_cuda():
    code = (
        "import sys, fastrms, fastrms.functional; print(sorted(m for m in sys.modules if m.startswith('numba.cuda')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _signatures():
    import numba

    from fastrms.kernels import cuda as K
    from fastrms.kernels import storage
    from fastrms.kernels.element import MOM_INSIDE, MOM_OUTSIDE, WD_DECOUPLED, variant

    f32, f64 = numba.float32[::1], numba.float64[::1]
    table = (numba.int64[:, ::1], numba.int64[::1], numba.int64[:, ::1])
    scalars = numba.types.UniTuple(numba.float64, 9)
    plain, full = variant(), variant(centered=True, wd_mode=WD_DECOUPLED, mom_mode=MOM_OUTSIDE, nesterov=True)
    inside = variant(mom_mode=MOM_INSIDE)
    bf16m, f16m = storage.MASTERS["bf16"], storage.MASTERS[storage.FLOAT16.tag]
    return {  # every kernel, over a covering set of variants and formats
        "dense plain float32": (K.dense(plain), (scalars, f32, numba.int64[::1], numba.int64)),
        "dense full float64": (K.dense(full), (scalars, f64, numba.int64[::1], numba.int64)),
        "dense float16 masters": (
            K.dense(plain, storage.NATIVE, f16m, storage.FLOAT16),
            (scalars, f32, numba.int64[::1], numba.int64),
        ),
        "segments float16 copy_to": (K.segments(inside, storage.NATIVE, storage.FLOAT16), (scalars, f32, *table)),
        "segments full float32": (K.segments(full), (scalars, f32, *table)),
        "segments lr-inside bfloat16 state": (K.segments(inside, storage.BFLOAT16), (scalars, f32, *table)),
        "segments bfloat16 masters": (
            K.segments(full, storage.NATIVE, bf16m, storage.BFLOAT16),
            (scalars, f32, *table),
        ),
        "sumsq float16 grads": (K.sumsq(storage.FLOAT16), (f32, *table, f64)),
        "sumsq float64": (K.sumsq(), (f64, *table, f64)),
        "nonfinite bfloat16 grads": (K.nonfinite(storage.BFLOAT16), (f32, *table, numba.int32[::1])),
        "total": (K.total, (f64, f64)),
        "blockwise centered momentum": (K.blockwise(full), (scalars, f32, *table)),
        "blockwise bfloat16 masters": (K.blockwise(plain, bf16m, storage.BFLOAT16), (scalars, f32, *table)),
    }


@needs_numba_cuda
@pytest.mark.parametrize("cc", [(8, 0), (9, 0)], ids=["sm_80", "sm_90"])
def test_every_kernel_compiles_to_ptx_and_assembles_without_spills(cc, tmp_path):
    from fastrms.kernels import cuda as K

    for name, (kernel, signature) in _signatures().items():
        ptx, _ = K.ptx(kernel, signature, cc)
        assert f".target sm_{cc[0]}{cc[1]}" in ptx, name
        assert ".entry" in ptx, name
        if name.startswith(("dense", "segments")):
            assert "sqrt.rn.f" in ptx, name  # the update's root: IEEE, not an approximation
        if PTXAS is None:
            continue
        path = tmp_path / "kernel.ptx"
        path.write_text(ptx)
        out = subprocess.run([PTXAS, f"-arch=sm_{cc[0]}{cc[1]}", "-v", str(path), "-o", os.devnull],
                             capture_output=True, text=True)  # fmt: skip
        assert out.returncode == 0, (name, out.stderr)
        registers = [int(n) for n in re.findall(r"Used (\d+) registers", out.stderr)]
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out.stderr)]
        assert registers and max(registers) <= 64, (name, registers)  # 256 threads a block keep full occupancy
        assert not any(spills), (name, out.stderr)


@needs_numba_cuda
def test_8bit_state_goes_to_the_blockwise_kernel_not_the_elementwise_ones():
    from fastrms.kernels import cuda as K
    from fastrms.kernels import storage
    from fastrms.kernels.element import variant

    for elementwise in (K.segments, K.dense):
        with pytest.raises(ValueError, match="8-bit blocks: blockwise\\(\\) steps it"):
            elementwise(variant(), storage.BLOCKWISE8)


#: Run on the simulator (a subprocess: NUMBA_ENABLE_CUDASIM is read when numba-cuda loads).
_SIMULATED = textwrap.dedent(
    """
    import json, sys, numpy as np
    from numba import cuda
    import fastrms
    from fastrms import reference

    rng = np.random.default_rng(0)
    shapes = [(30, 10), (700,), (5,)]
    cases = json.loads(sys.argv[1])
    out = {}
    for label, opts, dtype in cases:
        ps = [rng.standard_normal(s).astype(dtype) for s in shapes]
        gs = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(3)]
        if opts.get("skip_nonfinite"):
            gs[1][2][0] = np.nan  # the second step is skipped
        dev = [cuda.to_device(p.copy()) for p in ps]
        opt = fastrms.RMSprop(dev, 0.01, **opts)
        ref = reference.RMSprop([p.copy() for p in ps], 0.01, **opts)
        for step in gs:
            opt.step([cuda.to_device(g) for g in step])
            ref.step([g.copy() for g in step])
        got = [d.copy_to_host() for d in dev]
        scale = max(float(np.abs(p - r).max()) for p, r in zip(ps, ref.params))
        err = max(float(np.abs(g - r).max()) for g, r in zip(got, ref.params))
        state = opt.state_dict()
        cpu = fastrms.RMSprop([p.copy() for p in ps], 0.01, **opts)
        cpu.load_state_dict(state)  # a device state dict loads on the CPU
        back = fastrms.RMSprop([cuda.to_device(g) for g in got], 0.01, **opts)
        back.load_state_dict(cpu.state_dict())  # and back
        same = all(np.array_equal(back.state_dict()[k], v) for k, v in state.items() if isinstance(v, np.ndarray))
        out[label] = {"err": err, "moved": scale, "steps": opt.step_count, "skipped": opt.skipped_steps,
                      "kernels": opt.kernel_calls, "norm": opt.last_grad_norm,
                      "ref_norm": getattr(ref, "last_grad_norm", None), "round_trip": same}
    mixed = [cuda.to_device(np.ones(300, np.float32)), cuda.to_device(np.ones(40, np.float64)),
             cuda.to_device(np.ones(7, np.float32))]
    both = fastrms.RMSprop(mixed, 0.01)
    both.step([cuda.to_device(np.full(a.shape, 2.0, a.dtype)) for a in mixed])
    cpu = [np.ones(300, np.float32), np.ones(40, np.float64), np.ones(7, np.float32)]
    fastrms.RMSprop(cpu, 0.01).step([np.full(a.shape, 2.0, a.dtype) for a in cpu])
    out["mixed"] = {"kernels": both.kernel_calls,
                    "err": max(float(np.abs(d.copy_to_host() - c).max()) for d, c in zip(mixed, cpu))}
    ps = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    halves = [[rng.standard_normal(s).astype(np.float16) for s in shapes] for _ in range(3)]
    dev = [cuda.to_device(p.copy()) for p in ps]
    opt = fastrms.RMSprop(dev, 0.01, clip_global_norm=1.0)
    ref = reference.RMSprop([p.copy() for p in ps], 0.01, clip_global_norm=1.0)
    cpu = fastrms.RMSprop([p.copy() for p in ps], 0.01, clip_global_norm=1.0)
    for step in halves:
        opt.step([cuda.to_device(g) for g in step])
        ref.step([g.astype(np.float32) for g in step])  # float16 widens exactly
        cpu.step(step)
    got = [d.copy_to_host() for d in dev]
    out["float16 grads"] = {"err": max(float(np.abs(g - r).max()) for g, r in zip(got, ref.params)),
                            "cpu_err": max(float(np.abs(g - c).max()) for g, c in zip(got, cpu.params)),
                            "moved": max(float(np.abs(p - r).max()) for p, r in zip(ps, ref.params)),
                            "norm": opt.last_grad_norm, "ref_norm": ref.last_grad_norm}
    for label, opts in (("float16 masters", {"momentum": 0.9, "centered": True}),
                        ("float16 masters, 8-bit state", {"state_storage": "8bit"})):
        halves = [rng.standard_normal(s).astype(np.float16) for s in shapes]
        dev = [cuda.to_device(h.copy()) for h in halves]
        opt = fastrms.RMSprop(dev, 0.01, **opts)
        cpu = fastrms.RMSprop([h.copy() for h in halves], 0.01, **opts)  # the CPU's float32 masters
        for k in range(3):
            grads = [rng.standard_normal(s).astype(np.float16) for s in shapes]
            if k == 1:  # an element written from outside: its master takes its value
                for d, c in zip(dev, cpu.params):
                    h = d.copy_to_host()
                    h.reshape(-1)[0] = c.reshape(-1)[0] = 3.0
                    d.copy_to_device(h)
            opt.step([cuda.to_device(g) for g in grads])
            cpu.step(grads)
        state, mine = opt.state_dict(), cpu.state_dict()
        back = fastrms.RMSprop([cuda.to_device(h) for h in halves], 0.01, **opts)
        back.load_state_dict(state)
        out[label] = {"kernels": opt.kernel_calls, "dtypes": [str(d.copy_to_host().dtype) for d in dev],
                      "params_differ": sum(int(np.sum(d.copy_to_host() != c)) for d, c in zip(dev, cpu.params)),
                      "master_err": max(float(np.abs(state[f"master_param.{i}"] - mine[f"master_param.{i}"]).max())
                                        for i in range(len(shapes))),
                      "moved": max(float(np.abs(d.copy_to_host().astype(np.float32) - h).max())
                                   for d, h in zip(dev, halves)),
                      "keys": sorted(state) == sorted(mine),
                      "round_trip": all(np.array_equal(back.state_dict()[k], v) for k, v in state.items()
                                        if isinstance(v, np.ndarray))}
    ps = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    copies = [np.zeros(s, np.float16) for s in shapes]
    dev, dcopies = [cuda.to_device(p.copy()) for p in ps], [cuda.to_device(c) for c in copies]
    opt = fastrms.RMSprop(dev, 0.01, copy_to=dcopies)
    cpu = fastrms.RMSprop([p.copy() for p in ps], 0.01, copy_to=copies)
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    opt.step([cuda.to_device(g) for g in grads])
    cpu.step(grads)
    out["copy_to"] = {"copies_differ": sum(int(np.sum(d.copy_to_host() != c)) for d, c in zip(dcopies, copies)),
                      "written": min(float(np.abs(c).max()) for c in copies)}
    one = cuda.to_device(np.ones(1000, np.float32))
    single = fastrms.RMSprop(one, 0.01)
    single.step(cuda.to_device(np.ones(1000, np.float32)))
    out["single"] = {"kernels": single.kernel_calls, "value": float(one.copy_to_host()[0])}
    print(json.dumps(out))
    """
)

SIMULATED_CASES = [  # every variant axis, both dtypes, the guard and the bfloat16 state
    ("plain float32", {}, "float32"),
    ("centered momentum float64", {"centered": True, "momentum": 0.9}, "float64"),
    ("nesterov, lr inside, decoupled decay", {"momentum": 0.9, "nesterov": True, "lr_in_momentum": True,
                                              "weight_decay": 0.01, "decoupled_weight_decay": True}, "float32"),
    ("coupled decay, maximize, eps in root", {"weight_decay": 0.01, "maximize": True, "eps_in_sqrt": True}, "float32"),
    ("clip_global_norm, skip_nonfinite", {"clip_global_norm": 1.0, "skip_nonfinite": True}, "float32"),
    ("bfloat16 state", {"state_storage": "bfloat16", "momentum": 0.9}, "float32"),
    ("8-bit state", {"state_storage": "8bit", "momentum": 0.9, "centered": True}, "float32"),
]  # fmt: skip


@pytest.fixture(scope="module")
def simulated():
    if not HAS_NUMBA_CUDA:
        pytest.skip("numba-cuda is not installed (pip install 'fastrms[cuda]')")
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    out = subprocess.run([sys.executable, "-c", _SIMULATED, json.dumps(SIMULATED_CASES)], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("label", [c[0] for c in SIMULATED_CASES])
def test_every_variant_on_the_simulator_matches_the_reference(simulated, label):
    found = simulated[label]
    assert found["moved"] > 1e-3  # the run did something
    assert found["err"] <= 2e-6 * max(1.0, found["moved"]), found  # the simulator's float64 constants
    assert found["kernels"] == ["cuda blockwise" if "8-bit" in label else "cuda segments"]  # one dtype: one launch
    assert found["round_trip"]  # device -> CPU -> device, the state unchanged
    if "skip_nonfinite" in label:
        assert found["steps"] == 2 and found["skipped"] == 1
        assert found["norm"] == pytest.approx(found["ref_norm"], rel=1e-6)
    else:
        assert found["steps"] == 3


def test_two_dtypes_on_the_simulator_are_two_launches_each_over_its_own_arrays(simulated):
    found = simulated["mixed"]
    assert found["kernels"] == ["cuda segments", "cuda dense"]  # float32: two arrays; float64: one
    assert found["err"] <= 1e-6


def test_float16_grads_of_float32_params_on_the_simulator_match_the_reference(simulated):
    found = simulated["float16 grads"]
    assert found["moved"] > 1e-3
    assert found["err"] <= 2e-6 * max(1.0, found["moved"]) and found["cpu_err"] <= 2e-6 * max(1.0, found["moved"])
    assert found["norm"] == pytest.approx(found["ref_norm"], rel=1e-6)  # the guard read them as float16 too


@pytest.mark.parametrize("label", ["float16 masters", "float16 masters, 8-bit state"])
def test_float16_params_on_the_simulator_step_float32_masters_as_the_cpu_does(simulated, label):
    found = simulated[label]
    assert found["kernels"] == ["cuda blockwise" if "8-bit" in label else "cuda segments"]
    assert found["dtypes"] == ["float16"] * 3  # the user's params stay float16, written in place
    assert found["moved"] > 1e-3
    assert found["params_differ"] == 0  # rounded to float16, the CPU's params, element for element
    assert found["master_err"] <= 1e-6  # the masters: the CPU's to the simulator's float64 constants
    assert found["keys"] and found["round_trip"]  # master_param.<i> as on the CPU, and it loads back


def test_copy_to_on_the_simulator_writes_the_float16_copies_the_cpu_writes(simulated):
    found = simulated["copy_to"]
    assert found["written"] > 0.1  # every copy was written (they started at zero)
    assert found["copies_differ"] == 0


def test_one_array_on_the_simulator_is_one_grid_stride_launch(simulated):
    found = simulated["single"]
    assert found["kernels"] == ["cuda dense"]
    lr, g = 0.01, 1.0  # first step from zero state, beta 0.9: v = 0.1, p = 1 - lr * g / (sqrt(0.1) + eps)
    assert found["value"] == pytest.approx(1 - lr * g / (np.sqrt(0.1) + 1e-8), rel=1e-6)


_REFUSALS = textwrap.dedent(
    """
    import numpy as np
    from numba import cuda
    import fastrms

    dev = cuda.to_device(np.zeros(8, np.float32))
    half = cuda.to_device(np.zeros(8, np.float16))
    for make in (
        lambda: fastrms.RMSprop([dev, np.zeros(8, np.float32)]),
        lambda: fastrms.RMSprop(dev, copy_to=np.zeros(8, np.float16)),
        lambda: fastrms.RMSprop(dev, copy_to=cuda.to_device(np.zeros(8, np.float32))),
        lambda: fastrms.RMSprop([dev, cuda.to_device(np.zeros(8, np.float32))], copy_to=[half, half]),
        lambda: fastrms.RMSprop([dev, cuda.to_device(np.zeros(8, np.float16))]),
        lambda: fastrms.RMSprop(cuda.to_device(np.zeros(8, np.float16)), copy_to=dev),
        lambda: fastrms.RMSprop(dev, state_layout="rowwise"),
        lambda: fastrms.RMSprop(dev).step(cuda.to_device(np.zeros(8, np.float64))),
        lambda: fastrms.RMSprop(dev).step(cuda.to_device(np.zeros(9, np.float32))),
        lambda: fastrms.RMSprop(dev).step(np.zeros(8, np.float32)),
        lambda: fastrms.RMSprop(dev).step(dev),
        lambda: fastrms.RMSprop(cuda.to_device(np.zeros(8, np.int32))),
        lambda: fastrms.RMSprop([dev]).step(g for g in [dev]),
        lambda: fastrms.RMSprop([dev]).step([]),
        lambda: fastrms.RMSprop(cuda.to_device(np.zeros(8))).step(cuda.to_device(np.zeros(8, np.float16))),
        lambda: fastrms.RMSprop([dev, cuda.to_device(np.zeros(4, np.float32))]).step(
            [cuda.to_device(np.zeros(8, np.float16)), cuda.to_device(np.zeros(4, np.float32))]
        ),
    ):
        try:
            make()
            print("ACCEPTED")
        except (TypeError, ValueError) as exc:
            print(type(exc).__name__, str(exc).splitlines()[0])
    print("untouched", float(np.abs(dev.copy_to_host()).max()), float(np.abs(half.copy_to_host()).max()))
    """
)


@needs_numba_cuda
def test_bad_device_input_is_refused_before_anything_is_written():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    out = subprocess.run([sys.executable, "-c", _REFUSALS], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert "ACCEPTED" not in lines, lines
    expected = [
        r"TypeError params\[1\] is a numpy.ndarray on the host, the others live on a CUDA device",
        r"TypeError copy_to must be a CUDA device array like params, got ndarray",
        r"TypeError copy_to must be float16 on the device, got float32",
        r"ValueError params \(or their copies\) share memory on the device",
        r"TypeError params\[1\] is float16, params\[0\] float32: 16-bit params on the device are all float16",
        r"ValueError copy_to is for float32 params; 16-bit params are written from their own masters",
        r"ValueError state_layout='rowwise' is a CPU option",
        r"TypeError grads must have dtype float32 \(or float16\) like its param, got float64",
        r"ValueError grads must have shape \(8,\) like its param, got \(9,\)",
        r"TypeError grads must be a CUDA device array",
        r"ValueError grads shares memory with a param or the optimizer's state",
        r"TypeError params must be float32, float64 or float16 on the device, got int32",
        r"TypeError grads must be a list or tuple of 1 device arrays, like params, got generator",
        r"ValueError grads must hold 1 device arrays, like params; got 0",
        r"TypeError grads must have dtype float64 like its param, got float16",
        r"TypeError grads\[1\] is float32, grads\[0\] float16: the grads of one dtype's params are all float32 or all",
    ]
    assert len(lines) == len(expected) + 1, lines
    for line, pattern in zip(lines, expected):
        assert re.match(pattern, line), (line, pattern)
    assert lines[-1] == "untouched 0.0 0.0"
