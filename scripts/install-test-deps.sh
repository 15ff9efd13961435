#!/usr/bin/env bash
# System packages the test suite and the benchmark smoke run need (Debian).
# Used by .ci/run and by the README's test command on a fresh machine.
# One package per line; packages already installed are left alone.
set -euo pipefail

PACKAGES=(
    ngircd  # benchmarks/fanout.py compares chatkit with it (nox -s bench_smoke)
    redis-server  # tests/test_cluster.py starts its own on a free port
    iptables  # the half-open test drops a loopback peer's packets (needs root)
    chromium  # tests/test_browser.py drives the web page in it (Playwright)
    fonts-dejavu-core  # readable text in the page's screenshots (docs/images)
)

missing=()
for package in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed"; then
        missing+=("$package")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
echo "installing: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
