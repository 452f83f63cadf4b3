#!/usr/bin/env bash
# Sets up kvtier on Debian 12 (as root, or with sudo) and runs it.
#   tools/setup.sh run    install what is missing, build (Release), run kvtier's main job (kvtier demo)
#   tools/setup.sh test   the same set-up, then the whole test suite (ctest)
# Idempotent: packages already installed and an up-to-date build are skipped.
# KVTIER_BUILD_DIR (default: build) picks the build folder.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
if [[ $mode != run && $mode != test ]]; then
  echo "usage: tools/setup.sh run|test" >&2
  exit 2
fi
build_dir=${KVTIER_BUILD_DIR:-build}

packages=(g++ cmake ninja-build pkg-config
          libtbb-dev libdnnl-dev ocl-icd-opencl-dev libhwloc-dev liburing-dev
          libboost-program-options-dev doctest-dev nlohmann-json3-dev)

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

install_missing() {
  local missing=() p
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "kvtier setup: installing ${missing[*]}" >&2
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}

build() {
  if [[ ! -f $build_dir/CMakeCache.txt ]]; then
    cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release
  fi
  cmake --build "$build_dir" -j"$(nproc)"
}

install_missing
build
case $mode in
  run)
    # The machine first (a second), then the main job: `kvtier demo` on this
    # machine's defaults (1M tokens with a GPU; about 30 s on 2 cores without).
    "$build_dir/bin/kvtier" info
    echo
    "$build_dir/bin/kvtier" demo
    ;;
  test) ctest --test-dir "$build_dir" --output-on-failure -j"$(nproc)" ;;
esac
