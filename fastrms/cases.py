"""One table of variants, shared by the correctness tests, the benchmarks and ``fastrms bench``.

``MAIN`` holds the variants the benchmarks time; ``all_variants()`` enumerates every
compiled kernel variant (centring x momentum placement x Nesterov x weight-decay mode), each
paired with a setting of the runtime options (``maximize``, ``bias_correction``,
``eps_in_sqrt``, ``initial_scale``) so that each of those options is exercised both ways.
"""

import itertools

#: name -> RMSprop keyword options, the variants the benchmarks time.
MAIN = {
    "plain": {},
    "centered_momentum": dict(centered=True, momentum=0.9),
    "nesterov": dict(momentum=0.9, nesterov=True, lr_in_momentum=True),
    "weight_decay": dict(weight_decay=0.01),
}

#: Further variants ``fastrms bench --variants`` can time (not in the default sweep).
EXTRA = {
    "plain_skip_nonfinite": dict(skip_nonfinite=True),
    "centered_momentum_skip_nonfinite": dict(centered=True, momentum=0.9, skip_nonfinite=True),
}

#: Everything the benchmarks know.
ALL = {**MAIN, **EXTRA}


def all_variants():
    """name -> options for every kernel variant (30), runtime options rotated through."""
    out = {}
    momenta = [(0.0, False, False), (0.9, False, False), (0.9, True, False), (0.9, False, True), (0.9, True, True)]
    decays = [(0.0, False), (0.01, False), (0.01, True)]
    for k, (centered, (mu, nesterov, lr_in), (wd, decoupled)) in enumerate(
        itertools.product((False, True), momenta, decays)
    ):
        opts = dict(centered=centered, weight_decay=wd, decoupled_weight_decay=decoupled)
        if mu:
            opts.update(momentum=mu, nesterov=nesterov, lr_in_momentum=lr_in)
        opts.update(
            maximize=bool(k & 1),
            bias_correction=bool(k & 2),
            eps_in_sqrt=bool(k & 4),
            initial_scale=1.0 if k & 8 else 0.0,
        )
        name = "-".join(
            part
            for part, on in (
                ("centered", centered),
                ("mom" if not lr_in else "mom_lr_in", mu),
                ("nesterov", nesterov),
                ("wd" if not decoupled else "dwd", wd),
            )
            if on
        )
        out[f"{k:02d}-{name or 'plain'}"] = opts
    return out
