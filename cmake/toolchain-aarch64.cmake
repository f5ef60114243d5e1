# Cross-compiles for 64-bit ARM Linux with the Debian cross toolchain
# (g++-aarch64-linux-gnu). Used for the NEON C++ tests under qemu-user
# (scripts/check.sh) and for the aarch64 wheel (scripts/arm-test.sh, which
# passes the target's Python headers):
#   cmake -S . -B build-aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/toolchain-aarch64.cmake \
#         -DPRISM_BUILD_PYTHON=OFF -DPRISM_BUILD_TESTS=ON
#   cmake --build build-aarch64 -j2 && ctest --test-dir build-aarch64 --output-on-failure
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)

# Libraries and headers come from the cross sysroot only; programs (the host
# Python that pybind11 asks for its version) from the host; CMake packages
# (pybind11's config) from either.
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)

# ctest runs the test binaries through qemu-user; -L points the emulated
# dynamic loader at the cross libc/libstdc++.
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64-static -L /usr/aarch64-linux-gnu)
