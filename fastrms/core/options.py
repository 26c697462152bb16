"""The optimizer's options, declared once: `OPTIONS` is the table everything else
derives from (validation, the kernel variant, the runtime scalars, the state kept, other
libraries' spellings, the reference's and the optimizer's keyword options, the benchmark's
enumeration of variants, checkpoint keys).

Each option has a role:

- `variant`: chooses the compiled kernel variant (and so the state arrays kept);
- `scalar`: a runtime scalar handed to the kernel at each step;
- `variant+scalar`: its value is a runtime scalar and `> 0` chooses the variant
  (`momentum`, `weight_decay`);
- `initial`: fills the state once (`initial_scale`);
- `storage`: how the state is stored (`state_storage`: a codec of
  `fastrms.kernels.storage`, chosen at compile time like the variant);
- `host`: acted on in Python around the kernel (`skip_nonfinite`, and
  `clip_global_norm`, whose coefficient the step folds into the kernel's `grad_scale`).

Kinds: `rate` (a number or a schedule), `float`, `bool`, `optional`: a float, or
None for off (the clipping options), and `choice`: one of the strings `choices`.

Adding an option means a row here, its arithmetic in `fastrms.kernels.element` (and, if
it selects a variant, in `variant_key`), and its formula in `fastrms.reference`.
The update every variant follows is in [docs/algorithm.md](algorithm.md).
"""

import difflib
import inspect
import math
import textwrap
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import numpy as np

from .. import kernels
from .checks import fits, flag, number

#: The libraries whose spellings the table records (and that have presets).
LIBRARIES = ("torch", "keras", "tf1", "optax")


@dataclass(frozen=True)
class Option:
    """One option: its name, default, type and range, dtype rule, role, other spellings."""

    name: str
    default: object
    kind: str  # "rate" (a number or a schedule), "float", "bool", "optional" (a float or None) or "choice"
    role: str  # "variant", "scalar", "variant+scalar", "initial", "storage" or "host"
    doc: str
    low: "float | None" = None
    low_open: bool = False
    high: "float | None" = None
    high_open: bool = False
    fit: str = ""  # in the params' dtype: "finite", "nonzero" (and finite) or "below_one"
    spellings: dict = field(default_factory=dict)  # library -> its name for this option
    choices: tuple = ()  # kind "choice": the strings it may be

    def check(self, value):
        """`value` validated and normalised (TypeError/ValueError naming the option)."""
        if self.kind == "bool":
            return flag(self.name, value)
        if self.kind == "choice":
            if not isinstance(value, str):
                raise TypeError(f"{self.name} must be one of {list(self.choices)}, got {type(value).__name__}")
            if value not in self.choices:
                raise ValueError(f"{self.name} must be one of {list(self.choices)}, got {value!r}")
            return value
        if self.kind == "rate" and callable(value):
            return value
        if self.kind == "optional":
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, Real):
                raise TypeError(f"{self.name} must be a real number or None, got {type(value).__name__}")
        return number(self.name, value, low=self.low, low_open=self.low_open, high=self.high, high_open=self.high_open)

    @property
    def selects_variant(self):
        return self.role.startswith("variant")


