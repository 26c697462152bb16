"""One table of variants, shared by the correctness tests, the benchmarks and `fastrms bench`.

`MAIN` holds the variants the benchmarks time; `all_variants()` enumerates every
compiled kernel variant (centring x momentum placement x Nesterov x weight-decay mode), each
paired with a setting of the runtime options (`maximize`, `bias_correction`,
`eps_in_sqrt`, `initial_scale`) so that each of those options is exercised both ways.
"""

from .. import kernels
from ..core.options import OPTIONS, options_for

#: name -> RMSprop keyword options, the variants the benchmarks time.
MAIN = {
    "plain": {},
    "centered_momentum": dict(centered=True, momentum=0.9),
    "nesterov": dict(momentum=0.9, nesterov=True, lr_in_momentum=True),
    "weight_decay": dict(weight_decay=0.01),
}

#: Further variants `fastrms bench --variants` can time (not in the default sweep).
EXTRA = {
    "plain_skip_nonfinite": dict(skip_nonfinite=True),
    "centered_momentum_skip_nonfinite": dict(centered=True, momentum=0.9, skip_nonfinite=True),
}

#: Everything the benchmarks know.
ALL = {**MAIN, **EXTRA}


def all_variants():
    """name -> options for every compiled kernel variant (30), the runtime options (each
    boolean `scalar` option of the table, and `initial_scale`) rotated through so that
    each is exercised both ways. Built from `fastrms.kernels.variants` and the options
    table, so a new variant or option shows up here by itself."""
    runtime_flags = [o.name for o in OPTIONS if o.kind == "bool" and o.role == "scalar"]
    out = {}
    for k, key in enumerate(kernels.variants()):
        opts = options_for(key)
        opts.update({name: bool(k >> j & 1) for j, name in enumerate(runtime_flags)})
        opts["initial_scale"] = 1.0 if k >> len(runtime_flags) & 1 else 0.0
        parts = [
            ("centered", key.centered),
            ("mom_lr_in" if key.mom_mode == kernels.MOM_INSIDE else "mom", key.mom_mode),
            ("nesterov", key.nesterov),
            ("dwd" if key.wd_mode == kernels.WD_DECOUPLED else "wd", key.wd_mode),
        ]
        out[f"{k:02d}-{'-'.join(p for p, on in parts if on) or 'plain'}"] = opts
    return out
