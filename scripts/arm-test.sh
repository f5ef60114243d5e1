#!/usr/bin/env bash
# Build a linux_aarch64 wheel of prism-ext by cross-compiling it here, then
# install and test it inside an arm64 Debian root run through qemu-user
# (binfmt_misc): `prism info` must report NEON for every kernel, and the kernel
# tests run against the installed wheel.
#
#   scripts/arm-test.sh [pytest args]     (default: tests/test_kernels.py tests/test_kernels_quantized.py)
#   scripts/arm-test.sh --clean           remove the cache (build/arm64)
#
# Needs root (apt-get, debootstrap, mount, chroot) and PyPI + Debian mirrors.
# The arm64 root, its .debs and its pip cache stay under build/arm64 so a rerun
# skips them; delete that folder to start cold. Environment knobs:
#   PRISM_ARM_WORK    cache/work folder        (build/arm64)
#   PRISM_ARM_MIRROR  Debian mirror            (http://deb.debian.org/debian)
#   PRISM_ARM_TORCH   torch for the arm64 root (2.9.1: PyPI's aarch64 wheels are CPU builds)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${PRISM_ARM_WORK:-$REPO/build/arm64}
ROOTFS=$WORK/rootfs
# bookworm's python3 is 3.11: the cross build uses the host python3, whose
# minor version must match (checked below).
SUITE=bookworm
MIRROR=${PRISM_ARM_MIRROR:-http://deb.debian.org/debian}
TORCH=${PRISM_ARM_TORCH:-2.9.1}
VENV=/opt/prism-venv            # inside the root
TESTDIR=/tmp/prism-arm-test     # inside the root, outside any source tree
BINFMT=/proc/sys/fs/binfmt_misc
# The host's CA bundle, copied into the root: pip there must trust what the
# host trusts (a proxy's own CA, say), not only Debian's list.
HOST_CA=/etc/ssl/certs/host-ca-certificates.crt
PYTEST_ARGS=("$@")
[ ${#PYTEST_ARGS[@]} -gt 0 ] || PYTEST_ARGS=(tests/test_kernels.py tests/test_kernels_quantized.py)

die() { echo "arm-test: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, mount, chroot)"

# rm -rf through a live bind mount of /dev would delete the host's device
# nodes: refuse while anything is mounted below the folder (a run killed with
# SIGKILL leaves its mounts), and never cross into another file system.
remove_tree() {
  local mounted
  mounted=$(awk -v d="$1/" 'index($2 "/", d) == 1 {print $2}' /proc/mounts)
  [ -z "$mounted" ] || die "still mounted below $1 (umount first): $(echo $mounted)"
  rm -rf --one-file-system "$1"
}
# One run at a time on this machine: runs share the binfmt_misc entry (the
# first one's exit would unregister it under the other) and the cached root.
exec 9> /run/lock/prism-arm-test.lock
flock -n 9 || { echo "arm-test: waiting for another arm-test run to finish"; flock 9; }

if [ "${1:-}" = --clean ]; then
  remove_tree "$WORK"
  exit 0
fi
[ "$(uname -m)" = x86_64 ] || die "written for an x86_64 host (cross compiler, qemu-user); on an arm64 machine run the test suite natively"
for t in "${PYTEST_ARGS[@]}"; do
  case $t in -*) ;; *) [ -e "$REPO/${t%%::*}" ] || die "no $t in $REPO (tests/test_kernels.py comes with the kernel tests)";; esac
done

# ---- timing and cleanup -----------------------------------------------------
T0=$SECONDS
TIMES=()
MOUNTS=()
BINFMT_MOUNTED=0
BINFMT_REGISTERED=0

stage() {  # stage NAME FUNCTION: run it and record how long it took
  local name=$1 start=$SECONDS
  echo "==> arm-test: $name"
  "$2"
  TIMES+=("$(printf '  %-26s %5ds' "$name" $((SECONDS - start)))")
}

cleanup() {
  local rc=$? i
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    umount "${MOUNTS[i]}" || umount -l "${MOUNTS[i]}" || echo "arm-test: could not unmount ${MOUNTS[i]}" >&2
  done
  # Undo only what this run set up, so a host that registers qemu itself keeps it.
  [ $BINFMT_REGISTERED = 1 ] && echo -1 > "$BINFMT/qemu-aarch64"
  [ $BINFMT_MOUNTED = 1 ] && umount "$BINFMT"
  echo "arm-test: stage times"
  printf '%s\n' "${TIMES[@]}"
  printf '  %-26s %5ds  (%s)\n' total $((SECONDS - T0)) "$([ $rc = 0 ] && echo passed || echo "FAILED, exit $rc")"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_root() {  # run a command in the arm64 root with a clean environment
  chroot "$ROOTFS" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
    PATH="$VENV/bin:/usr/local/bin:/usr/bin:/bin" PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT="$HOST_CA" SSL_CERT_FILE="$HOST_CA" "$@"
}

# ---- stages -------------------------------------------------------------------
host_packages() {
  local need=() p
  for p in debootstrap qemu-user-static g++-aarch64-linux-gnu; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  fi
}

register_qemu() {
  if [ ! -e "$BINFMT/register" ]; then
    mount -t binfmt_misc binfmt_misc "$BINFMT"
    BINFMT_MOUNTED=1
  fi
  if [ ! -e "$BINFMT/qemu-aarch64" ]; then
    # The F flag makes the kernel open the interpreter now, so the root needs no qemu copy.
    grep -v '^#' /usr/lib/binfmt.d/qemu-aarch64.conf > "$BINFMT/register"
    BINFMT_REGISTERED=1
  fi
  grep -qx enabled "$BINFMT/qemu-aarch64" || die "binfmt_misc entry qemu-aarch64 exists but is disabled"
}

make_root() {
  if [ -e "$ROOTFS/.prism-root-ok" ]; then
    echo "cached: $ROOTFS"
    return
  fi
  remove_tree "$ROOTFS"
  mkdir -p "$WORK/debs"
  # python3-dev: its headers (with the aarch64 pyconfig.h) are what the cross build compiles against.
  debootstrap --arch=arm64 --variant=minbase --cache-dir="$WORK/debs" \
    --include=python3,python3-venv,python3-dev,ca-certificates "$SUITE" "$ROOTFS" "$MIRROR"
  touch "$ROOTFS/.prism-root-ok"
}

mount_root() {
  local m
  for m in proc sys dev; do
    mountpoint -q "$ROOTFS/$m" && die "$ROOTFS/$m is already mounted (another arm-test running?)"
  done
  mount -t proc proc "$ROOTFS/proc"
  MOUNTS+=("$ROOTFS/proc")
  mount -t sysfs sysfs "$ROOTFS/sys"
  MOUNTS+=("$ROOTFS/sys")
  mount --bind /dev "$ROOTFS/dev"
  MOUNTS+=("$ROOTFS/dev")
  cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
  cp -L /etc/ssl/certs/ca-certificates.crt "$ROOTFS$HOST_CA"
}

root_venv() {
  local stamp="$ROOTFS$VENV/.prism-deps-torch-$TORCH"
  if [ -e "$stamp" ]; then
    echo "cached: $VENV with torch $TORCH"
    return
  fi
  rm -rf "$ROOTFS$VENV"
  in_root python3 -m venv "$VENV"
  # torch pinned first so the wheel's torch>= requirement installs nothing newer.
  # --no-compile: byte-compiling all of torch under emulation takes minutes;
  # the modules the tests import get compiled on first use.
  in_root pip install -q --no-compile "torch==$TORCH" numpy pytest hypothesis
  touch "$stamp"
}

cross_wheel() {
  local host_py root_py ext inc
  host_py=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  root_py=$(in_root python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [ "$host_py" = "$root_py" ] || die "host python3 is $host_py but the arm64 root's is $root_py: the wheel is built by the host's"
  ext=$(in_root python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  # The root's headers, with its multiarch pyconfig.h put where Python.h looks.
  inc=$WORK/python-include/python$root_py
  rm -rf "$WORK/python-include" "$WORK/dist"
  mkdir -p "$inc"
  cp -r "$ROOTFS/usr/include/python$root_py/." "$inc/"
  cp "$ROOTFS/usr/include/aarch64-linux-gnu/python$root_py/pyconfig.h" "$inc/pyconfig.h"
  # The build requirements go into a host venv of their own: under pip's build
  # isolation _PYTHON_HOST_PLATFORM would make pip fetch aarch64 cmake/ninja.
  local requires
  requires=$(python3 -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"] + ["cmake", "ninja"]))' "$REPO/pyproject.toml")
  if [ "$(cat "$WORK/host-venv/requires.txt" 2>/dev/null)" != "$requires" ]; then
    remove_tree "$WORK/host-venv"
    python3 -m venv "$WORK/host-venv"
    echo "$requires" | "$WORK/host-venv/bin/pip" install -q -r /dev/stdin
    echo "$requires" > "$WORK/host-venv/requires.txt"
  fi
  # scikit-build-core takes the wheel's platform tag from _PYTHON_HOST_PLATFORM
  # and the module suffix from SETUPTOOLS_EXT_SUFFIX; pybind11 from PYTHON_MODULE_EXTENSION.
  _PYTHON_HOST_PLATFORM=linux_aarch64 SETUPTOOLS_EXT_SUFFIX="$ext" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} PATH="$WORK/host-venv/bin:$PATH" \
    "$WORK/host-venv/bin/python" -m pip wheel --no-build-isolation --no-deps -q -w "$WORK/dist" "$REPO" \
    -Cbuild-dir="$WORK/cmake-build" \
    -Ccmake.define.CMAKE_TOOLCHAIN_FILE="$REPO/cmake/toolchain-aarch64.cmake" \
    -Ccmake.define.Python_INCLUDE_DIR="$inc" \
    -Ccmake.define.Python3_INCLUDE_DIR="$inc" \
    -Ccmake.define.PYTHON_MODULE_EXTENSION="$ext"
  WHEEL=$(ls "$WORK"/dist/prism_ext-*-linux_aarch64.whl)
  local so
  so=$(python3 -m zipfile -l "$WHEEL" | awk '/\.so /{print $1}')
  [ "$so" = "prism_ext/_C$ext" ] || die "expected prism_ext/_C$ext in the wheel, found: ${so:-nothing}"
  python3 -m zipfile -e "$WHEEL" "$WORK/dist/unpacked"
  readelf -h "$WORK/dist/unpacked/$so" | grep -q 'Machine:.*AArch64' || die "$so is not an AArch64 binary"
  echo "built $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB)"
}

install_wheel() {
  rm -rf "$ROOTFS$TESTDIR"
  mkdir -p "$ROOTFS$TESTDIR"
  cp "$WHEEL" "$ROOTFS$TESTDIR/"
  # A copy of the tests only: nothing in $TESTDIR is importable as prism_ext.
  cp -r "$REPO/tests" "$ROOTFS$TESTDIR/tests"
  in_root pip uninstall -q -y prism-ext 2>/dev/null || true
  in_root pip install -q "$TESTDIR/$(basename "$WHEEL")"
}

check_neon() {
  local info
  info=$(in_root sh -c "cd $TESTDIR && prism info")
  echo "$info"
  echo "$info" | grep -Eq '^python .*\(aarch64\)' || die "prism info did not run on aarch64"
  echo "$info" | grep -Eq '^isas .*\bneon\b' || die "prism info lists no neon ISA"
  [ "$(echo "$info" | grep -c '^kernel ')" -gt 0 ] || die "prism info printed no kernel lines"
  if echo "$info" | grep '^kernel ' | grep -vq ': neon$'; then
    die "not every kernel uses NEON"
  fi
}

run_tests() {
  # --strict-skips: only the x86 ISAs may skip here (tests/conftest.py).
  in_root sh -c 'cd "$0" && exec python -m pytest -q -p no:cacheprovider --strict-skips "$@"' "$TESTDIR" "${PYTEST_ARGS[@]}"
}

stage "host packages" host_packages
stage "register qemu-aarch64" register_qemu
stage "arm64 root (debootstrap)" make_root
stage "mount /proc /sys /dev" mount_root
stage "root venv (torch, numpy)" root_venv
stage "cross-compile wheel" cross_wheel
stage "install wheel (emulated)" install_wheel
stage "prism info (emulated)" check_neon
stage "pytest (emulated)" run_tests
