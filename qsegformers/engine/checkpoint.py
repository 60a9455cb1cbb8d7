"""Safe checkpoint loading and atomic checkpoint writing (``QsegCheckpointer``).

Loading (``MODEL.ALLOW_PICKLE_WEIGHTS`` False, the default):

* ``.pth`` and other torch files: ``torch.load(weights_only=True)``, which only rebuilds tensors and
  plain containers; a file that needs anything else (a pickled object that could run code) is
  refused with a message naming the file and the opt-in key.
* ``.pkl`` (detectron2's model-zoo format, e.g. ``R-50.pkl`` and our converted weights): a restricted
  unpickler that only rebuilds numpy arrays, numpy scalars and plain containers.

With ``MODEL.ALLOW_PICKLE_WEIGHTS True`` both go through a full pickle load, after a warning that a
pickle can run arbitrary code: use it only for files from a source you trust. The opt-in is a config
key (not a command-line path heuristic) so that it is recorded in the ``config.yaml`` of the run.

Writing: every checkpoint and the ``last_checkpoint`` tag are written to a temporary file in the same
folder, flushed to disk and renamed over the target (``os.replace`` is atomic on POSIX), so a process
killed during a save leaves the previous file intact, never a truncated one.

Missing and unexpected keys are summarised grouped by module (``backbone.res2: 12 keys``) before
fvcore's detailed listing.
"""
import logging
import os
import pickle
import tempfile
from collections import Counter, OrderedDict
from typing import Dict, Iterable

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["QsegCheckpointer", "UnsafeCheckpointError", "safe_load_numpy_pickle", "group_keys_by_module"]

logger = logging.getLogger(__name__)

ALLOW_PICKLE_KEY = "MODEL.ALLOW_PICKLE_WEIGHTS"
LAST_CHECKPOINT_FILE = "last_checkpoint"
MODULE_DEPTH = 2  # "backbone.res2.0.conv1.weight" is summarised under "backbone.res2"
MOMENTUM_SUFFIX = "_momentum"  # Caffe2 blobs that are not weights
PYCLS_STATE_KEY = "model_state"  # weights of a pycls ``.pyth`` file
BN_COUNTER_SUFFIX = "num_batches_tracked"

# Globals a detectron2 ``.pkl`` of numpy arrays needs, and nothing else.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("builtins", "slice"),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint that needs more than tensors/arrays to load (it could run code when unpickled)."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"the pickle asks for {module}.{name}, which is not a numpy array type")


def safe_load_numpy_pickle(f) -> object:
    """Unpickle a file object that may only contain numpy arrays/scalars and plain containers."""
    return _NumpyOnlyUnpickler(f, encoding="latin1").load()


def group_keys_by_module(keys: Iterable[str], depth: int = MODULE_DEPTH) -> "OrderedDict[str, int]":
    """Count parameter names per module prefix of ``depth`` components, in first-seen order."""
    counts = Counter()
    order = []
    for key in keys:
        module = ".".join(key.split(".")[:depth]) if "." in key else key
        if module not in counts:
            order.append(module)
        counts[module] += 1
    return OrderedDict((m, counts[m]) for m in order)


def _atomic_write(path: str, write_fn) -> None:
    """Call ``write_fn(file)`` on a temporary file next to ``path``, then rename it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class QsegCheckpointer(DetectionCheckpointer):
    """detectron2's ``DetectionCheckpointer`` with safe loading and atomic saving (module docstring)."""

    def __init__(self, model, save_dir: str = "", *, allow_pickle: bool = False, save_to_disk=None,
                 **checkpointables):
        """
        Args:
            model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
            allow_pickle: load ``.pkl``/``.pth`` files with full pickle (``MODEL.ALLOW_PICKLE_WEIGHTS``).
        """
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.allow_pickle = allow_pickle

    @classmethod
    def from_config(cls, cfg, model, **kwargs) -> "QsegCheckpointer":
        return cls(model, cfg.OUTPUT_DIR, allow_pickle=cfg.MODEL.ALLOW_PICKLE_WEIGHTS, **kwargs)

    # ---- loading ----
    def _warn_pickle(self, filename: str) -> None:
        logger.warning(
            "%s is True: loading %s with full pickle, which can run arbitrary code. Only do this for "
            "files from a source you trust.", ALLOW_PICKLE_KEY, filename,
        )

    def _refuse(self, filename: str, err: Exception) -> None:
        raise UnsafeCheckpointError(
            f"Refusing to load {filename}: it contains objects other than tensors/arrays ({err}). Loading "
            f"it would unpickle arbitrary code. If you trust its source, set {ALLOW_PICKLE_KEY} True; "
            f"or re-save only its weights (torch.save(state_dict) of tensors)."
        ) from err

    def _load_pkl(self, filename: str) -> Dict:
        with self.path_manager.open(filename, "rb") as f:
            if self.allow_pickle:
                self._warn_pickle(filename)
                data = pickle.load(f, encoding="latin1")
            else:
                try:
                    data = safe_load_numpy_pickle(f)
                except UnsafeCheckpointError as err:
                    self._refuse(filename, err)
        if not isinstance(data, dict):
            raise ValueError(f"{filename} holds a {type(data).__name__}, not a dict of weights.")
        if "model" in data and "__author__" in data:
            logger.info("Reading a file from '%s'", data["__author__"])
            return data
        # Caffe2 / raw detectron2 format: a flat dict of blobs.
        data = data.get("blobs", data)
        data = {k: v for k, v in data.items() if not k.endswith(MOMENTUM_SUFFIX)}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}

    def _torch_load(self, filename: str):
        with self.path_manager.open(filename, "rb") as f:
            if self.allow_pickle:
                self._warn_pickle(filename)
                loaded = torch.load(f, map_location=torch.device("cpu"), weights_only=False)
            else:
                try:
                    loaded = torch.load(f, map_location=torch.device("cpu"), weights_only=True)
                except pickle.UnpicklingError as err:
                    self._refuse(filename, err)
        if not isinstance(loaded, dict):
            raise ValueError(f"{filename} holds a {type(loaded).__name__}, not a dict of weights.")
        return loaded

    def _load_file(self, filename: str) -> Dict:
        if filename.endswith(".pkl"):
            return self._load_pkl(filename)
        loaded = self._torch_load(filename)
        if filename.endswith(".pyth"):  # pycls format, converted as detectron2 does
            if PYCLS_STATE_KEY not in loaded:
                raise ValueError(f"{filename} is not a pycls checkpoint: it has no {PYCLS_STATE_KEY!r}.")
            weights = {k: v for k, v in loaded[PYCLS_STATE_KEY].items() if not k.endswith(BN_COUNTER_SUFFIX)}
            return {"model": weights, "__author__": "pycls", "matching_heuristics": True}
        return loaded if "model" in loaded else {"model": loaded}

    def _log_incompatible_keys(self, incompatible) -> None:
        for kind, keys in (("missing from the checkpoint", incompatible.missing_keys),
                           ("in the checkpoint but not in the model", incompatible.unexpected_keys)):
            if keys:
                grouped = ", ".join(f"{m} ({n})" for m, n in group_keys_by_module(keys).items())
                logger.warning("%d parameter(s) %s, by module: %s", len(keys), kind, grouped)
        super()._log_incompatible_keys(incompatible)

    # ---- saving ----
    def save(self, name: str, **kwargs) -> None:
        """Write ``save_dir/name.pth`` atomically, then tag it in ``last_checkpoint`` (atomically)."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, LAST_CHECKPOINT_FILE)
        _atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

