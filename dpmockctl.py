#!/usr/bin/env python3
"""dpmockctl: control a running dpmock server (standard library only).

Usage:
    python3 dpmockctl.py status|restart|shutdown|wait [--url URL] [--timeout SECONDS]

--url defaults to $DP_MOCK_SERVER, else http://127.0.0.1:8080.
Exit codes: 0 success; 1 the server answered with an error (or did not finish in time);
2 the server could not be reached (or bad command line).
"""

import argparse
import http.client
import json
import os
import socket
import sys
import time
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:8080"
EXIT_OK, EXIT_ANSWERED_ERROR, EXIT_UNREACHABLE = 0, 1, 2


class Unreachable(Exception):
    """No HTTP answer could be had from the server."""


class Answered(Exception):
    """The server answered, but with an error or not in time."""


def parse_url(url):
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http URL: %r" % url)
    return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def call(url, method, path, timeout):
    """One request; returns (status, parsed JSON or text). Raises Unreachable."""
    scheme, host, port = parse_url(url)
    cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    conn = cls(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None,
                     headers={"Connection": "close", "User-Agent": "dpmockctl"})
        resp = conn.getresponse()
        raw = resp.read()
    except (OSError, http.client.HTTPException) as e:
        raise Unreachable("cannot reach %s: %s" % (url, getattr(e, "strerror", None) or e or e.__class__.__name__))
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw.decode("utf-8", "replace")


def status_of(url, timeout):
    status, body = call(url, "GET", "/_control/status", timeout)
    if status != 200 or not isinstance(body, dict):
        raise Answered("server answered HTTP %d: %s" % (status, body if isinstance(body, str) else json.dumps(body)))
    return body


def port_open(url, timeout=1.0):
    _, host, port = parse_url(url)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def poll(check, deadline, interval=0.02):
    """Call check() until it returns a true value or the deadline passes; return its last value."""
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def cmd_status(url, timeout):
    return status_of(url, timeout)


def cmd_wait(url, timeout):
    deadline = time.monotonic() + timeout

    def check():
        try:
            return status_of(url, max(0.1, min(1.0, deadline - time.monotonic())))
        except Unreachable:
            return None
    body = poll(check, deadline, 0.05)
    if not body:
        raise Unreachable("no answer from %s within %.1f s" % (url, timeout))
    return body


def cmd_shutdown(url, timeout):
    deadline = time.monotonic() + timeout
    status, body = call(url, "POST", "/_control/shutdown", timeout)
    if status != 200:
        raise Answered("server answered HTTP %d: %s" % (status, body))
    if poll(lambda: not port_open(url, 0.5), deadline):
        return body
    raise Answered("server accepted shutdown but still listens after %.1f s" % timeout)


def cmd_restart(url, timeout):
    deadline = time.monotonic() + timeout
    before = status_of(url, timeout).get("boot_id")
    status, body = call(url, "POST", "/_control/restart", timeout)
    if status != 200:
        raise Answered("server answered HTTP %d: %s" % (status, body))

    def check():
        try:
            now = status_of(url, max(0.1, min(1.0, deadline - time.monotonic())))
        except (Unreachable, Answered):
            return None
        return now if now.get("boot_id") != before else None
    after = poll(check, deadline)
    if not after:
        raise Answered("server did not come back from restart within %.1f s" % timeout)
    return after


COMMANDS = {"status": cmd_status, "restart": cmd_restart, "shutdown": cmd_shutdown, "wait": cmd_wait}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, not argparse's usage block: scripts log it as is."""
        self.exit(EXIT_UNREACHABLE, "dpmockctl.py: error: %s (see --help)\n" % message)


def main(argv=None):
    p = _Parser(prog="dpmockctl.py", description="Control a running dpmock server.")
    p.add_argument("command", choices=sorted(COMMANDS), help="what to do")
    p.add_argument("--url", default=os.environ.get("DP_MOCK_SERVER") or DEFAULT_URL,
                   help="server base URL (default: $DP_MOCK_SERVER, else %s)" % DEFAULT_URL)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait in all (default 10)")
    a = p.parse_args(argv)
    if a.timeout <= 0:
        p.error("--timeout must be positive")
    try:
        parse_url(a.url)
    except ValueError as e:
        p.error(str(e))
    try:
        body = COMMANDS[a.command](a.url.rstrip("/"), a.timeout)
    except Unreachable as e:
        print("dpmockctl: %s" % e, file=sys.stderr)
        return EXIT_UNREACHABLE
    except Answered as e:
        print("dpmockctl: %s" % e, file=sys.stderr)
        return EXIT_ANSWERED_ERROR
    print(json.dumps(body, indent=2))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
