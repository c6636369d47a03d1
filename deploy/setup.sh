#!/usr/bin/env bash
# Install what StrokeGate needs on a fresh Debian/Ubuntu machine, into .venv at the repo root.
#   bash deploy/setup.sh          the service and its command line
#   bash deploy/setup.sh --test   the same, plus the test tools and the training extra (torch==2.13.0,
#                                 the CPU build, and onnx), so that the tests check torch against ONNX Runtime
# System packages: dcmtk (storescu/storescp/dcmdump), dicom3tools (dciodvfy), orthanc (a PACS).
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
test_packages=""
if [ "${1:-}" = "--test" ]; then
    extras="[test,train]"
    test_packages="prometheus openssl"  # prometheus + promtool for the alert-rule and scrape tests
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing dcmtk, dicom3tools and orthanc (apt-get)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        dcmtk dicom3tools orthanc $test_packages >/dev/null
else
    echo "setup: no apt-get here; install dcmtk, dicom3tools and orthanc yourself" >&2
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup: StrokeGate needs Python >= 3.11, $python is $("$python" --version 2>&1)" >&2
    exit 1
fi
if ! "$python" -m venv --help >/dev/null 2>&1; then
    $sudo apt-get install -y -qq python3-venv >/dev/null
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
echo "setup: installing StrokeGate$extras into .venv (pip)"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".$extras"
if [ -n "$extras" ]; then bash deploy/kube-tools.sh; fi  # kubectl + helm for the Kubernetes tests
echo "setup: done"
