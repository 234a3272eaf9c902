# Two commands for users: `make run` and `make test`. Both set up everything they
# need on a fresh Debian machine (as root): system packages, the virtual
# environment in .venv, the project's small C helpers, then run or test.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

# Debian packages the project needs at build, run or test time.
SYSTEM_PACKAGES := gcc libc6-dev libcap-dev python3-dev python3-venv \
	iproute2 busybox-static debootstrap btrfs-progs e2fsprogs util-linux \
	openssh-server openssh-client nftables crun bubblewrap procps psmisc \
	postgresql chromium

# C helpers: kernel/native/NAME.c becomes kernel/bin/NAME (static, tiny).
NATIVE_SRC := $(wildcard kernel/native/*.c)
NATIVE_BIN := $(patsubst kernel/native/%.c,kernel/bin/%,$(NATIVE_SRC))
# The agent's slice login shell: agent/native/NAME.c becomes agent/bin/NAME.
NATIVE_BIN += $(patsubst agent/native/%.c,agent/bin/%,$(wildcard agent/native/*.c))
# Shared libraries loaded with ctypes: kernel/native/lib/NAME.c becomes kernel/bin/libNAME.so.
NATIVE_BIN += $(patsubst kernel/native/lib/%.c,kernel/bin/lib%.so,$(wildcard kernel/native/lib/*.c))

.PHONY: run test setup system venv native bench lint clean install-units

# `make run NODES=3`: three nodes, each an agent in its own network namespace.
# `make run ARGS='--listen 127.0.0.1:8001'`: options of scripts/run_demo.py (--help).
NODES ?= 1
run: setup
	$(PY) scripts/run_demo.py --nodes $(NODES) $(ARGS)

test: setup
	$(PY) -m pytest -q -rs -p no:cacheprovider tests

setup: system venv native

# Install missing Debian packages only (no network when all are present).
system: .stamp-system
.stamp-system: Makefile
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	touch $@

venv: $(VENV)/.stamp
$(VENV)/.stamp: setup.cfg pyproject.toml .stamp-system
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test,dev]'
	touch $@

native: $(NATIVE_BIN)
kernel/bin/%: kernel/native/%.c kernel/native/sockd.h .stamp-system
	@mkdir -p kernel/bin
	gcc -O2 -Wall -Wextra -Werror -static -o $@ $<
kernel/bin/lib%.so: kernel/native/lib/%.c .stamp-system
	@mkdir -p kernel/bin
	gcc -O2 -Wall -Wextra -Werror -shared -fPIC -o $@ $<
agent/bin/%: agent/native/%.c agent/native/fdio.h .stamp-system
	@mkdir -p agent/bin
	gcc -O2 -Wall -Wextra -Werror -static -o $@ $<

# Run PLC, the agent and the sensors under systemd from this checkout (contrib/README.md):
# the programs linked into /usr/local/bin, the units into /etc/systemd/system, PLC's
# system user, /etc/planetlab. Enables nothing: `systemctl enable --now UNIT` does.
PREFIX ?= /usr/local
install-units: setup
	install -d -m 0755 /etc/planetlab $(PREFIX)/bin $(PREFIX)/share/doc/planetlab/contrib
	for p in plc planetlab-agent planetlab-sensors; do \
		if [ -x $(CURDIR)/$(VENV)/bin/$$p ]; then ln -sfn $(CURDIR)/$(VENV)/bin/$$p $(PREFIX)/bin/$$p; fi; \
	done
	id -u plc >/dev/null 2>&1 || useradd --system --home-dir /var/lib/plc --shell /usr/sbin/nologin plc
	install -m 0644 contrib/*.service /etc/systemd/system/
	install -m 0644 contrib/README.md $(PREFIX)/share/doc/planetlab/contrib/README.md
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: setup
	$(VENV)/bin/ruff check plc agent kernel sensors tests bench
	$(VENV)/bin/mypy plc agent kernel sensors

clean:
	rm -rf $(VENV) kernel/bin agent/bin .stamp-system build *.egg-info