OPTIONS = (
    Option(
        "learning_rate", 1e-3, "rate", "scalar", "step size: a number >= 0, or a schedule `count -> lr`",
        low=0.0, fit="finite",
        spellings=dict(torch="lr", keras="learning_rate", tf1="learning_rate", optax="learning_rate"),
    ),
    Option(
        "beta", 0.9, "float", "scalar", "decay of the squared-gradient average `v`, in [0, 1)",
        low=0.0, high=1.0, high_open=True, fit="below_one",
        spellings=dict(torch="alpha", keras="rho", tf1="decay", optax="decay"),
    ),
    Option(
        "epsilon", 1e-8, "float", "scalar", "> 0, added to the root (or, with `eps_in_sqrt`, under it)",
        low=0.0, low_open=True, fit="nonzero",
        spellings=dict(torch="eps", keras="epsilon", tf1="epsilon", optax="eps"),
    ),
    Option(
        "momentum", 0.0, "float", "variant+scalar", "momentum >= 0; 0 keeps no momentum buffer",
        low=0.0, fit="finite", spellings=dict(torch="momentum", keras="momentum", tf1="momentum", optax="momentum"),
    ),
    Option(
        "centered", False, "bool", "variant", "divide by the root of the variance estimate `v - m^2` (clamped at 0)",
        spellings=dict(torch="centered", keras="centered", tf1="centered", optax="centered"),
    ),
    Option(
        "nesterov", False, "bool", "variant", "Nesterov momentum; needs momentum > 0",
        spellings=dict(optax="nesterov"),
    ),
    Option(
        "lr_in_momentum", False, "bool", "variant",
        "accumulate `lr * u` in the momentum buffer (Keras, TF1, optax) instead of `u` (PyTorch)",
    ),
    Option(
        "weight_decay", 0.0, "float", "variant+scalar", "weight decay >= 0 (L2 on the gradient, or decoupled)",
        low=0.0, fit="finite", spellings=dict(torch="weight_decay", keras="weight_decay"),
    ),
    Option(
        "decoupled_weight_decay", False, "bool", "variant",
        "shrink the parameter by `lr * weight_decay` before the update (Keras 3, AdamW style)",
    ),
    Option("maximize", False, "bool", "scalar", "ascend instead of descend", spellings=dict(torch="maximize")),
    Option(
        "bias_correction", False, "bool", "scalar", "divide `v` and `m` by `1 - beta^t`",
        spellings=dict(optax="bias_correction"),
    ),
    Option(
        "eps_in_sqrt", False, "bool", "scalar", "`sqrt(v + eps)` instead of `sqrt(v) + eps`",
        spellings=dict(optax="eps_in_sqrt"),
    ),
    Option(
        "initial_scale", 0.0, "float", "initial", "starting value of `square_avg` (TF1 uses 1.0)",
        low=0.0, fit="finite", spellings=dict(optax="initial_scale"),
    ),
    Option(
        "state_storage", "native", "choice", "storage",
        "how the state is stored: \"native\" (the params' dtype), \"bfloat16\" (float32 params only: "
        "half the state's bytes; the update computes in float32 from the stored values and stores its "
        "result rounded to nearest even, as `torch.bfloat16` does; needs `ml_dtypes`, the `bfloat16` extra) or "
        "\"8bit\" (float32 params only: a quarter of the bytes and a little more, in blocks of 256 codes and a "
        "float32 scale, dequantised, stepped in float32 and requantised in one pass; see "
        "[docs/algorithm.md](algorithm.md))",
        choices=("native", "bfloat16", "8bit"),
    ),
    Option(
        "state_layout", "elementwise", "choice", "storage",
        "the shape of `square_avg`: \"elementwise\" (one value per element) or \"rowwise\" (one per row of "
        "each param, its first axis, a 1-D param's rows being its elements: `v <- beta * v + (1 - beta) * "
        "mean(g^2)` over the row, as FBGEMM's rowwise optimizers keep an embedding table's state; with "
        "state_storage='native', not centered; see [docs/algorithm.md](algorithm.md))",
        choices=("elementwise", "rowwise"),
    ),
    Option(
        "skip_nonfinite", False, "bool", "host",
        "a step whose grads hold a NaN or an infinity changes nothing and is counted in `skipped_steps`",
    ),
    Option(
        "dense_rows", False, "bool", "host",
        "`step_rows` replays, when a row is touched again, the zero-gradient steps it missed (closed "
        "form), so a sparse run equals a dense one up to rounding; off: lazy, a row's state decays only "
        "when it is touched (TensorFlow's sparse ops, torch's SparseAdam)",
    ),
    Option(
        "clip_global_norm", None, "optional", "host",
        "`max_norm` > 0, or None: scale every grad, as the kernel reads it, by "
        "`min(1, max_norm / (norm + 1e-6))`, `norm` the 2-norm over all grads "
        "(`torch.nn.utils.clip_grad_norm_`'s formula)",
        low=0.0, low_open=True,
    ),
    Option(
        "clip_value", None, "optional", "scalar",
        "`c` > 0, or None: clamp every grad element to `[-c, c]` as the kernel reads it "
        "(`torch.nn.utils.clip_grad_value_`); a NaN passes through",
        low=0.0, low_open=True, fit="nonzero", spellings=dict(keras="clipvalue"),
    ),
)  # fmt: skip

