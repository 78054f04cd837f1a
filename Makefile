# dpmock: start/stop the mock and run its tests. Works from this folder or when vendored
# (e.g. as tests/mock-server/ of a C project: make -C tests/mock-server start).
PYTHON ?= python3
PORT ?= 8080
HOST ?= 127.0.0.1
HERE := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
PIDFILE ?= $(HERE)/dpmock.pid
LOGFILE ?= $(HERE)/dpmock.log
ENVFILE ?= $(HERE)/dpmock.env
# The URL the last 'make start' printed (so PORT=0 works), else HOST:PORT.
URL = $(or $(shell sed -n 's/^DP_MOCK_SERVER=//p' $(ENVFILE) 2>/dev/null),http://$(HOST):$(PORT))

.PHONY: start stop restart status test check bench certs clean

start:
	$(PYTHON) $(HERE)/dpmock.py --host $(HOST) --port $(PORT) --pidfile $(PIDFILE) --logfile $(LOGFILE) > $(ENVFILE).tmp \
	  || { rm -f $(ENVFILE).tmp; exit 1; }
	@mv $(ENVFILE).tmp $(ENVFILE) && cat $(ENVFILE)

stop:
	$(PYTHON) $(HERE)/dpmockctl.py shutdown --url $(URL) > /dev/null
	@rm -f $(ENVFILE)

restart:
	$(PYTHON) $(HERE)/dpmockctl.py restart --url $(URL)

status:
	@$(PYTHON) $(HERE)/dpmockctl.py status --url $(URL)

test:
	cd $(HERE) && $(PYTHON) test_dpmock.py

check: test

bench:
	cd $(HERE) && $(PYTHON) bench_dpmock.py $(BENCH_ARGS)

# The sandbox's test CA and server certificate (for tests only: never trust them elsewhere).
certs:
	@command -v openssl >/dev/null || { echo "make certs: the openssl command is not installed" >&2; exit 1; }
	cd $(HERE)/certs && \
	openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 36500 -keyout ca.key -out ca.pem \
	  -subj "/O=dpmock/CN=dpmock test CA - never trust outside the sandbox" \
	  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" && \
	openssl req -newkey rsa:2048 -nodes -sha256 -keyout server.key -out server.csr -subj "/O=dpmock/CN=dpmock test server" && \
	openssl x509 -req -sha256 -days 36500 -in server.csr -CA ca.pem -CAkey ca.key -set_serial 0x$$(openssl rand -hex 8) \
	  -extfile server.ext -out server.pem && \
	rm -f server.csr

clean:
	rm -rf $(HERE)/__pycache__ $(HERE)/dpmock.log $(HERE)/dpmock.env $(HERE)/dpmock.env.tmp
