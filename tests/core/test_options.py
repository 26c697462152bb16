"""fastrms.core.options: the one table of options, and what derives from it."""

import inspect

import numpy as np
import pytest

import fastrms
from fastrms import kernels, reference
from fastrms.core import options
from fastrms.presets import ALIASES


def test_the_optimizers_signature_is_the_table():
    params = inspect.signature(fastrms.RMSprop).parameters
    # the written defaults (what editors and the API page show) are the table's too
    assert fastrms.RMSprop.__init__.__defaults__ == tuple(options.DEFAULTS[n] for n in options.POSITIONAL)
    assert list(params)[1:] == [*options.POSITIONAL, "copy_to", *options.NAMES[3:]]  # copy_to: arrays, not an option
    assert params["copy_to"].default is None and params["copy_to"].kind is inspect.Parameter.KEYWORD_ONLY
    assert {n: p.default for n, p in params.items() if n not in ("params", "copy_to")} == options.DEFAULTS
    assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in options.NAMES[3:])
    doc = fastrms.RMSprop.__doc__
    assert all(f"{n} : " in doc for n in options.NAMES)
    # the keyword-only entries are the table's own text, as describe() writes it
    assert inspect.cleandoc(options.describe()) in inspect.cleandoc(doc)


def test_the_optimizers_docstring_example_runs_as_written():
    import doctest

    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    (test,) = [t for t in finder.find(fastrms.RMSprop, "RMSprop") if t.examples]
    assert runner.run(test).failed == 0


def test_the_references_keywords_are_the_table():
    p, g = np.ones(3), np.ones(3)
    for name in options.NAMES:
        if name in ("learning_rate", "initial_scale", "skip_nonfinite"):
            continue
        reference.rmsprop_step(p, g, {"square_avg": np.zeros(3)}, 1, 0.1, **{name: options.DEFAULTS[name]})
    with pytest.raises(TypeError, match="unexpected keyword argument 'alpha'"):
        reference.rmsprop_step(p, g, {"square_avg": np.zeros(3)}, 1, 0.1, alpha=0.9)


def test_an_unknown_option_is_a_typeerror_naming_it_and_what_was_meant():
    with pytest.raises(TypeError, match="unexpected keyword argument 'betas'"):
        fastrms.RMSprop(np.ones(2), betas=(0.9, 0.99))
    with pytest.raises(TypeError, match=r"'lr'\. Did you mean 'learning_rate'\? .*RMSprop\.like\('torch'"):
        fastrms.RMSprop(np.ones(2), lr=0.01)
    with pytest.raises(TypeError, match="'momentun'. Did you mean 'momentum'"):
        fastrms.RMSprop(np.ones(2), 1e-3, momentun=0.9)


def test_every_variant_round_trips_through_its_options():
    keys = kernels.variants()
    assert len(keys) == 30
    for key in keys:
        assert options.variant_key(options.resolve(options.options_for(key))) == key


def test_aliases_come_from_the_spellings():
    assert ALIASES["torch"] == {"lr": "learning_rate", "alpha": "beta", "eps": "epsilon"}
    assert ALIASES["optax"] == {"decay": "beta", "eps": "epsilon"}
    for library, table in ALIASES.items():
        for spelling, name in table.items():
            assert options.BY_NAME[name].spellings[library] == spelling


def test_scalars_place_epsilon_sign_and_bias_correction():
    h = options.resolve({"eps_in_sqrt": True, "maximize": True, "bias_correction": True, "beta": 0.5})
    s = options.scalars(h, 0.1, 2)
    assert (s.eps_in, s.eps_out, s.grad_scale, s.bias_correction) == (1e-8, 0.0, -1.0, 0.75)
    s = options.scalars(options.resolve({}), 0.1, 2)
    assert (s.eps_in, s.eps_out, s.grad_scale, s.bias_correction) == (0.0, 1e-8, 1.0, 1.0)


def test_the_formula_options_are_what_a_checkpoint_must_agree_on():
    f = options.formula(options.resolve({"momentum": 0.5}))
    assert f["momentum > 0"] and not f["weight_decay > 0"] and "skip_nonfinite" not in f
    assert "learning_rate" not in f and "beta" not in f and "maximize" in f


def test_every_front_ends_written_defaults_are_the_tables():
    """The signatures spell the defaults out (for editors and the API page); each must be the
    table's, so that a changed default in `OPTIONS` cannot leave a front end behind."""
    from fastrms import functional, seed

    fronts = [fastrms.RMSprop.__init__, functional.rmsprop_step, reference.rmsprop_step, reference.RMSprop.__init__]
    fronts.append(seed.rmsprop)
    try:
        from fastrms import dask as fdask
    except ImportError:
        pass  # without dask its front end is checked where dask is installed
    else:
        fronts += [fdask.RMSprop.__init__, fdask.rmsprop_step]
    checked = 0
    for fn in fronts:
        for name, p in inspect.signature(fn, follow_wrapped=False).parameters.items():
            if name in options.DEFAULTS and p.default is not inspect.Parameter.empty:
                assert p.default == options.DEFAULTS[name], (fn.__qualname__, name)
                checked += 1
    assert checked >= 13


class _Scalar0d:
    """A 0-d array of another library (optax's schedules return a 0-d JAX array): a shape
    of (), a dtype, and __float__."""

    shape, dtype = (), np.dtype(np.float32)

    def __init__(self, value):
        self.value = value

    def __float__(self):
        return self.value


@pytest.mark.parametrize(
    "value",
    [0.01, np.float32(0.01), np.float64(0.01), np.array(0.01), np.array(0.01, np.float32), 1, _Scalar0d(0.01)],
    ids=["float", "float32", "float64", "0-d", "0-d float32", "int", "0-d other library"],
)
def test_a_schedule_may_return_any_real_scalar(value):
    assert options.scheduled_lr(lambda count: value, 0, 0.0, (np.dtype(np.float32),)) == float(value)
    opt = fastrms.RMSprop(np.ones(3, np.float32), lambda count: value)
    opt.step(np.ones(3, np.float32))
    assert opt.last_learning_rate == float(value)


def test_a_schedule_returning_a_torch_0d_tensor_steps():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    opt = fastrms.RMSprop(np.ones(3, np.float32), lambda count: torch.tensor(0.01, dtype=torch.float64))
    opt.step(np.ones(3, np.float32))
    assert opt.last_learning_rate == 0.01


@pytest.mark.parametrize(
    "value, match",
    [
        (True, "returned bool"),
        (np.array([0.01]), "returned ndarray"),
        (np.array(True), "returned bool"),
        (1j, "returned complex"),
        ("0.01", "returned str"),
        (None, "returned NoneType"),
        (type("Bool0d", (_Scalar0d,), {"dtype": np.dtype(bool)})(1.0), "returned Bool0d"),
        (type("Row", (_Scalar0d,), {"shape": (1,)})(0.1), "returned Row"),
    ],
)
def test_a_schedule_returning_anything_else_is_refused_by_name(value, match):
    opt = fastrms.RMSprop(np.ones(3, np.float32), lambda count: value)
    with pytest.raises(TypeError, match=match):
        opt.step(np.ones(3, np.float32))
    assert opt.step_count == 0 and (opt.params == 1).all()
