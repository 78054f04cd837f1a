# dpmock: start/stop the mock and run its tests. Works from this folder or when vendored
# (e.g. as tests/mock-server/ of a C project: make -C tests/mock-server start).
PYTHON ?= python3
PORT ?= 8080
HOST ?= 127.0.0.1
#: more dpmock.py options for 'make start': ARGS="--listen 9999 -v --idle-exit 600"
ARGS ?=
HERE := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
PIDFILE ?= $(HERE)/dpmock.pid
LOGFILE ?= $(HERE)/dpmock.log
ENVFILE ?= $(HERE)/dpmock.env
CTL = $(PYTHON) $(HERE)/dpmockctl.py

# Which server stop, status and restart act on: the one an explicit URL or PORT (given on the
# command line) names; else the one this Makefile started (the process holding PIDFILE), at the
# URL the last 'make start' printed (so PORT=0 works), else HOST:PORT.
ifeq ($(origin URL),command line)
SERVER = --url $(URL)
else ifeq ($(origin PORT),command line)
URL = http://$(HOST):$(PORT)
SERVER = --url $(URL)
else
URL = $(or $(shell sed -n 's/^DP_MOCK_SERVER=//p' $(ENVFILE) 2>/dev/null),http://$(HOST):$(PORT))
SERVER = --pidfile $(PIDFILE) --url $(URL)
endif

.PHONY: start stop restart status test check bench certs clean

start:
	@$(PYTHON) $(HERE)/dpmock.py --host $(HOST) --port $(PORT) --pidfile $(PIDFILE) --logfile $(LOGFILE) \
	  $(ARGS) > $(ENVFILE).tmp || { rm -f $(ENVFILE).tmp; exit 1; }
	@mv $(ENVFILE).tmp $(ENVFILE) && cat $(ENVFILE)

# A server that is not running is no error; stale dpmock.pid / dpmock.env are removed.
stop:
	@$(CTL) stop $(SERVER)
	@[ -e $(PIDFILE) ] || rm -f $(ENVFILE) $(ENVFILE).tmp

restart:
	@$(CTL) restart $(SERVER)

# Not running: "dpmockctl: not running: ..." and dpmockctl's exit code 3 (make itself then exits 2).
status:
	@$(CTL) status $(SERVER)

# dpmock's own tests and benchmark are optional when vendoring: say what is missing, in one line.
test:
	@test -f $(HERE)/test_dpmock.py || { echo "make test: $(HERE)/test_dpmock.py is missing (dpmock's own tests, optional when vendoring: copy test_dpmock.py, dpmocklib/tests/, README.md and certs/ to run them)" >&2; exit 1; }
	cd $(HERE) && $(PYTHON) test_dpmock.py

check: test

bench:
	@test -f $(HERE)/bench_dpmock.py || { echo "make bench: $(HERE)/bench_dpmock.py is missing (dpmock's benchmark, optional when vendoring: copy bench_dpmock.py to run it)" >&2; exit 1; }
	cd $(HERE) && $(PYTHON) bench_dpmock.py $(BENCH_ARGS)

# The sandbox's test CA and server certificate (for tests only: never trust them elsewhere). The
# CA may only vouch for the sandbox's hosts and loopback (critical nameConstraints); both lists come
# from dpmocklib/sandbox.py (cert_config), which also writes certs/server.ext. Its key, certs/ca.key,
# stays here for re-signing but is never committed (.gitignore); delete it at will.
CERT_CONFIG = $(PYTHON) -c 'import sys; sys.path.insert(0, sys.argv[1]); from dpmocklib.sandbox import cert_config; print(cert_config(sys.argv[2]), end="")' $(HERE)
certs:
	@command -v openssl >/dev/null || { echo "make certs: the openssl command is not installed" >&2; exit 1; }
	cd $(HERE)/certs && $(CERT_CONFIG) ext > server.ext && names="$$($(CERT_CONFIG) ca)" && \
	openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 36500 -keyout ca.key -out ca.pem \
	  -subj "/O=dpmock/CN=dpmock test CA - never trust outside the sandbox" \
	  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
	  -addext "nameConstraints=critical,$$names" && \
	openssl req -newkey rsa:2048 -nodes -sha256 -keyout server.key -out server.csr -subj "/O=dpmock/CN=dpmock test server" && \
	openssl x509 -req -sha256 -days 36500 -in server.csr -CA ca.pem -CAkey ca.key -set_serial 0x$$(openssl rand -hex 8) \
	  -extfile server.ext -out server.pem && \
	rm -f server.csr

# Stops the server this Makefile started first (by its pid file only), so none is orphaned.
clean:
	@$(CTL) stop --pidfile $(PIDFILE)
	rm -rf $(HERE)/__pycache__ $(HERE)/dpmocklib/__pycache__ $(HERE)/dpmocklib/tests/__pycache__ $(LOGFILE) $(ENVFILE) $(ENVFILE).tmp
