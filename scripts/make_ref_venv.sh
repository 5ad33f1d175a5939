#!/usr/bin/env bash
# Builds the virtual environment of the test oracle (transformers + torch, CPU) at $1.
# It uses Python 3.11 where there is one, because torch's CPU wheel for it is on local disk here;
# any Python 3.10-3.12 works (pip then downloads torch).
set -euo pipefail
dest=${1:-.venv-ref}
py=""
for cand in "${QOQ_REF_PYTHON_BASE:-}" python3.11 python3 "$(scripts/find_python312.sh 2>/dev/null)"; do
  [ -n "$cand" ] || continue
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(0 if (3,10) <= sys.version_info[:2] <= (3,12) else 1)' 2>/dev/null; then
    py=$cand; break
  fi
done
if [ -z "$py" ]; then echo "no Python 3.10-3.12 found for the test oracle's environment" >&2; exit 1; fi
echo "creating the test oracle's environment $dest with $($py --version)"
"$py" -m venv "$dest"
"$dest/bin/python" -m pip install -q --upgrade pip
"$dest/bin/python" -m pip install -q -r tests/reference/requirements.txt
