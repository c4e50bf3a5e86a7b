# hvsim: every target is idempotent. On a fresh machine `make lab` and `make test`
# are the only two commands needed; they pull in setup and images themselves.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
HVSIM := $(VENV)/bin/hvsim
APT_PKGS := qemu-system-x86 qemu-utils busybox-static cpio gcc libc6-dev iproute2 \
            libnbd-bin nbdkit kmod zstd xz-utils iputils-ping nftables etcd-server curl \
            libssl-dev e2fsprogs
IMAGES := images/out/vmlinux images/out/initrd.img
BENCH ?=
PYTEST_ARGS ?=

.PHONY: setup apt venv images lab lint test test-unit test-hil bench bench-quick clean

setup: apt venv

apt:
	@if dpkg -s $(APT_PKGS) >/dev/null 2>&1; then echo "apt: packages present"; else \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $(APT_PKGS); fi

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

images: apt venv
	$(MAKE) -C images

lab: setup images
	$(HVSIM) lab

# the layer contract (import-linter), style and pitfalls (ruff), types (mypy): see README "Layout"
lint: venv
	$(VENV)/bin/lint-imports
	$(VPY) -m ruff check hvbase qmp_bridge hvsim tests bench
	$(VPY) -m mypy

test: setup images lint
	$(VPY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(VPY) -m pytest tests/unit $(PYTEST_ARGS)

test-hil: setup images
	$(VPY) -m pytest tests/hil $(PYTEST_ARGS)

bench: setup images
	$(VPY) -m bench $(if $(BENCH),--only $(BENCH))

bench-quick: setup images
	$(VPY) -m bench --quick $(if $(BENCH),--only $(BENCH))

clean:
	$(MAKE) -C images clean
	rm -rf $(VENV) build *.egg-info test-results lab-results .pytest_cache
