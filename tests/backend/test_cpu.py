"""fastrms.backend.cpu: the CPU backend's plan (groups by dtype, the kernels each runs on, a step's
calls, the guard over them)."""

import math

import numpy as np
import pytest

import fastrms
from fastrms import kernels
from fastrms.backend import cpu
from fastrms.backend.layout import Slot
from fastrms.core import memory, options, runtime, spec


def _plan(arrays, **opts):
    hyper = options.resolve({"learning_rate": 0.01, **opts})
    names = spec.of(hyper).names
    slots = [Slot(a, a, names) for a in arrays]
    return cpu.Plan(slots, hyper, spec.of(hyper)), slots, hyper


def test_params_are_grouped_by_dtype_in_first_seen_order():
    arrays = [np.zeros(3), np.zeros(4, np.float32), np.zeros(5), np.zeros((2, 2), np.float32)]
    plan, slots, _ = _plan(arrays, momentum=0.9)
    assert [g.dtype for g in plan.groups] == [np.float64, np.float32]
    assert [g.indices for g in plan.groups] == [[0, 2], [1, 3]]
    assert plan.group_of == [0, 1, 0, 1] and plan.packed is None
    assert all(s.momentum_buffer.size == s.flat.size for s in slots)  # the plan allocated the state


def test_params_that_tile_one_buffer_are_one_packed_group():
    _, views = fastrms.pack([np.zeros(3, np.float32), np.zeros((2, 2), np.float32)])
    plan, _, _ = _plan(views)
    assert plan.packed is plan.groups[0] and plan.packed.kind == "flat"
    (call,) = plan.packed_call([(np.ones(7, np.float32), 0)], False)
    assert call[0] == "dense" and call[3] is None


def test_the_kernels_follow_the_bytes_moved_and_the_threading_layer():
    small, _, _ = _plan([np.zeros(10, np.float32)])
    big, _, _ = _plan([np.zeros(kernels.PARALLEL_MIN_BYTES, np.float32)])
    free = runtime.parallel_mode() != "serial"
    assert small.parallel_of(0) is False and big.parallel_of(0) is free
    assert small.update() is kernels.dense(options.variant_key(options.resolve({})), False)
    assert runtime.parallel_for(kernels.PARALLEL_MIN_BYTES, 4, 1) is free
    assert runtime.parallel_for(10, 4, 1) is False


def test_a_steps_calls_name_the_shell_each_group_runs():
    arrays = [np.zeros(3), np.zeros(4, np.float32), np.zeros(5)]
    plan, slots, hyper = _plan(arrays)
    grads = [np.ones(3), np.ones(4, np.float32), np.ones(5)]
    calls = plan.calls(plan.groups, memory.check_grads(grads, slots)[0], False)
    assert [c[0] for c in calls] == ["segments", "dense"]
    plan.run(calls, options.scalars(hyper, 0.01, 1))
    assert all((a < 0).all() for a in arrays)  # every param moved, in its own dtype's call
    np.testing.assert_array_equal(plan.groups[0].ptrs[:, 1], [kernels.address(grads[0]), kernels.address(grads[2])])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_the_verdict_reads_every_groups_grads(bad):
    arrays = [np.zeros(3), np.zeros(4, np.float32)]
    plan, slots, _ = _plan(arrays)
    grads = [np.ones(3), np.full(4, 2.0, np.float32)]
    checked, _ = memory.check_grads(grads, slots)
    verdict = plan.verdict(
        plan.calls(plan.groups, checked, True), checked, {"clip_global_norm": 1.0, "skip_nonfinite": True}
    )
    assert verdict.stepped and verdict.norm == math.sqrt(3 + 16)
    grads[1][2] = bad  # a non-finite grad in the second group only
    checked, _ = memory.check_grads(grads, slots)
    assert not plan.verdict(
        plan.calls(plan.groups, checked, False), checked, {"clip_global_norm": None, "skip_nonfinite": True}
    ).stepped


def test_a_group_whose_grads_are_16_bit_runs_the_kernels_that_read_them():
    arrays = [np.zeros(3, np.float32), np.zeros(4, np.float32)]
    plan, slots, hyper = _plan(arrays)
    grads = [np.full(3, 0.5, np.float16), np.full(4, -0.5, np.float16)]
    checked, low = memory.check_grads(grads, slots)
    calls = plan.calls(plan.groups, checked, True, low)
    assert [(c[0], c[4]) for c in calls] == [("segments", kernels.storage.FLOAT16)]
    verdict = plan.verdict(calls, checked, {"clip_global_norm": 10.0, "skip_nonfinite": True})
    assert verdict.stepped and verdict.norm == math.sqrt(7 * 0.25)
    plan.run(calls, options.scalars(hyper, 0.01, 1))
    assert (arrays[0] < 0).all() and (arrays[1] > 0).all()
    mixed = [np.ones(3, np.float32), np.ones(4, np.float16)]  # one group, two grad dtypes
    checked, low = memory.check_grads(mixed, slots)
    with pytest.raises(TypeError, match=r"grads\[1\] is float16, grads\[0\] float32: the grads of one dtype's "):
        plan.calls(plan.groups, checked, False, low)


@pytest.mark.parametrize("flat_grad", [True, False], ids=["one flat grad", "grads tiling one buffer"])
def test_skip_nonfinite_alone_checks_packed_params_whose_calls_sum_no_norm(flat_grad):
    arrays = [np.ones(5, np.float32), np.ones(7, np.float32)]
    _, views = fastrms.pack(arrays)
    opt = fastrms.RMSprop(views, skip_nonfinite=True)
    buffer, grads = fastrms.pack([np.ones(5, np.float32), np.ones(7, np.float32)])
    given = buffer if flat_grad else grads
    opt.step(given)
    before = [v.copy() for v in views]
    grads[1][3] = np.nan
    opt.step(given)
    assert opt.step_count == 1 and opt.skipped_steps == 1
    assert all(np.array_equal(v, b) for v, b in zip(views, before))
