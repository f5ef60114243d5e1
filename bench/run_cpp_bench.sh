#!/usr/bin/env bash
# Builds and runs the C++ kernel benchmarks (bench/kernels_bench.cpp) on a
# fresh Debian machine: installs libbenchmark-dev if missing, configures with
# PRISM_BUILD_BENCH=ON (no Python extension), builds with -j2, then runs the
# binary with the arguments given, e.g.
#   bench/run_cpp_bench.sh --benchmark_filter='attention/avx2' --benchmark_repetitions=5
# Set PRISM_BENCH_BUILD_DIR to build elsewhere (default: build/bench).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${PRISM_BENCH_BUILD_DIR:-$root/build/bench}"

if ! dpkg-query -W -f='${Status}' libbenchmark-dev 2>/dev/null | grep -q "install ok installed"; then
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -q
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q libbenchmark-dev cmake g++
fi

cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DPRISM_BUILD_PYTHON=OFF -DPRISM_BUILD_BENCH=ON
cmake --build "$build" --target prism_kernels_bench -j 2
exec "$build/bench/prism_kernels_bench" "$@"
