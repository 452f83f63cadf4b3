#!/usr/bin/env bash
# Builds and tests kvtier on a GPU host without a package registry (see
# ../shared/gpu-host/README.md), then records `kvtier info` and benchmarks.
#   tools/gpu-host.sh OUTDIR [bench suites...]
# Needs .gpuhost/ (debs + env.sh) beside the sources. Writes build.log,
# ctest.log, info.json and bench_<suite>.json into OUTDIR.
# Optional, by environment:
#   KVTIER_SANITIZE="test ..."  runs each named test under compute-sanitizer
#                               memcheck and racecheck (KVTIER_TEST_QUICK=1)
#   KVTIER_PEERS=1              runs bench/peers/peer_attention.py (PyTorch)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: tools/gpu-host.sh OUTDIR [suites...]}
shift
mkdir -p "$out"
# shellcheck disable=SC1091
source .gpuhost/env.sh .gpuhost/debs /opt/kvtier-deps >/dev/null
export PATH=/opt/kvtier-deps/usr/bin:$PATH:/usr/local/cuda/bin   # ninja from the debs; compute-sanitizer
{
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 &&
    cmake --build build-gpu -j"$(nproc)"
} >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
ctest --test-dir build-gpu --output-on-failure -j8 >"$out/ctest.log" 2>&1
ctest_rc=$?
build-gpu/bin/kvtier info --json --dir . >"$out/info.json" 2>&1
for suite in "$@"; do
  build-gpu/bin/kvtier bench "$suite" --json >"$out/bench_$suite.json" 2>"$out/bench_$suite.err"
done
for t in ${KVTIER_SANITIZE:-}; do
  for tool in memcheck racecheck; do
    KVTIER_TEST_QUICK=1 compute-sanitizer --tool "$tool" --error-exitcode 9 "build-gpu/tests/$t" \
      >"$out/sanitizer_${tool}_$t.log" 2>&1
    echo "compute-sanitizer $tool $t: exit $?" | tee -a "$out/sanitizer_summary.txt"
  done
done
if [ -n "${KVTIER_PEERS:-}" ]; then
  python3 bench/peers/peer_attention.py >"$out/peers.json" 2>"$out/peers.err"
  echo "peers: exit $?"
fi
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv >"$out/nvidia-smi.csv" 2>&1
tail -25 "$out/ctest.log"
exit $ctest_rc
