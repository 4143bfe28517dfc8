#!/usr/bin/env bash
# Debian packages the project uses: the offline Fashion-MNIST files, and the
# linter that tests run over launch_tpu.sh. Skips what is already installed.
set -euo pipefail
packages=(dataset-fashion-mnist shellcheck)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "warning: no apt-get; install ${missing[*]} by hand (tests that need them skip)" >&2
  exit 0
fi
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
$sudo apt-get update -qq
$sudo apt-get install -y -qq "${missing[@]}"
