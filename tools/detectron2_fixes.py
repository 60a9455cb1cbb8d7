"""The textual fixes that make the copied detectron2 v0.6 run on numpy >= 1.24 (up to 2.x) and Pillow >= 10.

detectron2 v0.6 uses names that numpy 1.24 (``np.bool``, ``np.int``, ``np.float``, ``np.str``) and Pillow 10
(``Image.LINEAR``) removed, and ``np.array(..., copy=False)``, whose meaning numpy 2 changed (it now raises
when a copy is needed). ``tools/install_detectron2.py`` copies detectron2 into site-packages and then
applies ``FIXES`` to the copies: each replaces an exact old text, which must occur exactly ``count``
times, by a new text with the same meaning on every supported numpy/Pillow (the removed aliases were the
builtins ``bool``/``int``/``float``/``str`` and ``Image.BILINEAR``; ``np.asarray`` is what ``copy=False``
meant before numpy 2). ``find_removed_names`` then scans the installed package, and the install fails if
anything is left. ``docs/detectron2_fixes.md`` lists the same fixes (a test keeps the two equal).

Nothing here touches numpy or PIL at import time.
"""
import ast
import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

__all__ = [
    "Fix", "FIXES", "FixError", "REMOVED_NUMPY_NAMES", "REMOVED_PIL_IMAGE_NAMES", "Finding",
    "apply_fixes", "apply_fixes_to_text", "find_removed_names", "find_removed_names_in_source",
    "fixes_digest",
]

# numpy names removed in 1.24 (the builtin-type aliases) and 2.0 (NEP 52), plus ``long``, which numpy 2 brought
# back with another meaning (C long instead of Python int).
REMOVED_NUMPY_NAMES = frozenset({
    "bool", "int", "float", "complex", "object", "str", "unicode", "long",
    "bool8", "int0", "uint0", "object0", "str0", "bytes0", "void0", "float_", "complex_", "longfloat",
    "singlecomplex", "cfloat", "longcomplex", "clongfloat", "string_", "unicode_",
    "NaN", "Inf", "Infinity", "NINF", "PINF", "NZERO", "PZERO", "infty",
    "product", "cumproduct", "sometrue", "alltrue", "asscalar", "asfarray", "round_", "msort",
    "find_common_type", "cast", "mat", "safe_eval", "set_string_function", "source", "lookfor", "who",
    "deprecate", "deprecate_with_doc", "disp", "issubclass_", "issctype", "issubsctype", "maximum_sctype",
    "obj2sctype", "sctype2char", "sctypes", "recfromcsv", "recfromtxt", "geterrobj", "seterrobj",
    "fastCopyAndTranspose", "compat", "byte_bounds", "in1d", "row_stack", "trapz",
})
# PIL.Image names removed in Pillow 10 (aliases of BILINEAR, BICUBIC and LANCZOS).
REMOVED_PIL_IMAGE_NAMES = frozenset({"LINEAR", "CUBIC", "ANTIALIAS"})

_INT = "``np.int`` was the builtin ``int`` (removed in numpy 1.24)"
_FLOAT = "``np.float`` was the builtin ``float`` (removed in numpy 1.24)"
_BOOL = "``np.bool`` was the builtin ``bool`` (removed in numpy 1.24)"
_STR = "``np.str`` was the builtin ``str`` (removed in numpy 1.24)"
_TENSOR = ("numpy 2 warns (DeprecationWarning, on every image) when ``np.array`` converts a torch tensor, whose "
           "``__array__`` takes no ``copy`` argument; ``np.asarray`` gives the same array without asking for it")


@dataclasses.dataclass(frozen=True)
class Fix:
    """Replace ``old`` by ``new`` in ``path`` (relative to site-packages); ``old`` occurs exactly ``count`` times."""

    path: str
    old: str
    new: str
    count: int
    why: str


