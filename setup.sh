#!/usr/bin/env bash
# qsegformers set-up: installs everything the project needs, by default into a virtual environment in
# the repository. Idempotent: a second run checks a stamp and the imports, and changes nothing.
#
# Usage (README, "Set-up on other stacks"):
#   bash setup.sh                         .venv with the stack requirements.txt picks for the Python version
#                                         (3.11: the pinned stack; 3.12/3.13: the current stack)
#   QSEG_STACK=current bash setup.sh      .venv-current with the current stack (numpy 2, newest Pillow),
#                                         also on Python 3.11 (requirements-current.txt)
#   QSEG_ENV=system bash setup.sh         into the environment of `python3` instead (an activated venv or
#                                         conda env, a container's Python): its torch/torchvision are kept
#   QSEG_PYTHON=python3.12 bash setup.sh  the interpreter to create the venv with (or, with QSEG_ENV=system,
#                                         whose environment to install into)
#   QSEG_VENV=DIR bash setup.sh           another venv folder
#   FORCE=1 bash setup.sh                 reinstall even if the stamp matches
set -euo pipefail
cd "$(dirname "$0")"
start=$(date +%s)
say() { echo "[setup] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

QSEG_ENV=${QSEG_ENV:-venv}              # venv: a virtual environment in the repo; system: the current one
QSEG_STACK=${QSEG_STACK:-auto}          # auto: by Python version (requirements.txt); pinned; current
QSEG_PYTHON=${QSEG_PYTHON:-python3}     # interpreter that creates the venv, or whose environment is used
case "$QSEG_STACK" in
  auto|pinned) REQ=requirements.txt ;;
  current) REQ=requirements-current.txt ;;
  *) die "QSEG_STACK=$QSEG_STACK: use auto (default), pinned or current" ;;
esac

command -v "$QSEG_PYTHON" >/dev/null || die "QSEG_PYTHON=$QSEG_PYTHON: no such interpreter on PATH"
case "$QSEG_ENV" in
  venv)
    default_venv=.venv
    [ "$QSEG_STACK" = current ] && default_venv=.venv-current
    VENV=${QSEG_VENV:-$default_venv}
    PY="$VENV/bin/python"
    if [ ! -x "$PY" ]; then
      say "creating virtual environment $VENV with $("$QSEG_PYTHON" --version)"
      "$QSEG_PYTHON" -m venv "$VENV"
      echo '*' > "$VENV/.gitignore"  # as Python 3.13's venv does: git ignores the whole environment
    fi
    ;;
  system)
    PY=$(command -v "$QSEG_PYTHON")
    # PEP 668: a distribution's own Python refuses pip; a venv over it (--system-site-packages) reuses its torch.
    "$PY" - <<'PY' || die "$PY is managed by the operating system (PEP 668, EXTERNALLY-MANAGED): create a venv that sees its packages, e.g. 'python3 -m venv --system-site-packages ~/qseg-env && . ~/qseg-env/bin/activate', then run QSEG_ENV=system bash setup.sh again"
import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED"))
sys.exit(1 if managed and sys.prefix == sys.base_prefix else 0)
PY
    ;;
  *) die "QSEG_ENV=$QSEG_ENV: use venv (default) or system" ;;
esac

PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PREFIX=$("$PY" -c 'import sys; print(sys.prefix)')
if "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
  [ "$QSEG_STACK" = pinned ] && die "QSEG_STACK=pinned needs Python 3.11: numpy 1.23.5 and Pillow 9.5.0 have no wheels for Python $PYVER (leave QSEG_STACK unset: the current stack is chosen)"
  STACK=current
else
  STACK=pinned
  [ "$QSEG_STACK" = current ] && STACK=current
fi
say "Python $PYVER ($PY), $STACK stack from $REQ, environment $PREFIX"

# pip --isolated ignores the machine's pip.conf and PIP_* variables, in particular the local folder of
# CPU-only torch wheels, which breaks the registry's torchvision.
PIP=("$PY" -m pip --isolated --disable-pip-version-check)
STAMP="$PREFIX/.qsegformers-setup"
want_stamp=$( (cat requirements.txt requirements-current.txt requirements-nodeps.txt setup.sh setup.py \
  tools/install_detectron2.py tools/detectron2_fixes.py; echo "$QSEG_ENV $STACK") | sha256sum | cut -d' ' -f1)

