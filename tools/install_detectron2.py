#!/usr/bin/env python
"""Install detectron2 v0.6 as pure Python into the running interpreter's site-packages.

The package registry has no detectron2 wheel; ``pb1-detectron2==0.6`` is the upstream v0.6 source
(Python files byte-identical to the v0.6 tag) without ``detectron2/layers/csrc``, so its setup.py cannot
build. This script downloads that sdist, checks its sha256 (and refuses to install on a mismatch), copies
its ``detectron2/`` package into site-packages (the PointRend/DeepLab ``projects`` are not needed:
qsegformers has its own point sampling and poly LR), applies the textual fixes of
``tools/detectron2_fixes.py`` to the copies (names that numpy >= 1.24 and Pillow >= 10 removed; listed in
``docs/detectron2_fixes.md``), checks that no removed name is left, and stops with an error if a fix does
not apply exactly or a name is left. It then writes a ``.dist-info`` so pip sees the install (recording the
digest of the fix list, so that a changed list reinstalls), and a placeholder ``detectron2/_C.py`` whose
attributes raise an ImportError naming what needs the compiled ops.

A detectron2 that is already importable and is not ours (e.g. upstream built from source) is kept.
Run with the target environment's python: ``.venv/bin/python tools/install_detectron2.py``.
"""
import argparse
import hashlib
import io
import shutil
import sys
import sysconfig
import tarfile
import urllib.request
from pathlib import Path

from detectron2_fixes import FIXES, FixError, apply_fixes, find_removed_names, fixes_digest

SDIST_URL = (
    "https://files.pythonhosted.org/packages/60/26/"
    "48f5bbb7ee492696a21da23303daeecdfe3942c498a70d34108acf63b2bd/pb1-detectron2-0.6.tar.gz"
)
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
DIST_NAME = "detectron2"
VERSION = "0.6"
MARKER = "qsegformers-pure-python"  # written into the dist-info INSTALLER file
FIXES_FILE = "qsegformers-fixes"  # dist-info file holding the digest of the applied fix list

PLACEHOLDER_C = '''"""Placeholder for detectron2's compiled ops (written by qsegformers' tools/install_detectron2.py).

This detectron2 is installed as pure Python. Mask2Former-style models need none of its compiled ops;
what does need them fails with an ImportError that names it.
"""
_NEEDED_BY = {
    "box_iou_rotated": "rotated boxes (detectron2.structures.RotatedBoxes IoU)",
    "nms_rotated": "rotated-box NMS",
    "roi_align_rotated_forward": "rotated ROIAlign",
    "roi_align_rotated_backward": "rotated ROIAlign",
    "deform_conv_forward": "deformable convolution (detectron2.layers.DeformConv)",
    "deform_conv_backward_input": "deformable convolution (detectron2.layers.DeformConv)",
    "deform_conv_backward_filter": "deformable convolution (detectron2.layers.DeformConv)",
    "modulated_deform_conv_forward": "modulated deformable convolution",
    "modulated_deform_conv_backward": "modulated deformable convolution",
    "InstanceAnnotation": "fast COCO evaluation (use COCOEvaluator(..., use_fast_impl=False))",
    "ImageEvaluationInstance": "fast COCO evaluation (use COCOEvaluator(..., use_fast_impl=False))",
    "COCOevalAccumulate": "fast COCO evaluation (use COCOEvaluator(..., use_fast_impl=False))",
    "COCOevalEvaluateImages": "fast COCO evaluation (use COCOEvaluator(..., use_fast_impl=False))",
}


def get_compiler_version():
    return "not built (pure-Python detectron2)"


def get_cuda_version():
    return "not built"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    what = _NEEDED_BY.get(name, "this operation")
    raise ImportError(
        f"detectron2 compiled op '{name}' is unavailable: detectron2 was installed as pure Python, "
        f"so {what} cannot run. Build detectron2 from source to use it."
    )
'''


def existing_detectron2():
    """Return (path, is_ours, fixes digest recorded by our install or "") of an importable detectron2,
    or (None, False, "")."""
    import importlib.metadata as md
    import importlib.util

    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        return None, False, ""
    path = Path(list(spec.submodule_search_locations)[0])
    try:
        dist = md.distribution(DIST_NAME)
        installer, digest = dist.read_text("INSTALLER") or "", dist.read_text(FIXES_FILE) or ""
    except md.PackageNotFoundError:
        installer, digest = "", ""
    return path, installer.strip() == MARKER, digest.strip()


