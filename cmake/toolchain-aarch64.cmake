# Cross-compiles for 64-bit ARM Linux with the Debian cross toolchain
# (g++-aarch64-linux-gnu), so the NEON kernels get built and, through the
# emulator below, tested under qemu-user on an x86_64 host:
#   cmake -S . -B build-aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/toolchain-aarch64.cmake -DPRISM_BUILD_TESTS=ON
#   cmake --build build-aarch64 -j2 && ctest --test-dir build-aarch64 --output-on-failure
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)

# Libraries and headers come from the cross sysroot only; programs from the host.
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# ctest (and add_test on built targets) runs the binaries through qemu-user;
# -L points the emulated dynamic loader at the cross libc/libstdc++.
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64-static -L /usr/aarch64-linux-gnu)

# No Python extension: the host interpreter cannot load an aarch64 module.
set(PRISM_BUILD_PYTHON OFF CACHE BOOL "Build the Python extension prism_ext._C" FORCE)
