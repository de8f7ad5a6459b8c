# Fresh machine: `make demo` installs into .venv and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= train,cloud,export,device,dev

.PHONY: install system-deps demo test clean

# torch first: 2.13.0 is a CPU wheel on this disk; any other resolution pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# Debian packages for the Android / WebView demo tests (headless Chromium, the APK toolchain); needs root.
# Without them those tests are skipped with the reason. node and npm come with the machine.
SYSTEM_DEPS := chromium aapt apksigner zipalign default-jdk-headless
system-deps:
	@if dpkg -s $(SYSTEM_DEPS) >/dev/null 2>&1; then echo "system packages present"; else \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SYSTEM_DEPS); fi

demo: install
	$(BIN)/ciar demo --out-dir demo_out

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
