# The out-of-the-box job (include from the top-level Makefile).
#   make demo       fresh clone -> virtualenv with prism-ext (and its `plot` extra: matplotlib) -> `prism demo`
#   make zoo-train  rebuild the bundled models with the recorded recipe (the `train` extra: scikit-learn, transformers)
PYTHON ?= python3
VENV ?= .venv
# Pin torch: an unpinned `pip install torch` on Linux pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO_JOBS ?= 2
PRISM_SOURCES := $(shell find csrc prism_ext CMakeLists.txt pyproject.toml -type f -not -path '*/__pycache__/*' 2>/dev/null)

.PHONY: demo zoo-train

$(VENV)/.prism-installed: $(PRISM_SOURCES)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)"
	CMAKE_BUILD_PARALLEL_LEVEL=$(DEMO_JOBS) $(VENV)/bin/pip install -q ".[plot]"
	touch $@

demo: $(VENV)/.prism-installed
	$(VENV)/bin/prism demo

zoo-train: $(VENV)/.prism-installed
	$(VENV)/bin/pip install -q "scikit-learn>=1.2" "transformers>=4.40"  # the `train` extra
	$(VENV)/bin/prism zoo train vit-tiny-digits --threads 1 --out prism_ext/zoo/vit-tiny-digits
	$(VENV)/bin/prism zoo train gpt2-tiny --threads 1 --out prism_ext/zoo/gpt2-tiny
	$(VENV)/bin/prism zoo train llama-tiny --threads 1 --out prism_ext/zoo/llama-tiny