if [ "${FORCE:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] \
   && "$PY" -c "import torch, torchvision, detectron2, qsegformers" 2>/dev/null; then
  say "environment up to date (stamp matches, imports work): nothing to do"
  exit 0
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# Versions of torch/torchvision already installed, read from their metadata (no import).
installed() { "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"; }
have_torch=$(installed torch)
have_tv=$(installed torchvision)
if [ "$QSEG_ENV" = system ] && [ -n "$have_torch" ]; then
  # Keep the environment's torch (and torchvision): drop them from the requirements and pin them as
  # constraints, so that no package can replace them; a missing torchvision is resolved to match.
  grep -v -E '^(torch|torchvision)[ =<>!~;]' "$REQ" > "$TMP/requirements.txt"
  echo "torch==$have_torch" > "$TMP/keep.txt"
  [ -n "$have_tv" ] && echo "torchvision==$have_tv" >> "$TMP/keep.txt"
  REQ_USED="$TMP/requirements.txt"
  KEEP=(-c "$TMP/keep.txt")
  say "keeping the environment's torch $have_torch${have_tv:+ and torchvision $have_tv} (never replaced)"
  "$PY" - "$have_torch" <<'PY'
import re, sys
v = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", sys.argv[1]).groups())
if v < (2, 4):
    sys.exit(f"[setup] ERROR: torch {sys.argv[1]} is too old: qsegformers' ops need torch >= 2.4 "
             "(torch.library.register_autograd); the verified range is in the README")
if not (2, 11) <= v < (2, 15):
    print(f"[setup] WARNING: torch {sys.argv[1]} is outside the verified range 2.11 - 2.14 (README)")
PY
else
  REQ_USED=$REQ
  KEEP=()
  if [ -n "$have_torch" ]; then
    say "torch $have_torch is installed; $REQ decides whether it stays"
  else
    say "installing torch + torchvision from the registry (as $REQ asks)"
  fi
fi

say "installing the packages of $REQ"
"${PIP[@]}" install -q -r "$REQ_USED" -c "$REQ_USED" "${KEEP[@]}"
say "installing packages whose metadata conflicts with the pins, without dependencies"
"${PIP[@]}" install -q --no-deps -r requirements-nodeps.txt -c "$REQ_USED" "${KEEP[@]}"
say "installing detectron2"
"$PY" tools/install_detectron2.py
say "installing qsegformers in editable mode (builds its compiled ops)"
"${PIP[@]}" install -q --no-build-isolation --no-deps -e . -c "$REQ_USED" "${KEEP[@]}"
say "checking the environment"
QSEG_STACK_CHECK=$STACK QSEG_KEPT_TORCH=$([ ${#KEEP[@]} -gt 0 ] && echo "$have_torch" || true) "$PY" - <<'PY'
import os
import numpy, PIL, torch, torchvision, detectron2, qsegformers
from torchvision.ops import nms  # the registry's torchvision ops must load
import panopticapi, pycocotools, fvcore, scipy, cv2
if os.environ.get("QSEG_NO_EXT") != "1":
    import qsegformers._C  # the compiled deformable-attention kernels must have been built
stack = os.environ["QSEG_STACK_CHECK"]
if stack == "pinned":
    assert numpy.__version__ == "1.23.5" and PIL.__version__ == "9.5.0", (numpy.__version__, PIL.__version__)
else:
    assert int(numpy.__version__.split(".")[0]) >= 2 and int(PIL.__version__.split(".")[0]) >= 11, \
        (numpy.__version__, PIL.__version__)
import importlib.metadata
kept = os.environ.get("QSEG_KEPT_TORCH")
now = importlib.metadata.version("torch")
assert not kept or now == kept, f"torch changed from {kept} to {now}"
nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
print(f"[setup] {stack} stack: torch {torch.__version__}{' (kept)' if kept else ''}, "
      f"torchvision {torchvision.__version__}, detectron2 {detectron2.__version__} (fixed copy), "
      f"numpy {numpy.__version__}, Pillow {PIL.__version__}")
PY
if [ -w "$PREFIX" ]; then
  echo "$want_stamp" > "$STAMP"
else
  say "$PREFIX is not writable: no stamp written (the next run checks everything again)"
fi
say "done in $(( $(date +%s) - start )) s"
