# Two commands for users: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
XDS_REF := $(VENV)/xds-ref

.PHONY: demo test lint proto bench clean dev install system-packages soak

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $(STAMP)

# Envoy's published stubs, kept out of the venv on purpose: tests/test_proto_compat.py compares
# our wire subset against them in a subprocess (see README, "Why not xds-protos").
$(XDS_REF)/.installed: | $(STAMP)
	$(BIN)/python -m pip install -q --no-deps --target $(XDS_REF) xds-protos==1.85.0
	touch $@

install: $(STAMP)

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=extproc/_pb --pyi_out=extproc/_pb \
		proto/ext_proc_wire.proto proto/usage_event.proto

lint: $(STAMP)
	$(BIN)/ruff check extproc tests bench
	$(BIN)/mypy

# kubectl, redis-server, wrk (Debian packages): installed when run as root, else a hint
system-packages:
	sh scripts/install-system-packages.sh

test: $(STAMP) $(XDS_REF)/.installed lint system-packages
	XDS_REF_PATH=$(abspath $(XDS_REF)) $(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/extproc demo

dev: $(STAMP)
	$(BIN)/extproc dev

bench: $(STAMP)
	$(BIN)/python -m bench.run

# Mixed traffic through the real stack for SOAK_SECONDS (default 600); not part of `make test`
soak: $(STAMP)
	$(BIN)/python -m bench.soak

clean:
	rm -rf $(VENV) .extproc .pytest_cache .mypy_cache
