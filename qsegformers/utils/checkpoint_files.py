"""Reading source checkpoints and writing detectron2 checkpoints, shared by the ``tools/convert_*`` scripts."""
import pickle
from typing import Dict

import torch

__all__ = ["AUTHOR", "load_flat_state_dict", "save_d2_checkpoint"]

AUTHOR = "qsegformers"
# Training frameworks wrap the weights in one of these keys.
WRAPPER_KEYS = ("state_dict", "model")
DDP_PREFIX = "module."


def load_flat_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``) or ``.safetensors`` into a flat
    ``{name: tensor}`` dict, without a ``state_dict``/``model`` wrapper or a DDP ``module.`` prefix."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state_dict = load_file(path)
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in WRAPPER_KEYS:
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    return {k[len(DDP_PREFIX):] if k.startswith(DDP_PREFIX) else k: v for k, v in state_dict.items()}


def save_d2_checkpoint(state_dict: Dict[str, torch.Tensor], path: str, author: str = AUTHOR) -> None:
    """Write ``state_dict`` as a detectron2 ``.pkl`` (numpy arrays) or ``.pth`` (tensors), with
    ``matching_heuristics`` on so ``DetectionCheckpointer`` matches names by suffix."""
    if path.endswith(".pkl"):
        model = {k: v.cpu().numpy() for k, v in state_dict.items()}
        with open(path, "wb") as f:
            pickle.dump({"model": model, "__author__": author, "matching_heuristics": True}, f)
    elif path.endswith(".pth"):
        torch.save({"model": state_dict, "__author__": author, "matching_heuristics": True}, path)
    else:
        raise ValueError(f"Output {path!r} must end in .pkl or .pth")
