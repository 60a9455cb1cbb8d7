"""Non-finite loss detection, shared by training (``engine.nan_guard``) and the benchmarks (``utils.benchmark``)."""
import math
from typing import Dict, List

import torch
from detectron2.utils import comm

__all__ = ["NonFiniteLossError", "non_finite_terms", "check_losses_finite"]


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite (the message names the iteration and the terms)."""


def non_finite_terms(loss_dict: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """The loss terms (name -> value) whose value is NaN or +-inf."""
    values = {name: float(value.detach().sum()) for name, value in loss_dict.items()}
    return {name: value for name, value in values.items() if not math.isfinite(value)}


def check_losses_finite(loss_dict: Dict[str, torch.Tensor], iteration: int) -> None:
    """Raise :class:`NonFiniteLossError` on every rank if any rank has a non-finite loss term.

    Must be called by all ranks at the same point (it runs a collective when there are several).
    """
    bad = non_finite_terms(loss_dict)
    if comm.get_world_size() > 1:
        device = next(iter(loss_dict.values())).device if loss_dict else torch.device("cpu")
        flag = torch.tensor([float(bool(bad))], device=device)
        torch.distributed.all_reduce(flag)
        if flag.item() == 0:
            return
        reports: List[Dict[str, float]] = comm.all_gather(bad)
    elif not bad:
        return
    else:
        reports = [bad]
    details = "; ".join(
        f"rank {rank}: " + ", ".join(f"{name} = {value}" for name, value in sorted(terms.items()))
        for rank, terms in enumerate(reports) if terms
    )
    raise NonFiniteLossError(
        f"Non-finite loss at iteration {iteration} ({details}). Training stopped before the optimizer "
        f"step: these weights were not updated and not saved; the last good checkpoint is the one named "
        f"in OUTPUT_DIR/last_checkpoint. Lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS or check the "
        f"data of this iteration, then resume."
    )
