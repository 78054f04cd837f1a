#!/usr/bin/env python3
"""dpmockctl: control a running dpmock server (standard library only). ``python3 dpmockctl.py --help``;
the code and its full usage are dpmocklib/ctl.py; the ``dpmockctl`` console script is the same command."""

import sys

import dpmocklib  # noqa: F401 - the Python version check, before anything else loads

if __name__ == "__main__":
    from dpmocklib.ctl import main
    sys.exit(main())