FIXES: Tuple[Fix, ...] = (
    Fix("detectron2/data/build.py", "dtype=np.int", "dtype=int", 2, _INT),
    Fix("detectron2/data/datasets/pascal_voc.py", "dtype=np.str)", "dtype=str)", 1, _STR),
    Fix("detectron2/data/transforms/transform.py", "interp=Image.LINEAR", "interp=Image.BILINEAR", 1,
        "``Image.LINEAR`` was ``Image.BILINEAR`` (removed in Pillow 10)"),
    Fix("detectron2/evaluation/coco_evaluation.py", 'np.array(mask[:, :, None], order="F", dtype="uint8")',
        'np.asarray(mask[:, :, None], order="F", dtype="uint8")', 1, _TENSOR),
    Fix("detectron2/evaluation/pascal_voc_evaluation.py",
        'np.array([x["difficult"] for x in R]).astype(np.bool)',
        'np.array([x["difficult"] for x in R]).astype(bool)', 1, _BOOL),
    Fix("detectron2/evaluation/sem_seg_evaluation.py", "np.array(output, dtype=np.int)",
        "np.asarray(output, dtype=int)", 1,
        _INT + "; and " + _TENSOR),
    Fix("detectron2/evaluation/sem_seg_evaluation.py", "np.array(Image.open(f), dtype=np.int)",
        "np.array(Image.open(f), dtype=int)", 1, _INT),
    Fix("detectron2/evaluation/sem_seg_evaluation.py", "dtype=np.float)", "dtype=float)", 2, _FLOAT),
    Fix("detectron2/evaluation/sem_seg_evaluation.py", ".astype(np.float)", ".astype(float)", 3, _FLOAT),
    Fix("detectron2/layers/mask_ops.py", "np.array(mask, copy=False)", "np.asarray(mask)", 1,
        "numpy 2 made ``copy=False`` raise when a copy is needed; ``np.asarray`` copies only if needed, "
        "as ``copy=False`` did before"),
    Fix("detectron2/structures/masks.py", ".astype(np.bool)", ".astype(bool)", 2, _BOOL),
    Fix("detectron2/structures/masks.py", "dtype=np.bool)", "dtype=bool)", 1, _BOOL),
    Fix("detectron2/utils/video_visualizer.py", "dtype=np.bool)", "dtype=bool)", 1, _BOOL),
    Fix("detectron2/utils/visualizer.py", ".astype(np.bool)", ".astype(bool)", 3, _BOOL),
)


class FixError(RuntimeError):
    """A fix whose old text does not occur exactly the expected number of times (the sources changed)."""


@dataclasses.dataclass(frozen=True)
class Finding:
    """One use of a removed name: ``path`` (relative to the scanned root), 1-based ``line``, what was used."""

    path: str
    line: int
    what: str


def fixes_digest(fixes: Iterable[Fix] = FIXES) -> str:
    """sha256 of the fix list, recorded in the install so that a changed list triggers a reinstall."""
    text = "\n".join(f"{f.path}\0{f.old}\0{f.new}\0{f.count}" for f in fixes)
    return hashlib.sha256(text.encode()).hexdigest()


def _token_pattern(old: str) -> "re.Pattern":
    """``old`` as whole tokens: ``dtype=np.int`` does not match inside ``dtype=np.int64``."""
    word = re.compile(r"\w")
    return re.compile(("(?<!\\w)" if word.match(old[0]) else "") + re.escape(old)
                      + ("(?!\\w)" if word.match(old[-1]) else ""))


def apply_fixes_to_text(path: str, text: str, fixes: Iterable[Fix] = FIXES) -> str:
    """Return ``text`` (the content of ``path``) with the fixes for ``path`` applied, in order. An old text
    is matched as whole tokens (never as the start of a longer name).

    Raises:
        FixError: an old text occurs a number of times other than its ``count``.
    """
    for fix in fixes:
        if fix.path != path:
            continue
        pattern = _token_pattern(fix.old)
        found = len(pattern.findall(text))
        if found != fix.count:
            raise FixError(
                f"{fix.path}: expected {fix.count} occurrence(s) of {fix.old!r}, found {found}. The detectron2 "
                "sources are not the v0.6 ones the fix list in tools/detectron2_fixes.py was written for: "
                "update that entry (and docs/detectron2_fixes.md) to the new text."
            )
        text = pattern.sub(lambda _: fix.new, text)
    return text


