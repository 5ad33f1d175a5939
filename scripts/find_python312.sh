#!/usr/bin/env bash
# Prints the path of a Python 3.12 interpreter, or explains on stderr and exits 1.
# Order: $QOQ_PYTHON, python3.12 on PATH, pyenv's 3.12.x (the `python3.12` shim refuses to run
# unless PYENV_VERSION names it, so we ask pyenv for the absolute path instead).
set -u
is312() { "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' 2>/dev/null; }
if [ -n "${QOQ_PYTHON:-}" ]; then
  if is312 "$QOQ_PYTHON"; then echo "$QOQ_PYTHON"; exit 0; fi
  echo "QOQ_PYTHON=$QOQ_PYTHON is not a working Python 3.12" >&2; exit 1
fi
if command -v python3.12 >/dev/null 2>&1 && is312 python3.12; then command -v python3.12; exit 0; fi
if command -v pyenv >/dev/null 2>&1; then
  for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.|$)' | sort -V -r); do
    p="$(pyenv root)/versions/$v/bin/python3.12"
    if is312 "$p"; then echo "$p"; exit 0; fi
  done
fi
for p in /usr/bin/python3.12 /usr/local/bin/python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
  if [ -x "$p" ] && is312 "$p"; then echo "$p"; exit 0; fi
done
cat >&2 <<'MSG'
qoq-jax needs Python 3.12 (jax 0.11.2 supports nothing older), and none was found.
Install one (for example `pyenv install 3.12`), or point QOQ_PYTHON at its interpreter:
    make test QOQ_PYTHON=/path/to/python3.12
MSG
exit 1
