"""dpmockctl: control a running dpmock server (standard library only).

Usage:
    python3 dpmockctl.py COMMAND [--url URL] [--timeout SECONDS] [--pidfile PATH] [--json]
    python3 dpmockctl.py requests [--path TEXT] [--route NAME] [--scenario NAME] [--key KEY]
                                  [--since SEQ] [--limit N] [--wait-for N] [--url URL] [--timeout SECONDS]

    python3 dpmockctl.py rules add FILE|- [--test NAME] | rules list [--test NAME] | rules clear --test NAME|--all

Commands: status, wait, restart, shutdown, stop, requests, reset, schedules, rules (see --help).
--url defaults to $DP_MOCK_SERVER, else http://127.0.0.1:8080.
Exit codes: 0 success; 1 the server answered with an error, did not finish in time, or died
in a restart; 2 the server could not be reached (or bad command line); 3 not running (status
and restart with --pidfile: no live process holds the pid file, or it is missing and nothing
listens at the URL).
"""

import argparse
import http.client
import json
import os
import signal
import socket
import sys
import time
from urllib.parse import urlencode, urlsplit

from .daemon import pid_alive

__version__ = "0.1.0"  #: the dpmock release this client belongs to

DEFAULT_URL = "http://127.0.0.1:8080"
EXIT_OK, EXIT_ANSWERED_ERROR, EXIT_UNREACHABLE, EXIT_NOT_RUNNING = 0, 1, 2, 3

HELP = """commands:
  status     print the server's status JSON
  wait       return once the server answers; prints "ready URL pid N"
  restart    restart it and return once the new process answers; prints "ready URL pid N"
             (exit 1 if it died instead: its --logfile says why)
  shutdown   shut it down and return once the port is closed; prints the answer JSON
  stop       like shutdown, but a server that is not running is no error. With --pidfile:
             the process holding that pid file is stopped (SIGTERM); a stale pid file is
             removed; the URL is tried only when the pid file is missing and --url is given
  requests   print the request journal (GET /_control/requests), filtered by --path,
             --route, --scenario, --key, --since, --limit; --wait-for N holds the answer
             until N matching requests have arrived (exit 1 if they do not within --timeout)
  reset      clear the journal and the schedule counters (POST /_control/reset)
  schedules  print the schedule counters (GET /_control/schedules)

exit codes: 0 success; 1 the server answered with an error, did not finish in time, or died
in a restart; 2 unreachable, or a bad command line; 3 not running (status and restart with
--pidfile: no live process holds the pid file, or it is missing and nothing listens at the URL)"""

#: requests' filters: option -> query parameter of GET /_control/requests
FILTERS = {"path": "path", "route": "route", "scenario": "scenario", "key": "key", "since": "since",
           "limit": "limit", "wait_for": "wait_for", "rule": "rule"}


class Unreachable(Exception):
    """No HTTP answer could be had from the server."""


class Answered(Exception):
    """The server answered, but with an error or not in time."""


class NotRunning(Exception):
    """Definitely not running: nothing listens at the URL, or no live process holds the pid file."""


