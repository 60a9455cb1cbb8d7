"""tools/install_detectron2.py + tools/detectron2_fixes.py: the copied detectron2 v0.6 has no name that
numpy >= 1.24 / Pillow >= 10 removed, and the listed fixes are exactly what changed (docs/detectron2_fixes.md)."""
import hashlib
import importlib.metadata
import importlib.util
import io
import re
import sys
import tarfile
import types
from pathlib import Path

import detectron2
import numpy
import PIL.Image
import pytest

pytestmark = pytest.mark.smoke

REPO = Path(__file__).resolve().parents[2]


def _load_tool(name):
    """Import tools/<name>.py under its own name (install_detectron2 imports detectron2_fixes by name)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


fixes = _load_tool("detectron2_fixes")
installer = _load_tool("install_detectron2")
INSTALLED = Path(detectron2.__file__).parent
OURS = installer.existing_detectron2()[1]


@pytest.fixture(scope="module")
def sdist_files():
    """{relative path: text} of the pristine ``detectron2/**/*.py`` in the cached v0.6 sdist."""
    cached = Path.home() / ".cache" / "qsegformers" / installer.SDIST_URL.rsplit("/", 1)[1]
    if not cached.exists():
        pytest.skip(f"{cached} is not there (setup.sh downloads it when it installs detectron2)")
    data = cached.read_bytes()
    assert hashlib.sha256(data).hexdigest() == installer.SDIST_SHA256
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) >= 3 and parts[1] == "detectron2" and member.name.endswith(".py"):
                files[Path(*parts[1:]).as_posix()] = tar.extractfile(member).read().decode("utf-8")
    return files


def _write_tree(root: Path, files: dict) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return root


def test_installed_detectron2_uses_no_removed_name():
    # Also names missing from the numpy / Pillow installed here (numpy 2 on the current stack).
    assert fixes.find_removed_names(INSTALLED, numpy, PIL.Image) == []


def test_installed_files_are_the_sdist_with_exactly_the_listed_fixes(sdist_files):
    if not OURS:
        pytest.skip(f"detectron2 at {INSTALLED} was not installed by tools/install_detectron2.py")
    site = INSTALLED.parent
    changed = {f.path for f in fixes.FIXES}
    for rel, pristine in sdist_files.items():
        expected = fixes.apply_fixes_to_text(rel, pristine) if rel in changed else pristine
        assert (site / rel).read_text(encoding="utf-8") == expected, rel
    assert changed <= set(sdist_files)
    recorded = importlib.metadata.distribution("detectron2").read_text(installer.FIXES_FILE).strip()
    assert recorded == fixes.fixes_digest()


def test_scan_of_the_pristine_sources_matches_a_line_grep_and_the_fixes_clear_it(sdist_files, tmp_path):
    """The AST scan agrees with a plain regex over code lines on the real v0.6 sources, and after the
    fixes nothing is left."""
    pattern = re.compile(r"\bnp\.(bool|int|float|str)\b(?!\w)|\bImage\.(LINEAR|CUBIC|ANTIALIAS)\b|np\.array\([^)]*copy=False")
    grepped = {(rel, i) for rel, text in sdist_files.items()
               for i, line in enumerate(text.splitlines(), 1) if pattern.search(line.split("#")[0])}
    pristine = _write_tree(tmp_path / "pristine", sdist_files)
    scanned = {(f.path, f.line) for f in fixes.find_removed_names(pristine / "detectron2", numpy, PIL.Image)}
    assert scanned == grepped
    assert len(grepped) == 20  # detectron2 v0.6: 20 such code lines in 9 files (grep, comments excluded)
    fixed = _write_tree(tmp_path / "fixed", sdist_files)
    assert fixes.apply_fixes(fixed) == sorted({f.path for f in fixes.FIXES})
    assert fixes.find_removed_names(fixed / "detectron2", numpy, PIL.Image) == []


def test_scanner_sees_through_aliases_and_ignores_comments_and_strings():
    source = "\n".join([
        "import numpy as onp",                       # 1
        "import PIL",                                # 2
        "from PIL import Image as Img",              # 3
        "from numpy import float_, float64",         # 4
        "a = onp.float(1) + onp.float64(1)",         # 5
        "b = Img.ANTIALIAS, Img.BILINEAR",           # 6
        "c = PIL.Image.LINEAR",                      # 7
        "d = onp.array(a, copy=False)",              # 8
        "e = onp.array(a, copy=True), onp.asarray(a)",  # 9
        "f = 1  # onp.bool in a comment",            # 10
        "g = 'onp.int in a string'",                 # 11
        "h = onp.gone_in_this_numpy",                # 12
    ])
    found = [(f.line, f.what) for f in fixes.find_removed_names_in_source(source)]
    assert found == [(4, "from numpy import float_"), (5, "onp.float"), (6, "Img.ANTIALIAS"),
                     (7, "PIL.Image.LINEAR"), (8, "onp.array(..., copy=False)")]
    fake_numpy = types.SimpleNamespace(float64=float, array=None, asarray=None)
    found = [f.what for f in fixes.find_removed_names_in_source(source, numpy_module=fake_numpy)]
    assert "onp.gone_in_this_numpy" in found and "onp.float64" not in found


def test_a_fix_that_does_not_match_exactly_fails_loudly(tmp_path):
    fix = fixes.Fix("pkg/m.py", "np.bool)", "bool)", 2, "test")
    target = tmp_path / "pkg" / "m.py"
    target.parent.mkdir()
    for text, found in (("x.astype(np.bool)\n", 1), ("(np.bool)(np.bool)(np.bool)\n", 3), ("bool\n", 0)):
        target.write_text(text)
        with pytest.raises(fixes.FixError, match=rf"pkg/m\.py: expected 2 occurrence\(s\) of 'np\.bool\)', found {found}"):
            fixes.apply_fixes(tmp_path, [fix])
        assert target.read_text() == text
    target.write_text("a(np.bool) b(np.bool)\n")
    assert fixes.apply_fixes(tmp_path, [fix]) == ["pkg/m.py"]
    assert target.read_text() == "a(bool) b(bool)\n"
    prefix = fixes.Fix("pkg/m.py", "dtype=np.int", "dtype=int", 1, "test")
    target.write_text("a(dtype=np.int64)\n")  # a longer name that starts with the old text is not a match
    with pytest.raises(fixes.FixError, match="found 0"):
        fixes.apply_fixes(tmp_path, [prefix])
    target.write_text("a(dtype=np.int64, b=dtype=np.int)\n")
    fixes.apply_fixes(tmp_path, [prefix])
    assert target.read_text() == "a(dtype=np.int64, b=dtype=int)\n"
    with pytest.raises(fixes.FixError, match="pkg/missing.py: file not found"):
        fixes.apply_fixes(tmp_path, [fixes.Fix("pkg/missing.py", "a", "b", 1, "test")])


def test_install_refuses_sources_the_fixes_do_not_match(tmp_path, sdist_files):
    """An sdist whose build.py no longer has the old text: the install exits and leaves no copy behind."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for rel, text in sdist_files.items():
            if rel == "detectron2/data/build.py":
                text = text.replace("dtype=np.int", "dtype=np.int64")
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"pb1-detectron2-0.6/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SystemExit, match=r"REFUSING to install: detectron2/data/build\.py: expected 2 .*found 0"):
        installer.install(tmp_path, buf.getvalue())
    assert not (tmp_path / "detectron2").exists() and not list(tmp_path.glob("*.dist-info"))


def test_the_docs_table_lists_exactly_the_fixes():
    rows = []
    for line in (REPO / "docs" / "detectron2_fixes.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("| `detectron2/"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows.append((cells[0].strip("`"), cells[1][1:-1], cells[2][1:-1], int(cells[3])))
    assert rows == [(f.path, f.old, f.new, f.count) for f in fixes.FIXES]
