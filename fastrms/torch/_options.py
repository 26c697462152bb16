"""torch.optim.RMSprop's param-group options as fastrms's: the names torch gives them (`lr`,
`alpha`, `eps`), its capabilities the fused CPU step refuses (`capturable`,
`differentiable`), and torch's own phrasing of a bad value."""

import torch

from ..core import options as O

#: torch's names for the options it shares with fastrms (the rest are the same name).
TORCH_NAMES = {"learning_rate": "lr", "beta": "alpha", "epsilon": "eps"}
#: torch.optim.RMSprop's own words for a bad value, kept in front of fastrms's reason.
TORCH_PHRASES = {
    "lr": "Invalid learning rate: {}",
    "eps": "Invalid epsilon value: {}",
    "momentum": "Invalid momentum value: {}",
    "weight_decay": "Invalid weight_decay value: {}",
    "alpha": "Invalid alpha value: {}",
}


def hyperparameters(cache, group, where, dtypes, own):
    """A torch param group's options as fastrms's, checked for `dtypes` (cached in `cache`
    per distinct set; `own`: fastrms's own options, `dense_rows`, `state_storage` and
    `state_layout`, the optimizer's); a bad value raises torch's own words first, naming the group
    (`where`), then fastrms's reason in torch's names."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where}: Tensor lr must be 1-element")
        lr = lr.item()
    if group["capturable"]:
        raise ValueError(f"{where}: capturable=True (CUDA graphs) is not supported by the fused CPU step")
    if group["differentiable"]:
        raise ValueError(f"{where}: differentiable=True is not supported: the fused step is not differentiable")
    key = (lr, group["alpha"], group["eps"], group["weight_decay"], group["momentum"], group["centered"],
           group["maximize"], dtypes)  # fmt: skip
    hyper = cache.get(key)
    if hyper is None:
        given = {
            "learning_rate": lr,
            "beta": group["alpha"],
            "epsilon": group["eps"],
            "weight_decay": group["weight_decay"],
            "momentum": group["momentum"],
            "centered": group["centered"],
            "maximize": group["maximize"],
            **own,
        }
        try:
            hyper = O.check_hyperparameters(O.resolve(given), dtypes)
        except (TypeError, ValueError) as exc:
            message = str(exc)
            for ours, theirs in TORCH_NAMES.items():
                message = message.replace(ours, theirs)
            message = message.replace(  # torch's weight decay is the coupled one; there is no other here
                "use decoupled_weight_decay=True, or the lazy mode",
                "fastrms.torch has torch's coupled weight decay only: use dense_rows=False, the lazy mode, or "
                "weight_decay=0",
            )
            option = message.split(" ", 1)[0]
            if isinstance(exc, ValueError) and option in TORCH_PHRASES:
                value = lr if option == "lr" else group[option]
                message = f"{TORCH_PHRASES[option].format(value)} ({message})"
            raise type(exc)(f"{where}: {message}") from None
        if len(cache) > 64:
            cache.clear()
        cache[key] = hyper
    return hyper
