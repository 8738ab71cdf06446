#!/usr/bin/env bash
# Debian's chromium for the browser tests: Playwright drives it through executable_path, so
# Playwright's own browser downloads are never needed.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "chromium present: $(chromium --version 2>/dev/null || echo unknown version)"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "install-browser: chromium is missing and this user cannot install packages;" >&2
    echo "run as root: apt-get install -y chromium chromium-driver" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium chromium-driver
echo "chromium installed: $(chromium --version)"
