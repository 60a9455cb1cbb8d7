#!/usr/bin/env bash
# qsegformers set-up: creates .venv in the repo and installs everything the project needs.
# Idempotent: a second run checks a stamp and the imports, and changes nothing.
# Usage: bash setup.sh            (FORCE=1 bash setup.sh reinstalls the pinned packages)
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY="$VENV/bin/python"
# pip --isolated ignores the machine's pip.conf and PIP_* variables, in particular the local
# folder of CPU-only torch wheels, which breaks the registry's torchvision.
PIP=("$PY" -m pip --isolated --disable-pip-version-check)
STAMP="$VENV/.qsegformers-setup"
want_stamp=$(cat requirements.txt requirements-nodeps.txt setup.sh setup.py tools/install_detectron2.py | sha256sum | cut -d' ' -f1)
start=$(date +%s)

say() { echo "[setup] $*"; }

if [ ! -x "$PY" ]; then
  say "creating virtual environment $VENV with $(python3 --version)"
  python3 -m venv "$VENV"
fi

if [ "${FORCE:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] \
   && "$PY" -c "import torch, torchvision, detectron2, qsegformers" 2>/dev/null; then
  say "environment up to date (stamp matches, imports work): nothing to do"
  exit 0
fi

say "installing pinned packages from requirements.txt (torch + torchvision from the registry)"
"${PIP[@]}" install -q -r requirements.txt -c requirements.txt
say "installing packages whose metadata conflicts with the pins, without dependencies"
"${PIP[@]}" install -q --no-deps -r requirements-nodeps.txt -c requirements.txt
say "installing detectron2"
"$PY" tools/install_detectron2.py
say "installing qsegformers in editable mode (builds its compiled ops)"
"${PIP[@]}" install -q --no-build-isolation --no-deps -e . -c requirements.txt
say "checking the environment"
"$PY" - <<'PY'
import numpy, PIL, torch, torchvision, detectron2, qsegformers
from torchvision.ops import nms  # the registry's torchvision ops must load
import panopticapi, pycocotools, fvcore, scipy, cv2
import os
if os.environ.get("QSEG_NO_EXT") != "1":
    import qsegformers._C  # the compiled deformable-attention kernels must have been built
assert numpy.__version__ == "1.23.5" and PIL.__version__ == "9.5.0", (numpy.__version__, PIL.__version__)
nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
print(f"[setup] torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"detectron2 {detectron2.__version__}, numpy {numpy.__version__}, Pillow {PIL.__version__}")
PY
echo "$want_stamp" > "$STAMP"
say "done in $(( $(date +%s) - start )) s"
