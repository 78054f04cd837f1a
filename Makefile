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

.PHONY: start stop restart status test check bench clean

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

clean:
	rm -rf $(HERE)/__pycache__ $(HERE)/dpmock.log $(HERE)/dpmock.env $(HERE)/dpmock.env.tmp
