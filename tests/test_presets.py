"""Presets against the libraries they imitate, where those are installed (torch is in the
dev extra, so CI runs these)."""

import numpy as np
import pytest
from conftest import problem

import fastrms
from fastrms.presets import ALIASES, PRESETS, preset_options

TORCH_CASES = {
    "plain": {},
    "momentum": dict(momentum=0.9),
    "centered": dict(centered=True),
    "centered_momentum_wd": dict(centered=True, momentum=0.8, weight_decay=0.01),
    "maximize": dict(maximize=True, weight_decay=0.1),
}


@pytest.mark.parametrize("case", TORCH_CASES)
def test_torch_preset_matches_torch_optim_rmsprop(case, dtype):
    torch = pytest.importorskip("torch")
    options = TORCH_CASES[case]
    p0, grads = problem(1031, dtype, seed=4)
    ours = fastrms.RMSprop.like("torch", p0.copy(), **options)
    param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    theirs = torch.optim.RMSprop([param], **options, foreach=False)
    for t in range(50):
        ours.step(grads[t % 4])
        param.grad = torch.from_numpy(grads[t % 4].copy())
        theirs.step()
    got, want = ours.params, param.detach().numpy()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(got, want, **tol)
    np.testing.assert_allclose(ours.square_avg, theirs.state[param]["square_avg"].numpy(), **tol)
    if options.get("momentum"):
        np.testing.assert_allclose(ours.momentum_buffer, theirs.state[param]["momentum_buffer"].numpy(), **tol)


def test_like_applies_each_preset_and_the_seed_preset_is_the_default():
    assert fastrms.RMSprop.like("seed", np.ones(2)).hyperparameters == fastrms.RMSprop(np.ones(2)).hyperparameters
    for name in PRESETS:
        opt = fastrms.RMSprop.like(name, np.ones(2))
        assert opt.hyperparameters.items() >= PRESETS[name].items()


def test_aliases_translate_and_unknown_options_still_fail():
    assert preset_options("optax", dict(decay=0.5, eps=1e-3))["beta"] == 0.5
    for name, table in ALIASES.items():
        for alias, target in table.items():
            opt = fastrms.RMSprop.like(name, np.ones(2), **{alias: 0.125})
            assert opt.hyperparameters[target] == 0.125
    with pytest.raises(TypeError, match="unexpected keyword"):
        fastrms.RMSprop.like("torch", np.ones(2), betas=(0.9, 0.99))


def test_keras_formula_written_out():
    """Keras 3 RMSprop with momentum and decoupled weight decay, transcribed from its
    update rule (variable -= variable * wd * lr; then the momentum step)."""
    p0, grads = problem(64, np.float64, seed=5)
    lr, rho, eps, mu, wd = 1e-3, 0.9, 1e-7, 0.5, 0.01
    ours = fastrms.RMSprop.like("keras", p0.copy(), momentum=mu, weight_decay=wd)
    p, vel, mom = p0.copy(), np.zeros(64), np.zeros(64)
    for t in range(50):
        g = grads[t % 4]
        p = p - p * wd * lr
        vel = rho * vel + (1 - rho) * g * g
        increment = lr * g / np.sqrt(vel + eps)
        mom = mu * mom + increment
        p = p - mom
        ours.step(g)
    np.testing.assert_allclose(ours.params, p, rtol=1e-12)


def test_tf1_formula_written_out():
    """TF1 ApplyRMSProp: ms starts at 1; ms += (g^2 - ms)(1 - rho); mom = mom*mu + lr*g/sqrt(ms + eps)."""
    p0, grads = problem(64, np.float64, seed=6)
    lr, rho, eps, mu = 1e-3, 0.9, 1e-10, 0.9
    ours = fastrms.RMSprop.like("tf1", p0.copy(), momentum=mu)
    p, ms, mom = p0.copy(), np.ones(64), np.zeros(64)
    for t in range(50):
        g = grads[t % 4]
        ms = ms + (g * g - ms) * (1 - rho)
        mom = mom * mu + lr * g / np.sqrt(ms + eps)
        p = p - mom
        ours.step(g)
    np.testing.assert_allclose(ours.params, p, rtol=1e-12)


def test_optax_formula_written_out():
    """optax.rmsprop(nesterov=True, bias_correction=True): scale_by_rms, then -lr, then trace."""
    p0, grads = problem(64, np.float64, seed=7)
    lr, decay, eps, mu = 1e-3, 0.9, 1e-8, 0.9
    ours = fastrms.RMSprop.like("optax", p0.copy(), momentum=mu, nesterov=True, bias_correction=True)
    p, nu, trace = p0.copy(), np.zeros(64), np.zeros(64)
    for t in range(1, 51):
        g = grads[t % 4]
        nu = decay * nu + (1 - decay) * g**2
        nu_hat = nu / (1 - decay**t)
        update = -lr * (g / np.sqrt(nu_hat + eps))
        trace = update + mu * trace
        p = p + (update + mu * trace)
        ours.step(g)
    np.testing.assert_allclose(ours.params, p, rtol=1e-12)