BY_NAME = {o.name: o for o in OPTIONS}
NAMES = tuple(BY_NAME)
DEFAULTS: "dict[str, Any]" = {o.name: o.default for o in OPTIONS}
#: The options a checkpoint stores as numbers / flags (the learning rate only when it is one).
FLOAT_OPTIONS = tuple(o.name for o in OPTIONS if o.kind == "float")
BOOL_OPTIONS = tuple(o.name for o in OPTIONS if o.kind == "bool")
#: The options that are off when None; a checkpoint stores them only when set.
OPTIONAL_OPTIONS = tuple(o.name for o in OPTIONS if o.kind == "optional")
#: The options that are one of a few strings; a checkpoint stores them as strings.
CHOICE_OPTIONS = tuple(o.name for o in OPTIONS if o.kind == "choice")
#: The options every front end takes by position before the keyword-only ones.
POSITIONAL = ("learning_rate", "beta", "epsilon")
#: Every state array any variant keeps, in PyTorch's names.
ALL_STATE_NAMES = ("square_avg", "grad_avg", "momentum_buffer")


def describe(indent=4, skip=POSITIONAL):
    """The table as numpy-docstring parameter entries (name, type, default, meaning, other
    libraries' spellings), as `fastrms.RMSprop`'s docstring lists them (a test checks it)."""
    pad = " " * indent
    lines = []
    for o in OPTIONS:
        if o.name in skip:
            continue
        kind = {"rate": "float or callable", "optional": "float or None", "choice": "str"}.get(o.kind, o.kind)
        spelled = ", ".join(f"{lib} `{n}`" for lib, n in o.spellings.items() if n != o.name)
        text = f"{o.doc[0].upper()}{o.doc[1:]}{f' ({spelled})' if spelled else ''}."
        lines.append(f"{pad}{o.name} : {kind}, default {o.default!r}")
        lines.append(textwrap.fill(text, 100, initial_indent=pad + "    ", subsequent_indent=pad + "    "))
    return "\n".join(lines)


#: The static type of each kind, for `typing_source`.
_TYPES = {"float": "float", "bool": "bool", "optional": "float | None"}


def _type(o):
    """The static type of option `o`, for `typing_source`."""
    if o.kind == "choice":
        return "Literal[" + ", ".join(repr(c) for c in o.choices).replace("'", '"') + "]"
    return _TYPES[o.kind]


def signature(arrays=()):
    """`(self, params, learning_rate, beta, epsilon, *, <arrays>, <every other option>)`
    with the table's defaults (`arrays`: keyword-only array arguments, default None): the
    NumPy optimizer's `__init__` signature, for `help()`, `inspect` and editors."""
    P = inspect.Parameter
    head = [P("self", P.POSITIONAL_OR_KEYWORD), P("params", P.POSITIONAL_OR_KEYWORD)]
    head += [P(n, P.POSITIONAL_OR_KEYWORD, default=DEFAULTS[n]) for n in POSITIONAL]
    head += [P(n, P.KEYWORD_ONLY, default=None) for n in arrays]
    head += [P(n, P.KEYWORD_ONLY, default=DEFAULTS[n]) for n in NAMES if n not in POSITIONAL]
    return inspect.Signature(head, return_annotation=None)