def parse_url(url):
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http URL: %r" % url)
    return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def call(url, method, path, timeout, body=None):
    """One request; returns (status, parsed JSON or text). Raises Unreachable."""
    scheme, host, port = parse_url(url)
    cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    conn = cls(host, port, timeout=timeout)
    headers = {"Connection": "close", "User-Agent": "dpmockctl"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=body if body is not None else b"" if method == "POST" else None,
                     headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except ConnectionRefusedError as e:
        raise NotRunning("cannot reach %s: %s" % (url, e.strerror))
    except (OSError, http.client.HTTPException) as e:
        raise Unreachable("cannot reach %s: %s" % (url, getattr(e, "strerror", None) or e or e.__class__.__name__))
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw.decode("utf-8", "replace")


def get_json(url, method, path, timeout, data=None):
    """A control request that must answer 200 with a JSON object."""
    status, body = call(url, method, path, timeout, data)
    if status != 200 or not isinstance(body, dict):
        raise Answered("server answered HTTP %d: %s" % (status, body if isinstance(body, str) else json.dumps(body)))
    return body


def status_of(url, timeout):
    return get_json(url, "GET", "/_control/status", timeout)


def refuses(url, timeout=1.0):
    """True when nothing listens at the URL's port (the connection is refused)."""
    _, host, port = parse_url(url)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return False
    except ConnectionRefusedError:
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


def pidfile_holder(path):
    """('missing' | 'stale' | 'held', pid or None) for a pid file dpmock holds with flock.

    The probe takes a shared lock for an instant (dpmock's own is exclusive, so a live holder makes
    it fail). A stale file is removed while that lock is held: a server starting at the same moment
    then fails loudly ("locked") instead of losing its fresh pid file.
    """
    import fcntl
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return "missing", None
    except OSError as e:
        raise Answered("cannot open pid file %s: %s" % (path, e.strerror))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode("ascii", "replace").strip()
            if not text.isdigit():
                raise Answered("pid file %s is locked but names no pid (%r)" % (path, text))
            return "held", int(text)
        return "stale", None
    finally:
        os.close(fd)


def remove_stale(path):
    """Remove a pid file no live process holds (checked again under the lock)."""
    import fcntl
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def ready_line(url, body):
    return "ready %s pid %s" % (url, body.get("pid", "?"))


def cmd_status(a):
    if a.pidfile and pidfile_holder(a.pidfile)[0] == "stale":
        raise NotRunning("no live process holds the pid file %s" % a.pidfile)
    return status_of(a.url, a.timeout)


def cmd_wait(a):
    deadline = time.monotonic() + a.timeout

    def check():
        try:
            return status_of(a.url, max(0.1, min(1.0, deadline - time.monotonic())))
        except (Unreachable, NotRunning):
            return None
    body = poll(check, deadline, 0.05)
    if not body:
        raise Unreachable("no answer from %s within %.1f s" % (a.url, a.timeout))
    return body if a.json else ready_line(a.url, body)


def cmd_shutdown(a):
    deadline = time.monotonic() + a.timeout
    status, body = call(a.url, "POST", "/_control/shutdown", a.timeout)
    if status != 200:
        raise Answered("server answered HTTP %d: %s" % (status, body))
    if poll(lambda: refuses(a.url, 0.5), deadline):
        return body
    raise Answered("server accepted shutdown but still listens after %.1f s" % a.timeout)


def cmd_stop(a):
    deadline = time.monotonic() + a.timeout
    if a.pidfile:
        state, pid = pidfile_holder(a.pidfile)
        if state == "stale":
            remove_stale(a.pidfile)
            return "not running (removed stale pid file %s)" % a.pidfile
        if state == "held":
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            except OSError as e:
                raise Answered("cannot signal pid %d: %s" % (pid, e.strerror))
            if not poll(lambda: not pid_alive(pid), deadline):
                raise Answered("pid %d did not stop within %.1f s" % (pid, a.timeout))
            remove_stale(a.pidfile)
            return "stopped pid %d" % pid
        if not a.url_given:
            return "not running (no pid file %s)" % a.pidfile
    try:
        body = cmd_shutdown(a)
    except NotRunning:
        return "not running (nothing listens at %s)" % a.url
    return "stopped %s pid %s" % (a.url, body.get("pid", "?") if isinstance(body, dict) else "?")


def cmd_restart(a):
    deadline = time.monotonic() + a.timeout
    if a.pidfile and pidfile_holder(a.pidfile)[0] == "stale":
        raise NotRunning("no live process holds the pid file %s" % a.pidfile)
    before = status_of(a.url, a.timeout)
    status, body = call(a.url, "POST", "/_control/restart", a.timeout)
    if status != 200:
        raise Answered("server answered HTTP %d: %s" % (status, body))
    pid, died = before.get("pid"), []

    def check():
        try:
            now = status_of(a.url, max(0.1, min(1.0, deadline - time.monotonic())))
        except NotRunning:
            # The listening socket survives a restart (it is inherited across exec): a refused
            # connection means the new process could not start and took the socket with it.
            died.append(True)
            return True
        except (Unreachable, Answered):
            return None
        return now if now.get("boot_id") != before.get("boot_id") else None
    after = poll(check, deadline)
    if died:
        raise Answered("server died in the restart (pid %s; %s refuses connections): its --logfile, "
                       "or stderr in the foreground, says why" % (pid, a.url))
    if not after:
        gone = " (pid %s is gone)" % pid if isinstance(pid, int) and not pid_alive(pid) else ""
        raise Answered("server did not come back from restart within %.1f s%s" % (a.timeout, gone))
    return after if a.json else ready_line(a.url, after)


def cmd_requests(a):
    query = {param: getattr(a, name) for name, param in FILTERS.items() if getattr(a, name) is not None}
    if a.test:
        query["test"] = a.test
    if a.wait_for:
        query["timeout"] = "%g" % min(60.0, max(0.0, a.timeout - 0.5))  # the answer comes before ours gives up
    body = get_json(a.url, "GET", "/_control/requests" + ("?" + urlencode(query) if query else ""), a.timeout)
    if body.get("timed_out"):
        emit(json.dumps(body, indent=2))
        raise Answered("%d of %d matching requests arrived within %.1f s" % (body.get("matched", 0), a.wait_for,
                                                                            a.timeout))
    return body


def _test_query(a):
    return "?" + urlencode({"test": a.test}) if a.test else ""


def cmd_reset(a):
    return get_json(a.url, "POST", "/_control/reset" + _test_query(a), a.timeout)


def cmd_schedules(a):
    return get_json(a.url, "GET", "/_control/schedules" + _test_query(a), a.timeout)


def cmd_rules(a):
    """rules add FILE|- (a rule or a list, as JSON), rules list, rules clear; --test NAME for one test."""
    if a.action == "list":
        return get_json(a.url, "GET", "/_control/rules" + _test_query(a), a.timeout)
    if a.action == "clear":
        return get_json(a.url, "DELETE", "/_control/rules" + _test_query(a), a.timeout)
    try:
        if a.file == "-":
            text = sys.stdin.read()
        else:
            with open(a.file, encoding="utf-8") as f:
                text = f.read()
        json.loads(text)
    except OSError as e:
        raise Answered("cannot read %s: %s" % (a.file, e.strerror))
    except ValueError as e:
        raise Answered("%s is not JSON: %s" % (a.file, e))
    return get_json(a.url, "POST", "/_control/rules" + _test_query(a), a.timeout, text.encode("utf-8"))


COMMANDS = {"status": cmd_status, "wait": cmd_wait, "restart": cmd_restart, "shutdown": cmd_shutdown,
            "stop": cmd_stop, "requests": cmd_requests, "reset": cmd_reset, "schedules": cmd_schedules,
            "rules": cmd_rules}


def emit(text):
    """Print; a reader that left early (``status | head -3``) is no error and prints no traceback."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's last flush cannot fail again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, not argparse's usage block: scripts log it as is."""
        self.exit(EXIT_UNREACHABLE, "%s: error: %s (see --help)\n" % (self.prog, message))


def _count(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError("expected a whole number >= 0, got %r" % text)
    return value


def parser():
    prog = "dpmockctl" if os.path.basename(sys.argv[0]) == "dpmockctl" else "dpmockctl.py"  # the console script
    p = _Parser(prog=prog, description="Control a running dpmock server.", epilog=HELP,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help=", ".join(COMMANDS))
    p.add_argument("action", nargs="?", metavar="ACTION", help="rules: add FILE|-, list or clear")
    p.add_argument("file", nargs="?", metavar="FILE", help="rules add: a JSON file of rules, or - for stdin")
    p.add_argument("--test", metavar="NAME", help="rules, requests, reset, schedules: one test's namespace")
    p.add_argument("--url", metavar="URL", help="server base URL (default: $DP_MOCK_SERVER, else %s)" % DEFAULT_URL)
    p.add_argument("--timeout", type=float, metavar="SECONDS", default=10.0,
                   help="seconds to wait in all (default 10)")
    p.add_argument("--pidfile", metavar="PATH",
                   help="the server is the one holding this pid file (status, stop, restart)")
    p.add_argument("--json", action="store_true", help="wait, restart: print the status JSON, not one line")
    p.add_argument("--all", action="store_true", help="rules clear: every test's run-time rules and the global ones")
    p.add_argument("--version", action="version", version="dpmockctl " + __version__)
    g = p.add_argument_group("requests filters")
    g.add_argument("--path", metavar="TEXT", help="path contains TEXT")
    g.add_argument("--route", metavar="NAME", help="route name (chat, messages, gemini_generate, ...)")
    g.add_argument("--scenario", metavar="NAME", help="scenario name")
    g.add_argument("--key", help="the API key sent (unmasked)")
    g.add_argument("--rule", metavar="ID", help="answered by this rule")
    g.add_argument("--since", type=_count, metavar="SEQ", help="only entries after this seq")
    g.add_argument("--limit", type=_count, metavar="N", help="the last N (default 100)")
    g.add_argument("--wait-for", type=_count, dest="wait_for", metavar="N",
                   help="hold the answer until N match (or --timeout)")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    if not 0 < a.timeout <= 86400:
        p.error("--timeout must be a number of seconds above 0, at most 86400, not %r" % a.timeout)
    used = [name for name in FILTERS if getattr(a, name) is not None]
    if used and a.command != "requests":
        p.error("--%s goes with the requests command only" % used[0].replace("_", "-"))
    if a.limit == 0:
        p.error("--limit must be at least 1")
    if a.command == "rules":
        if a.action not in ("add", "list", "clear"):
            p.error("rules takes add FILE|-, list or clear")
        if (a.action == "add") != (a.file is not None):
            p.error("rules add takes one FILE (or - for stdin); list and clear take none")
        if a.action == "clear" and not a.test and not a.all:
            p.error("rules clear without --test removes the run-time rules of every test: say --all for that, "
                    "or --test NAME for one test's")
        if a.all and (a.action != "clear" or a.test):
            p.error("--all goes with rules clear, without --test")
    elif a.all:
        p.error("--all goes with rules clear only")
    elif a.action is not None:
        p.error("unrecognized argument %r" % a.action)
    a.url_given = a.url is not None
    a.url = (a.url or os.environ.get("DP_MOCK_SERVER") or DEFAULT_URL).rstrip("/")
    try:
        parse_url(a.url)
    except ValueError as e:
        p.error(str(e))
    try:
        result = COMMANDS[a.command](a)
    except NotRunning as e:
        if a.pidfile and a.command in ("status", "restart"):
            print("dpmockctl: not running: %s" % e, file=sys.stderr)
            return EXIT_NOT_RUNNING
        print("dpmockctl: %s" % e, file=sys.stderr)
        return EXIT_UNREACHABLE
    except Unreachable as e:
        print("dpmockctl: %s" % e, file=sys.stderr)
        return EXIT_UNREACHABLE
    except Answered as e:
        print("dpmockctl: %s" % e, file=sys.stderr)
        return EXIT_ANSWERED_ERROR
    emit(result if isinstance(result, str) else json.dumps(result, indent=2))
    return EXIT_OK

