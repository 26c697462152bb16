"""fastrms.core.spec: the frozen spec a step's options give, read by every front end."""

import dataclasses

import numpy as np
import pytest

from fastrms import kernels
from fastrms.bench.cases import all_variants
from fastrms.core import options, spec


def test_the_state_slots_follow_the_variant_in_pytorchs_names():
    assert spec.of({}).names == ("square_avg",)
    assert spec.of({"centered": True, "momentum": 0.5}).names == ("square_avg", "grad_avg", "momentum_buffer")
    assert spec.of({"momentum": 0.5, "nesterov": True}).names == ("square_avg", "momentum_buffer")


@pytest.mark.parametrize("name", list(all_variants())[::5])
def test_the_spec_is_the_variants_and_computed_once(name):
    hyper = options.resolve(all_variants()[name])
    s = spec.of(hyper)
    assert s.variant == options.variant_key(hyper)
    assert s is spec.of(dict(hyper))  # one frozen object per variant
    assert s.names[0] == "square_avg" and ("grad_avg" in s.names) == s.variant.uses_grad_avg
    assert ("momentum_buffer" in s.names) == s.variant.uses_momentum_buffer
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.variant = kernels.Variant()  # type: ignore[misc]


def test_the_spec_allocates_its_state_in_each_slots_storage():
    s = spec.of({"centered": True, "momentum": 0.9})
    state = s.allocate(5, np.float32, initial_scale=1.0)
    assert list(state) == list(s.names)
    assert all(a.dtype == np.float32 and a.shape == (5,) for a in state.values())
    np.testing.assert_array_equal(state["square_avg"], 1.0)
    np.testing.assert_array_equal(state["grad_avg"], 0.0)
    assert spec.StateSlot("square_avg", "bfloat16").dtype(np.float32) == np.uint16
    assert (s.compute, s.rounding) == ("param", "once")
