#!/bin/sh
# Install Debian's headless Chromium and its matching ChromeDriver for the browser test (tests/test_app_browser.py).
# Idempotent: returns at once when both are present. Needs root (CI runs `make test` as root) and apt.
set -eu
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "chromium / chromedriver missing: run as root, or: sudo apt-get install -y chromium chromium-driver" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when the candidate is unknown (a fresh image has no lists).
if ! apt-cache show chromium-driver >/dev/null 2>&1; then
    apt-get update -q
fi
# Stale lists on an older image can point at packages the mirror no longer has: refresh once and retry.
if ! apt-get install -y -q --no-install-recommends chromium chromium-driver; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends chromium chromium-driver
fi
