#!/usr/bin/env python3
"""dpmock: a standard-library-only mock of the OpenAI, Gemini and Anthropic HTTP APIs.

Usage:
    python3 dpmock.py [--host 127.0.0.1] [--port 8080] [--listen [tls:][HOST:]PORT]...
                      [--tls-cert PATH --tls-key PATH] [--foreground]
                      [--pidfile PATH] [--logfile PATH] [--port-file PATH]
                      [--idle-exit SECONDS] [--parent-pid PID] [--journal-size N]
                      [--seed N] [--io-timeout SECONDS] [-q | -v] [--version]
    python3 dpmock.py sandbox [options above] -- CMD [ARGS...]
    python3 dpmock.py record DIR [--upstream PROVIDER=URL]... [options above]

By default it detaches (double fork + setsid) and the launching process exits 0 only once
the daemon is serving, after printing ``DP_MOCK_SERVER=http://HOST:PORT``. ``sandbox`` runs
CMD offline in new mount and network namespaces where the providers' hosts are dpmock.
``record`` serves in the foreground, forwards what no rule answers to the real providers and
saves each answer in DIR as a rule (``--rules DIR`` replays them), printing where each went.

Exit codes: 0 started (or, in the foreground, stopped cleanly); 1 could not start (address
in use, bad host, pidfile locked, log file unwritable); 2 bad command line. ``sandbox``
returns CMD's status, or 125 when the sandbox cannot be made.
"""
import sys

import dpmocklib  # the Python version check, before anything else loads
from dpmocklib import __version__  # noqa: F401 - dpmock.__version__


def __getattr__(name):
    """``dpmock.X`` is the package's name X (``dpmock.MockServer``, ``dpmock.serve``, ``dpmock.ROUTES``, ...),
    found in the first of the package's modules to define it (see dpmocklib/names.py)."""
    import dpmocklib.names
    return dpmocklib.names.find(name, "dpmock")


if __name__ == "__main__":
    from dpmocklib.boot import run
    sys.exit(run())
