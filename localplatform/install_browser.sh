#!/usr/bin/env bash
# Chromium and its WebDriver, for the tests that open ragtune's HTML reports in a real headless
# browser (tests/evaluation/test_report_browser.py). Debian's packages; nothing else is fetched.
# Idempotent: a machine that has both does nothing. Run by `make test` / `make browser`.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1; }
if have chromium && have chromedriver; then
  exit 0
fi
if ! have apt-get; then
  echo "install_browser.sh: need Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  have sudo || { echo "install_browser.sh: run as root or install sudo (apt-get install chromium chromium-driver)" >&2; exit 1; }
  SUDO="sudo"
fi
echo "installing Chromium and chromedriver from Debian (once) ..." >&2
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >&2 \
  || { $SUDO apt-get update -q >&2 && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >&2; }
have chromium && have chromedriver