def typing_source():
    """The text of `fastrms/_typing.py`: the keyword-only options as a `TypedDict`, so
    that static checkers know every name and type of `**options` (`tests/test_typing.py`
    checks the file against this table; regenerate it with
    `python -c "import fastrms.core.options as o; print(o.typing_source(), end='')" > fastrms/_typing.py`)."""
    fields = []
    for o in OPTIONS:
        if o.name not in POSITIONAL:
            doc = f"{o.doc[0].upper()}{o.doc[1:]}; default `{o.default!r}`."
            text = textwrap.fill(f'"""{doc}"""', 116, initial_indent="    ", subsequent_indent="    ")
            fields.append(f"    {o.name}: {_type(o)}\n{text}")
    fields = "\n".join(fields)
    return (
        '"""The keyword-only options\' static types, generated from `fastrms.core.options.OPTIONS`\n'
        "(do not edit: `fastrms.core.options.typing_source()` writes this file, and a test checks it).\n"
        '"""\n\n'
        "from typing import Literal, TypedDict\n\n\n"
        "class Options(TypedDict, total=False):\n"
        '    """What `**options` of `RMSprop` and the other front ends may hold."""\n\n'
        f"{fields}\n"
    )


def aliases(library):
    """`{library's spelling: fastrms name}` for the options `library` spells otherwise."""
    return {o.spellings[library]: o.name for o in OPTIONS if o.spellings.get(library, o.name) != o.name}


#: Other libraries' names of fastrms's options, for the hint of an unknown keyword.
_FOREIGN = {"lr": "learning_rate", "alpha": "beta", "rho": "beta", "decay": "beta", "eps": "epsilon"}


def closest(name, names, foreign):
    """The option meant by an unknown keyword `name`: another library's spelling of one
    (`foreign`), or the closest of `names`, or None."""
    return foreign.get(name) or next(iter(difflib.get_close_matches(name, names, n=1)), None)


def resolve(given, who="RMSprop()"):
    """Every option: `given` (a dict of some) over the defaults. An unknown name is a
    TypeError, as Python gives for an unexpected keyword argument."""
    unknown = [k for k in given if k not in BY_NAME]
    if unknown:
        name = unknown[0]
        hint = closest(name, NAMES, _FOREIGN)
        said = f" Did you mean {hint!r}?" if hint else ""
        if name in _FOREIGN:
            said += f" For another library's names and defaults: RMSprop.like('torch', params, {name}=...)."
        raise TypeError(f"{who} got an unexpected keyword argument {name!r}.{said} Options are {list(NAMES)}")
    return {**DEFAULTS, **given}


def check_hyperparameters(h, dtypes=()):
    """Validate and normalise a dict of every option; returns a new dict. With `dtypes`
    (the params' dtypes), every number must also survive rounding to each (`check_fit`)."""
    out = {name: BY_NAME[name].check(h[name]) for name in NAMES}
    if out["nesterov"] and out["momentum"] == 0.0:
        raise ValueError("nesterov=True needs momentum > 0")
    if out["dense_rows"]:
        check_dense_rows(out)
    check_storage(out, dtypes)
    if out["clip_global_norm"] is not None and out["clip_value"] is not None:
        raise ValueError(
            "clip_global_norm and clip_value cannot both be set: the order of the two clips would be a guess; "
            "choose one"
        )
    check_fit(out, dtypes)
    return out


def check_storage(hyper, dtypes):
    """A state storage serves the params' dtypes its codec names (`bfloat16`: float32)."""
    codec = kernels.storage.CODECS[hyper["state_storage"]]
    if hyper["state_layout"] == "rowwise" and (codec is not kernels.storage.NATIVE or hyper["centered"]):
        raise ValueError(
            "state_layout='rowwise' keeps one square_avg value a row in the params' dtype: it needs "
            f"state_storage='native' (got {hyper['state_storage']!r}) and centered=False (a row's mean of g "
            f"is not a centring; got centered={hyper['centered']})"
        )
    if hyper["dense_rows"] and codec is not kernels.storage.NATIVE:
        raise ValueError(
            f"dense_rows=True needs state_storage='native': step_rows's row kernels keep the state in the "
            f"params' dtype (got state_storage={hyper['state_storage']!r})"
        )
    for dtype in dict.fromkeys(np.dtype(d) for d in dtypes):
        if codec.params is not None and dtype not in codec.params:
            served = " or ".join(str(d) for d in codec.params)
            raise ValueError(
                f"state_storage={hyper['state_storage']!r} keeps the state of {served} params; these params are "
                f"{dtype} (use state_storage='native')"
            )


