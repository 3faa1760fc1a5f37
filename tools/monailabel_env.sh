#!/usr/bin/env bash
# Create (or reuse) the MONAI Label virtual environment from requirements-monailabel.txt.
# MONAI Label pins numpy 1.26.4 and imports torchvision, so it cannot share the main environment.
# Idempotent: a stamp holding the requirements' checksum skips the install when nothing changed.
# Usage: tools/monailabel_env.sh [venv dir]   (default: $MONAILABEL_VENV or <repo>/.venv-monailabel)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-${MONAILABEL_VENV:-$repo/.venv-monailabel}}"
req="$repo/requirements-monailabel.txt"
stamp="$venv/.requirements.md5"
want="$(md5sum "$req" | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$venv/bin/python" -c "import monailabel, torchvision" 2>/dev/null; then
    echo "MONAI Label environment up to date: $venv"
    exit 0
fi

python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade "pip" "setuptools<82" wheel
"$venv/bin/python" -m pip install -q -r "$req"
"$venv/bin/python" -c "import torchvision, monailabel.app, monailabel.tasks.infer.bundle, monailabel.tasks.train.bundle"
echo "$want" > "$stamp"
echo "MONAI Label environment ready: $venv"
