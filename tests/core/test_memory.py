"""fastrms.core.memory: grads checked against their params, and nothing the step reads shares
memory with what it writes."""

import numpy as np
import pytest

from fastrms.backend.layout import Slot, address
from fastrms.core import memory, options, spec

NAMES = spec.of(options.resolve({"momentum": 0.9})).names


def _slot(param):
    slot = Slot(param, param, NAMES)
    slot.square_avg = np.zeros(param.size, param.dtype)
    slot.momentum_buffer = np.zeros(param.size, param.dtype)
    return slot


def test_params_sharing_memory_are_refused_by_index():
    base = np.zeros(10)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[2\] share memory"):
        memory.disjoint([base[:6], np.zeros(3), base[5:]])
    memory.disjoint([base[:5], base[5:], np.zeros(0), np.zeros(0)])  # touching spans and empty arrays are fine


def test_owned_finds_a_grad_over_a_param_or_the_state():
    slots = [_slot(np.zeros(8)), _slot(np.zeros(4))]
    owned = memory.Owned(slots)
    p, v = slots[0].flat, slots[1].square_avg
    assert owned.overlaps(address(p) + 8, 8)
    assert owned.overlaps(address(v), v.nbytes)
    assert not owned.overlaps(address(np.zeros(8)), 64)
    assert not owned.overlaps(address(p), 0)  # an empty array overlaps nothing
    with pytest.raises(ValueError, match=r"grads\[1\] shares memory"):
        owned.check([(g, address(g)) for g in (np.zeros(8), v)], slots, None)
    with pytest.raises(ValueError, match="^grads shares memory"):
        owned.check([(p, address(p))], slots[:1], None)
    owned.check([(g, address(g)) for g in (np.zeros(8), np.zeros(4))], slots, None)


@pytest.mark.parametrize(
    "grad, error, match",
    [
        ([0.0] * 6, TypeError, "must be a numpy.ndarray, got list"),
        (np.zeros(6, np.float32), TypeError, "must have dtype float64"),
        (np.zeros(5), ValueError, r"must have shape \(6,\)"),
        (np.zeros(12)[::2], ValueError, "must be C-contiguous"),
        (np.frombuffer(bytes(56), np.uint8)[1:49].view(np.float64), ValueError, "must be aligned"),
    ],
)
def test_a_bad_grad_is_named(grad, error, match):
    slot = _slot(np.zeros(6))
    with pytest.raises(error, match=f"grads\\[3\\] {match}"):
        memory.check_grad(grad, slot, 3)
    with pytest.raises(error, match=f"grads\\[0\\] {match}"):
        memory.check_grads([grad], [slot])


def test_check_grads_returns_each_grad_and_its_address():
    slots = [_slot(np.zeros((2, 3))), _slot(np.zeros(4))]
    grads = [np.ones((2, 3)), np.ones(4).view(np.ndarray)]
    checked, low = memory.check_grads(grads, slots)
    assert [g is given for (g, _), given in zip(checked, grads)] == [True, True] and low == []
    assert [a for _, a in checked] == [address(g) for g in grads]
    sub = np.ones(4).view(_Sub)  # a subclass: viewed as a plain ndarray
    g, start = memory.check_grad(sub, slots[1], 1)
    assert type(g) is np.ndarray and start == address(sub)
    with pytest.raises(TypeError, match="masked array"):
        memory.check_grad(np.ma.masked_array(np.ones(4)), slots[1], 1)


class _Sub(np.ndarray):
    pass


def test_a_float32_params_grads_may_be_float16_and_are_listed_as_16_bit():
    slots = [_slot(np.zeros(4, np.float32)), _slot(np.zeros(3, np.float32)), _slot(np.zeros(2))]
    grads = [np.ones(4, np.float32), np.ones(3, np.float16), np.ones(2)]
    checked, low = memory.check_grads(grads, slots)
    assert low == [1] and checked[1][0] is grads[1] and checked[1][1] == address(grads[1])
    with pytest.raises(TypeError, match=r"grads\[0\] must have dtype float64 like its param, got float16"):
        memory.check_grads([np.ones(2, np.float16)], slots[2:])
    with pytest.raises(TypeError, match=r"like its param \(or bfloat16 or float16\), got >f2"):
        memory.check_grad(np.ones(3, ">f2"), slots[1], 0)  # byte-swapped: refused
    with pytest.raises(TypeError, match=r"like its param \(or bfloat16 or float16\), got int16"):
        memory.check_grad(np.ones(3, np.int16), slots[1], 0)
    with pytest.raises(ValueError, match="must be aligned"):
        memory.check_grad(np.frombuffer(bytes(8), np.uint8)[1:7].view(np.float16), slots[1], 0)
    base = np.zeros(6, np.float32)
    param = _slot(base[3:])  # bytes 12 to 24 of base
    owned = memory.Owned([param])
    clear = base.view(np.float16)[2:5]  # bytes 4 to 10: 6 bytes, clear of the param
    owned.check([(clear, address(clear))], [param], None, [0])
    with pytest.raises(ValueError, match="^grads shares memory"):  # counted at its param's 12 bytes, it would not be
        owned.check([(clear, address(clear))], [param], None)
    over = base.view(np.float16)[5:8]  # bytes 10 to 16: over the param's first element
    with pytest.raises(ValueError, match=r"^grads\[1\] shares memory"):
        owned.check([(clear, address(clear)), (over, address(over))], [param, param], None, [0, 1])


def test_step_grads_takes_one_array_per_slot_or_one_flat_grad_for_packed_params():
    slots = [_slot(np.zeros(3)), _slot(np.zeros(2))]
    grads = [np.ones(3), np.ones(2)]
    checked, used, low = memory.step_grads(grads, slots, None)
    assert used is slots and [g for g, _ in checked] == grads and low == []
    with pytest.raises(TypeError, match=r"a list or tuple of 2 arrays, got ndarray$"):
        memory.step_grads(np.ones(5), slots, None)  # one flat grad only for params that tile one buffer
    with pytest.raises(ValueError, match="must hold 2 arrays, one per param, got 1"):
        memory.step_grads(grads[:1], slots, None)

    class Packed:  # a flat group: the span slot its one grad is checked against
        span = _slot(np.zeros(5))

    flat = np.ones(5)
    checked, used, low = memory.step_grads(flat, slots, Packed)
    assert used == (Packed.span,) and checked[0][0] is flat and checked[0][1] == address(flat) and low == []
    with pytest.raises(TypeError, match=r"\(or one flat array, for params that tile one buffer\), got dict"):
        memory.step_grads({}, slots, Packed)


def test_a_param_made_read_only_after_construction_is_named():
    slot = _slot(np.zeros(3))
    memory.writeable(slot, False, 4)
    slot.param.flags.writeable = False
    with pytest.raises(ValueError, match=r"^params\[4\] was made read-only after construction"):
        memory.writeable(slot, False, 4)
    with pytest.raises(ValueError, match="^params was made read-only"):
        memory.writeable(slot, True, 0)
