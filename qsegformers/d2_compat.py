"""Workarounds for detectron2 v0.6 on current Python/torch, applied once at import.

Each one fixes a hard failure listed in ``shared/detectron2_v06_notes.md`` without editing detectron2,
and each is a no-op on an upstream detectron2 built from source:

* ``pkg_resources`` is gone from new setuptools but ``detectron2.model_zoo`` imports it: a minimal
  module providing ``resource_filename`` is registered when the real one is missing.
* ``collect_env_info`` (called by ``default_setup``) breaks on the placeholder ``detectron2._C`` of a
  pure-Python install: it is wrapped to report the ops as not built.
* ``detectron2.export`` imports caffe2 in its ``__init__``; ``import_export()`` registers the package
  without running that ``__init__`` so its ``flatten``/``torchscript`` helpers stay usable.
"""
import importlib.resources
import os
import sys
import types

__all__ = ["import_export"]


def _install_pkg_resources_shim():
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda pkg, name: str(importlib.resources.files(pkg).joinpath(name))
        sys.modules["pkg_resources"] = shim


def _c_is_placeholder() -> bool:
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return _C.__file__.endswith(".py")


def _wrap_collect_env():
    import detectron2.engine.defaults as defaults
    from detectron2.utils import collect_env

    if getattr(defaults.collect_env_info, "_qsegformers_wrapped", False) or not _c_is_placeholder():
        return

    def collect_env_info():
        # Hide the placeholder _C so detectron2 reports "not built" instead of raising.
        saved = sys.modules.get("detectron2._C")
        sys.modules["detectron2._C"] = None
        try:
            return collect_env.collect_env_info()
        finally:
            if saved is None:
                sys.modules.pop("detectron2._C", None)
            else:
                sys.modules["detectron2._C"] = saved

    collect_env_info._qsegformers_wrapped = True
    defaults.collect_env_info = collect_env_info


def import_export():
    """Return ``detectron2.export`` without running its caffe2-importing ``__init__``."""
    import detectron2

    if "detectron2.export" not in sys.modules:
        pkg = types.ModuleType("detectron2.export")
        pkg.__path__ = [os.path.join(os.path.dirname(detectron2.__file__), "export")]
        sys.modules["detectron2.export"] = pkg
        detectron2.export = pkg
        from detectron2.export.flatten import TracingAdapter

        pkg.TracingAdapter = TracingAdapter
    return sys.modules["detectron2.export"]


_install_pkg_resources_shim()
_wrap_collect_env()