def apply_fixes(site: Path, fixes: Iterable[Fix] = FIXES) -> List[str]:
    """Apply ``fixes`` to the files under ``site`` (a site-packages folder) in place.

    Returns:
        The relative paths of the changed files, sorted.

    Raises:
        FixError: a file is missing, or an old text does not occur exactly ``count`` times (nothing is written
            to that file then).
    """
    fixes = tuple(fixes)
    changed = []
    for path in sorted({f.path for f in fixes}):
        target = Path(site) / path
        if not target.is_file():
            raise FixError(f"{path}: file not found under {site}; the fix list does not match these sources")
        old = target.read_text(encoding="utf-8")
        new = apply_fixes_to_text(path, old, fixes)
        target.write_text(new, encoding="utf-8")
        changed.append(path)
    return changed


def _import_aliases(tree: ast.AST):
    """Names bound to numpy, to PIL.Image and to PIL in a module."""
    numpy_names, image_names, pil_names = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "numpy":
                    numpy_names.add(alias.asname or "numpy")
                elif alias.name == "PIL.Image":
                    (image_names if alias.asname else pil_names).add(alias.asname or "PIL")
                elif alias.name == "PIL":
                    pil_names.add(alias.asname or "PIL")
        elif isinstance(node, ast.ImportFrom) and node.module == "PIL":
            image_names.update(a.asname or a.name for a in node.names if a.name == "Image")
    return numpy_names, image_names, pil_names


def _removed(name: str, removed: frozenset, module) -> bool:
    return name in removed or (module is not None and not hasattr(module, name))


def find_removed_names_in_source(source: str, path: str = "<string>", numpy_module=None,
                                 image_module=None) -> List[Finding]:
    """Uses of removed numpy / PIL.Image names in one module's source (comments and strings are not code).

    Flagged: ``np.X`` / ``Image.X`` / ``PIL.Image.X`` (whatever the import alias) and ``from numpy import X``
    where X is in ``REMOVED_NUMPY_NAMES`` / ``REMOVED_PIL_IMAGE_NAMES`` or, when ``numpy_module`` /
    ``image_module`` is given, is missing from that installed module; and ``np.array(..., copy=False)``.
    """
    tree = ast.parse(source, filename=path)
    numpy_names, image_names, pil_names = _import_aliases(tree)
    findings = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "numpy":
            for alias in node.names:
                if _removed(alias.name, REMOVED_NUMPY_NAMES, numpy_module):
                    findings.append(Finding(path, node.lineno, f"from numpy import {alias.name}"))
        elif isinstance(node, ast.Attribute):
            base = node.value
            if isinstance(base, ast.Name) and base.id in numpy_names:
                if _removed(node.attr, REMOVED_NUMPY_NAMES, numpy_module):
                    findings.append(Finding(path, node.lineno, f"{base.id}.{node.attr}"))
            elif (isinstance(base, ast.Name) and base.id in image_names) or (
                    isinstance(base, ast.Attribute) and base.attr == "Image"
                    and isinstance(base.value, ast.Name) and base.value.id in pil_names):
                if _removed(node.attr, REMOVED_PIL_IMAGE_NAMES, image_module):
                    findings.append(Finding(path, node.lineno, f"{ast.unparse(base)}.{node.attr}"))
        elif isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == "array" and isinstance(func.value, ast.Name)
                    and func.value.id in numpy_names
                    and any(k.arg == "copy" and isinstance(k.value, ast.Constant) and k.value.value is False
                            for k in node.keywords)):
                findings.append(Finding(path, node.lineno, f"{func.value.id}.array(..., copy=False)"))
    return sorted(findings, key=lambda f: (f.line, f.what))


def find_removed_names(package_dir: Path, numpy_module=None, image_module=None,
                       relative_to: Optional[Path] = None) -> List[Finding]:
    """``find_removed_names_in_source`` over every ``*.py`` file under ``package_dir``.

    Paths in the findings are relative to ``relative_to`` (default: the parent of ``package_dir``, so they
    read ``detectron2/...`` like ``Fix.path``).
    """
    package_dir = Path(package_dir)
    base = Path(relative_to) if relative_to is not None else package_dir.parent
    findings = []
    for file in sorted(package_dir.rglob("*.py")):
        rel = file.relative_to(base).as_posix()
        findings += find_removed_names_in_source(file.read_text(encoding="utf-8"), rel, numpy_module,
                                                 image_module)
    return findings
