#!/usr/bin/env bash
# Debian's Chromium, which the real-browser test drives (Playwright with the system browser:
# no browser download). Installed once with apt-get; a no-op where it is already present.
set -euo pipefail
CHROMIUM="${PEFTFLOW_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "chromium: $CHROMIUM is missing and installing it needs root;" \
      "run 'sudo apt-get install -y chromium' (or set PEFTFLOW_CHROMIUM to a Chromium binary)" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
echo "chromium: installing Debian's chromium with apt-get" >&2
# A fresh machine may have no package lists yet: update once, then install.
$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || {
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null
}
"$CHROMIUM" --version >&2