def check_native_storage(hyper, who):
    """Refuse a `state_storage` other than "native", or rowwise state, in a front end
    (`who`) whose state arrays are the caller's, in the params' dtype and shape."""
    if BY_NAME["state_storage"].check(hyper["state_storage"]) != "native":
        raise ValueError(
            f"{who} keeps the state in the params' dtype; state_storage={hyper['state_storage']!r} is "
            "fastrms.RMSprop's (its state arrays are its own)"
        )
    if BY_NAME["state_layout"].check(hyper["state_layout"]) != "elementwise":
        raise ValueError(
            f"{who} keeps the state element by element; state_layout={hyper['state_layout']!r} is "
            "fastrms.RMSprop's (its state arrays are its own)"
        )


def check_dense_rows(hyper):
    """`dense_rows=True` needs a closed form for the zero-gradient steps a row missed:
    refuse coupled weight decay (the gradient `wd * p` is not zero) and a schedule where
    the learning rate enters that form (momentum with the lr outside the buffer, decoupled
    weight decay)."""
    if hyper["weight_decay"] and not hyper["decoupled_weight_decay"]:
        raise ValueError(
            "dense_rows=True cannot be combined with coupled weight_decay: the skipped steps' gradient "
            "weight_decay * p is not zero, so they have no closed form (use decoupled_weight_decay=True, "
            "or the lazy mode)"
        )
    if callable(hyper["learning_rate"]):
        if hyper["momentum"] and not hyper["lr_in_momentum"]:
            raise ValueError(
                "dense_rows=True with momentum (lr outside the buffer) needs a constant learning_rate: the "
                "skipped steps' drift sums lr_s * momentum^s over a schedule (use lr_in_momentum=True, or the "
                "lazy mode)"
            )
        if hyper["weight_decay"]:
            raise ValueError(
                "dense_rows=True with decoupled weight_decay needs a constant learning_rate: the skipped "
                "steps shrink the param by prod(1 - lr_s * weight_decay) over a schedule"
            )


def check_fit(hyper, dtypes):
    """Refuse options that the kernels, which round every scalar once to the arrays' dtype,
    would turn into 0, 1 or infinity: e.g. `epsilon=1e-46` is 0 in float32 (0/0 on a zero
    grad) and `learning_rate=1e39` is infinite there. Products the kernel forms
    (`1 - beta`, `learning_rate * weight_decay`) are checked too."""
    dtypes = tuple(dict.fromkeys(np.dtype(d) for d in dtypes))
    if not dtypes:
        return
    for o in OPTIONS:
        if o.fit and hyper[o.name] is not None and not (o.kind == "rate" and callable(hyper[o.name])):
            fits(o.name, hyper[o.name], dtypes, nonzero=o.fit == "nonzero", below_one=o.fit == "below_one")
    fits("1 - beta", 1.0 - hyper["beta"], dtypes, nonzero=True)
    if not callable(hyper["learning_rate"]):
        check_learning_rate_fit("learning_rate", hyper["learning_rate"], hyper["weight_decay"], dtypes)


def scheduled_lr(schedule, count, weight_decay, dtypes):
    """The learning rate a schedule gives at `count` (steps already taken), checked as a
    learning rate is: a real number (a 0-d array is taken), finite, >= 0, that survives
    rounding to each dtype. A schedule that raises OverflowError, returns a bool, a string or
    anything else is a ValueError/TypeError naming the count. Every front end calls this."""
    try:
        lr = schedule(count)
    except OverflowError as exc:
        raise ValueError(
            f"learning_rate schedule overflowed at count {count} ({exc}); expected a finite float"
        ) from None
    if isinstance(lr, np.ndarray) and lr.ndim == 0:
        lr = lr.item()
    if not _real_scalar(lr):
        raise TypeError(
            f"learning_rate schedule returned {type(lr).__name__} at count {count}; expected a real number "
            "(a float, a 0-d array or anything with __float__)"
        )
    try:
        lr = float(lr)
    except OverflowError:
        lr = math.inf
    except (TypeError, ValueError) as exc:
        raise TypeError(f"learning_rate schedule returned {type(lr).__name__} at count {count}: {exc}") from None
    if not (lr >= 0.0 and math.isfinite(lr)):
        raise ValueError(f"learning_rate schedule returned {lr!r} at count {count}; expected a finite float >= 0")
    check_learning_rate_fit(f"learning_rate (the schedule's value at count {count})", lr, weight_decay, dtypes)
    return lr


