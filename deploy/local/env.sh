# Sourced by the local scripts: a project virtualenv with the package installed (editable, dev extras).
# Re-installs only when pyproject.toml changed since the last install.
VENV=${VENV:-$ROOT/.venv}
# The interpreter (VENV_PYTHON overrides): Debian's python3.11 where there is one. It is built with PGO and
# LTO (and linked statically with libpython); a pyenv build has neither unless asked for
# (--enable-optimizations, --with-lto), and on it the worker used about a quarter more CPU per request
# (README, Measured performance).
if [ -z "${VENV_PYTHON:-}" ]; then
  for candidate in /usr/bin/python3.11 python3.11 python3; do
    if command -v "$candidate" >/dev/null; then VENV_PYTHON=$candidate; break; fi
  done
fi
: "${VENV_PYTHON:?no python3.11 or python3 found: install one, or set VENV_PYTHON}"
if [ ! -x "$VENV/bin/python" ]; then
  "$VENV_PYTHON" -m venv "$VENV" || {
    # Debian splits venv support out per version: the package of the chosen interpreter's version.
    version=$("$VENV_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    rm -rf "$VENV"  # a failed attempt leaves bin/python without pip
    as_root=; [ "$(id -u)" -eq 0 ] || as_root=sudo  # apt-get needs root
    $as_root apt-get update -qq && $as_root apt-get install -y -qq "python$version-venv" >/dev/null \
      && "$VENV_PYTHON" -m venv "$VENV"
  }
fi
# Versions pinned by constraints.txt (reproducible runs; pyproject.toml keeps the ranges).
stamp="$VENV/.installed-$(cat "$ROOT/pyproject.toml" "$ROOT/deploy/local/constraints.txt" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -c "$ROOT/deploy/local/constraints.txt" -e "$ROOT[dev]"
  rm -f "$VENV"/.installed-*; touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export PYTHON="$VENV/bin/python"
