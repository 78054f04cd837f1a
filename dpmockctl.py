#!/usr/bin/env python3
"""dpmockctl: control a running dpmock server (standard library only).

Usage:
    python3 dpmockctl.py COMMAND [--url URL] [--timeout SECONDS] [--pidfile PATH] [--json]
    python3 dpmockctl.py requests [--path TEXT] [--route NAME] [--scenario NAME] [--key KEY]
                                  [--since SEQ] [--limit N] [--wait-for N] [--url URL] [--timeout SECONDS]

    python3 dpmockctl.py rules add FILE|- | rules list | rules clear [--test NAME]

Commands: status, wait, restart, shutdown, stop, requests, reset, schedules, rules (see --help).
--url defaults to $DP_MOCK_SERVER, else http://127.0.0.1:8080.
Exit codes: 0 success; 1 the server answered with an error, did not finish in time, or died
in a restart; 2 the server could not be reached (or bad command line); 3 not running (status
and restart with --pidfile: no live process holds the pid file, or it is missing and nothing
listens at the URL).
"""
import sys

import dpmocklib  # noqa: F401 - the Python version check, before anything else loads

if __name__ == "__main__":
    from dpmocklib.ctl import main
    sys.exit(main())