def _real_scalar(x):
    """A real number a schedule may return: a Python or NumPy real (not a bool), or any other
    0-d object with `__float__` (a JAX or torch 0-d array: optax's schedules return one)."""
    if isinstance(x, (bool, np.bool_, str, bytes)) or "bool" in str(getattr(x, "dtype", "")):
        return False
    if isinstance(x, Real):
        return True
    complex_ = getattr(getattr(x, "dtype", None), "kind", None) == "c"  # NumPy and JAX dtypes have a kind
    return hasattr(type(x), "__float__") and tuple(getattr(x, "shape", ())) == () and not complex_


def check_learning_rate_fit(name, lr, weight_decay, dtypes):
    """`lr` (and `lr * weight_decay`) must be finite in every dtype of `dtypes`."""
    fits(name, lr, dtypes)
    if weight_decay:
        fits(f"{name} * weight_decay", lr * weight_decay, dtypes)


def variant_key(hyper):
    """The compiled kernel variant (`fastrms.kernels.Variant`) the options select."""
    if hyper["momentum"]:
        mom = kernels.MOM_INSIDE if hyper["lr_in_momentum"] else kernels.MOM_OUTSIDE
    else:
        mom = kernels.MOM_NONE
    if hyper["weight_decay"]:
        wd = kernels.WD_DECOUPLED if hyper["decoupled_weight_decay"] else kernels.WD_COUPLED
    else:
        wd = kernels.WD_NONE
    return kernels.variant(hyper["centered"], wd, mom, hyper["nesterov"] and bool(hyper["momentum"]))


def options_for(key):
    """The inverse of `variant_key`: options (with `momentum=0.9` and
    `weight_decay=0.01` where the variant needs them) that select variant `key`."""
    opts = {"centered": key.centered}
    if key.mom_mode != kernels.MOM_NONE:
        opts.update(momentum=0.9, lr_in_momentum=key.mom_mode == kernels.MOM_INSIDE, nesterov=key.nesterov)
    if key.wd_mode != kernels.WD_NONE:
        opts.update(weight_decay=0.01, decoupled_weight_decay=key.wd_mode == kernels.WD_DECOUPLED)
    return opts


def scalars(hyper, lr, t):
    """The kernel's runtime scalars (`fastrms.kernels.Scalars`) for step `t` (1-based)
    at learning rate `lr`; `grad_scale` is the sign alone (a global-norm coefficient is
    folded in per step by the caller, `scalars._replace(grad_scale=...)`)."""
    eps = hyper["epsilon"]
    clip = hyper["clip_value"]
    return kernels.Scalars(
        lr,
        hyper["beta"],
        eps if hyper["eps_in_sqrt"] else 0.0,
        0.0 if hyper["eps_in_sqrt"] else eps,
        hyper["weight_decay"],
        hyper["momentum"],
        -1.0 if hyper["maximize"] else 1.0,
        1.0 - hyper["beta"] ** t if hyper["bias_correction"] else 1.0,
        math.inf if clip is None else clip,
    )


def formula(hyper):
    """The options that decide the update's formula: what a checkpoint must agree on."""
    out = {}
    for o in OPTIONS:
        if o.selects_variant and o.kind == "float":
            out[f"{o.name} > 0"] = hyper[o.name] > 0
        elif o.kind == "bool" and (o.role in ("variant", "scalar") or o.name == "dense_rows"):
            out[o.name] = hyper[o.name]  # dense_rows: the state holds per-row step counters
        elif o.role == "storage":
            out[o.name] = hyper[o.name]  # how the state arrays are stored
    return out
