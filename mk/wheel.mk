# Packaging checks; the Makefile includes this file (`include mk/wheel.mk`).
#   make wheel-test    sdist + wheel, contents checked, tests run against the installed wheel (x86_64)
#   make wheel-measure the same, plus wheel size and import time
#   make arm-test      cross-built linux_aarch64 wheel tested in an emulated arm64 Debian root (root only)
#   make arm-clean     drop the cached arm64 root and its downloads
.PHONY: wheel-test wheel-measure arm-test arm-clean

wheel-test:
	bash scripts/wheel-test.sh

wheel-measure:
	bash scripts/wheel-test.sh --measure

arm-test:
	bash scripts/arm-test.sh

arm-clean:
	bash scripts/arm-test.sh --clean
