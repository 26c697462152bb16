"""Presets: other libraries' RMSprop defaults and formulas as fastrms options.

=========  ======  =====================  =====  ============  =========  ===========  ============
preset     lr      beta                   eps    eps placement initial v  momentum lr  weight decay
=========  ======  =====================  =====  ============  =========  ===========  ============
seed       1e-3    0.9                    1e-8   outside       0          outside      coupled
torch      1e-2    0.99 (`alpha`)       1e-8   outside       0          outside      coupled
keras      1e-3    0.9 (`rho`)          1e-7   inside        0          inside       decoupled
tf1        1e-3    0.9 (`decay`)        1e-10  inside        1.0        inside       (none)
optax      1e-3    0.9 (`decay`)        1e-8   inside        0          inside       (none)
=========  ======  =====================  =====  ============  =========  ===========  ============

`RMSprop.like(name, params, **overrides)` starts from a preset and applies the overrides,
which use fastrms's names (`learning_rate`, `beta`, `epsilon`, ...). Known differences
that remain: PyTorch and Keras do not clamp `v - m^2` at 0 in the centred variant (fastrms
does, so rounding never gives NaN); PyTorch updates `grad_avg` with `lerp` and Keras
scales `lr * g / d` in another order, so results agree to rounding, not bit for bit.
"""

from .core.options import LIBRARIES, aliases

PRESETS = {
    "seed": dict(learning_rate=1e-3, beta=0.9, epsilon=1e-8),
    "torch": dict(learning_rate=1e-2, beta=0.99, epsilon=1e-8),
    "keras": dict(
        learning_rate=1e-3,
        beta=0.9,
        epsilon=1e-7,
        eps_in_sqrt=True,
        lr_in_momentum=True,
        decoupled_weight_decay=True,
    ),
    "tf1": dict(learning_rate=1e-3, beta=0.9, epsilon=1e-10, eps_in_sqrt=True, initial_scale=1.0, lr_in_momentum=True),
    "optax": dict(learning_rate=1e-3, beta=0.9, epsilon=1e-8, eps_in_sqrt=True, lr_in_momentum=True),
}
"""Each library's defaults as fastrms options: `RMSprop.like(name, params)` starts from
`PRESETS[name]`, which holds that library's formula options as well as its defaults."""

#: The other libraries' names for fastrms's options, for users porting code (from the
#: options table, `fastrms.core.options.OPTIONS`).
ALIASES = {library: aliases(library) for library in PRESETS if library in LIBRARIES}


def preset_options(name, overrides):
    """The constructor options of preset `name` with `overrides` applied.

    The preset's own spellings of options (`alpha`, `rho`, `eps`, `lr`, `decay`)
    are accepted and translated; giving an option under both names is an error.
    """
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"name must be one of {sorted(PRESETS)}, got {name!r}")
    options = dict(PRESETS[name])
    aliases = ALIASES.get(name, {})
    given = {}
    for key, value in overrides.items():
        target = aliases.get(key, key)
        if target in given:
            raise TypeError(f"{name!r} preset: {target!r} given twice (as {key!r} and {given[target]!r})")
        given[target] = key
        options[target] = value
    return options
