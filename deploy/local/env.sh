# Sourced by the local scripts: a project virtualenv with the package installed (editable, dev extras).
# Re-installs only when pyproject.toml changed since the last install.
VENV=${VENV:-$ROOT/.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" || { apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && python3 -m venv "$VENV"; }
fi
stamp="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e "$ROOT[dev]"
  rm -f "$VENV"/.installed-*; touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export PYTHON="$VENV/bin/python"
