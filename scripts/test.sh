#!/usr/bin/env bash
# The README's test command: installs what the tests need (DCMTK included) and runs the whole suite,
# then ruff and mypy. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# dcmtk: the test peers; chromium: the headless browser the status page's test draws the page in;
# stunnel4, haproxy and valgrind: the benchmark's smoke tests (its anchors and callgrind counts)
missing=()
command -v storescu >/dev/null 2>&1 && command -v storescp >/dev/null 2>&1 || missing+=(dcmtk)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v stunnel4 >/dev/null 2>&1 || missing+=(stunnel4)
[ -x /usr/sbin/haproxy ] || command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
python3 -m pytest -q "$@"
ruff check dicom_tls_proxy tests
mypy
