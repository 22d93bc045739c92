#!/usr/bin/env bash
# The README's test command: installs what the tests need (DCMTK included) and runs the whole suite,
# then ruff and mypy. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# chromium: the headless browser the status page's test draws the page in.
if ! command -v storescu >/dev/null 2>&1 || ! command -v storescp >/dev/null 2>&1 \
  || ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dcmtk chromium >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
python3 -m pytest -q "$@"
ruff check dicom_tls_proxy tests
mypy
