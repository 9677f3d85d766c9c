#!/usr/bin/env bash
# Install what the browser tests need: Debian's chromium (Playwright cannot
# download its own browser on these machines).  Idempotent: does nothing when
# /usr/bin/chromium already runs.  Needs root (or sudo) for apt-get.
set -euo pipefail

CHROMIUM=${CELLATLAS_CHROMIUM:-/usr/bin/chromium}

if [ -x "$CHROMIUM" ] && "$CHROMIUM" --version >/dev/null 2>&1; then
  echo "ci_browser: $("$CHROMIUM" --version) already installed"
  exit 0
fi

SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "ci_browser: need root or sudo to apt-get install chromium" >&2; exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null

"$CHROMIUM" --version
# Playwright for Python (test extra) drives this executable; check it is importable.
python - <<'PY' || echo "ci_browser: warning: playwright is not importable in this Python" >&2
import playwright.sync_api  # noqa: F401
print("ci_browser: playwright importable")
PY
