# `make check`: set up a fresh Debian machine (packages, .venv) and run every
# test (pytest, C++ tests natively, with ASan+UBSan, with TSan, and for aarch64 under
# qemu). See scripts/check.sh.
.PHONY: check clean

check:
	bash scripts/check.sh

# Build trees and the venv; `make check` recreates them.
clean:
	rm -rf build .venv

include mk/wheel.mk
include mk/demo.mk