def download(url: str, sha256: str, cache: Path) -> bytes:
    cache.mkdir(parents=True, exist_ok=True)
    cached = cache / url.rsplit("/", 1)[1]
    if cached.exists() and hashlib.sha256(cached.read_bytes()).hexdigest() == sha256:
        print(f"[detectron2] using cached {cached}")
        return cached.read_bytes()
    print(f"[detectron2] downloading {url}")
    with urllib.request.urlopen(url, timeout=120) as r:
        data = r.read()
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        sys.exit(
            f"[detectron2] REFUSING to install: sha256 of {url} is {got}, expected {sha256}. "
            "The sdist changed or the download is corrupt; do not install it."
        )
    cached.write_bytes(data)
    return data


def _installed_numpy_and_pil():
    """The numpy and PIL.Image modules of this environment, or None where one is not installed yet
    (the scan then uses only the built-in lists of removed names)."""
    try:
        import numpy
    except ImportError:
        numpy = None
    try:
        import PIL.Image as image
    except ImportError:
        image = None
    return numpy, image


def install(site: Path, data: bytes):
    pkg_dst = site / "detectron2"
    if pkg_dst.exists():
        shutil.rmtree(pkg_dst)
    files = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) < 3 or parts[1] != "detectron2" or not member.isfile():
                continue
            rel = Path(*parts[1:])
            dst = site / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(tar.extractfile(member).read())
            files.append(rel)
    try:
        fixed = apply_fixes(site)
    except FixError as e:
        shutil.rmtree(pkg_dst)
        sys.exit(f"[detectron2] REFUSING to install: {e}")
    left = find_removed_names(pkg_dst, *_installed_numpy_and_pil())
    if left:
        shutil.rmtree(pkg_dst)
        sys.exit(
            "[detectron2] REFUSING to install: names that numpy/Pillow removed are still used after the fixes:\n"
            + "\n".join(f"  {f.path}:{f.line}: {f.what}" for f in left)
            + "\nAdd a fix for each to FIXES in tools/detectron2_fixes.py (and to docs/detectron2_fixes.md)."
        )
    print(f"[detectron2] applied {len(FIXES)} fixes to {len(fixed)} files (docs/detectron2_fixes.md); "
          "no removed numpy/Pillow name is left")
    (pkg_dst / "_C.py").write_text(PLACEHOLDER_C)
    files.append(Path("detectron2/_C.py"))

    dist_info = site / f"{DIST_NAME}-{VERSION}.dist-info"
    if dist_info.exists():
        shutil.rmtree(dist_info)
    dist_info.mkdir()
    requires = [
        "Pillow>=7.1", "matplotlib", "pycocotools>=2.0.2", "termcolor>=1.1", "yacs>=0.1.8",
        "tabulate", "cloudpickle", "tqdm>4.29.0", "tensorboard", "fvcore<0.1.6,>=0.1.5",
        "iopath<0.1.10,>=0.1.7", "omegaconf>=2.1", "hydra-core>=1.1",
    ]
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\n"
        f"Name: {DIST_NAME}\nVersion: {VERSION}\n"
        "Summary: detectron2 v0.6 (pure Python, from pb1-detectron2 sdist; compiled ops unavailable)\n"
        + "".join(f"Requires-Dist: {r}\n" for r in requires)
    )
    (dist_info / "INSTALLER").write_text(MARKER + "\n")
    (dist_info / FIXES_FILE).write_text(fixes_digest() + "\n")
    (dist_info / "top_level.txt").write_text("detectron2\n")
    record = [f"{f.as_posix()},," for f in files]
    record += [f"{dist_info.name}/{n},," for n in ("METADATA", "INSTALLER", FIXES_FILE, "top_level.txt", "RECORD")]
    (dist_info / "RECORD").write_text("\n".join(record) + "\n")
    print(f"[detectron2] installed {len(files)} files into {pkg_dst} (+ _C placeholder, {dist_info.name})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "qsegformers"))
    parser.add_argument("--force", action="store_true", help="reinstall even if ours is present")
    args = parser.parse_args()

    path, ours, digest = existing_detectron2()
    if path is not None and not ours:
        print(f"[detectron2] keeping the detectron2 already importable at {path}")
        return
    if path is not None and ours and not args.force:
        if digest == fixes_digest():
            print(f"[detectron2] pure-Python detectron2 {VERSION} already installed at {path}")
            return
        print("[detectron2] the installed copy was made with another fix list: reinstalling")
    site = Path(sysconfig.get_paths()["purelib"])
    install(site, download(SDIST_URL, SDIST_SHA256, Path(args.cache)))


if __name__ == "__main__":
    main()
