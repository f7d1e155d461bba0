# lazyfs: `make demo` sets up this machine and runs the main job; `make test` runs every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ROOTFS ?= /var/cache/lazyfs/rootfs-bookworm
NGINX_ROOTFS ?= /var/cache/lazyfs/rootfs-bookworm-nginx

.PHONY: all deps venv rootfs rootfs-nginx test lint typecheck demo bench clean

all: test

deps:
	@scripts/install-deps.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip > $(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	@$(PY) -m pip install -q -e '.[dev]' > $(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

lint: venv
	$(VENV)/bin/ruff check lazyfs snapshotter p2p scheduler seed tests bench

typecheck: venv
	$(VENV)/bin/mypy

rootfs: deps
	@scripts/debian-rootfs.sh $(ROOTFS)

rootfs-nginx: deps
	@scripts/debian-rootfs.sh $(NGINX_ROOTFS) nginx

test: deps venv rootfs lint typecheck
	LAZYFS_TEST_ROOTFS=$(ROOTFS) $(VENV)/bin/pytest -q -p no:cacheprovider

demo: deps venv
	@scripts/demo.sh

bench: deps venv rootfs rootfs-nginx
	LAZYFS_BENCH_ROOTFS=$(ROOTFS) $(PY) -m bench.convert
	$(PY) -m bench.metadata
	LAZYFS_BENCH_ROOTFS=$(ROOTFS) $(PY) -m bench.fuse_read
	LAZYFS_BENCH_ROOTFS=$(ROOTFS) $(PY) -m bench.lazy_read
	LAZYFS_BENCH_ROOTFS=$(ROOTFS) LAZYFS_BENCH_NGINX_ROOTFS=$(NGINX_ROOTFS) $(PY) -m bench.cold_start --json /tmp/lazyfs-cold-start.json --png /tmp/lazyfs-cold-start.png
	$(PY) -m bench.p2p_swarm --json /tmp/lazyfs-p2p-swarm.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
