"""dpmockctl: status, wait, stop, restart, requests, rules."""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import unittest
from http.server import BaseHTTPRequestHandler
from http.server import HTTPServer

import dpmock

from .support import (DPMOCK, DPMOCKCTL, OA, PY, SERVER, Server, chat_body, ctl, free_port, kill_pidfile, pid_of,
    run, wait_gone)


class CtlTest(unittest.TestCase):

    ctl = staticmethod(ctl)

    def test_status_ok_and_default_url_from_env(self):
        r = self.ctl("status", env=dict(os.environ, DP_MOCK_SERVER=SERVER.url))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout)["status"], "running")

    def test_unreachable_is_2(self):
        for cmd in ("status", "shutdown", "restart"):
            r = self.ctl(cmd, "--url", "http://127.0.0.1:%d" % free_port(), "--timeout", "1")
            self.assertEqual(r.returncode, 2, cmd)
            self.assertEqual(len(r.stderr.decode().strip().splitlines()), 1)
        r = self.ctl("wait", "--url", "http://127.0.0.1:%d" % free_port(), "--timeout", "0.3")
        self.assertEqual(r.returncode, 2)

    def test_error_answer_is_1(self):
        class NotFound(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_error(404)
            do_POST = do_GET

            def log_message(self, *a):
                pass
        other = HTTPServer(("127.0.0.1", 0), NotFound)
        t = threading.Thread(target=other.serve_forever, daemon=True)
        t.start()
        self.addCleanup(other.server_close)
        self.addCleanup(other.shutdown)
        url = "http://127.0.0.1:%d" % other.server_address[1]
        for cmd in ("status", "shutdown", "restart", "wait"):
            r = self.ctl(cmd, "--url", url, "--timeout", "1")
            self.assertEqual(r.returncode, 1, (cmd, r.stderr))

    def test_wait_and_shutdown(self):
        srv = Server()
        self.addCleanup(srv.stop)
        self.assertEqual(self.ctl("wait", "--url", srv.url).returncode, 0)
        r = self.ctl("shutdown", "--url", srv.url)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout)["status"], "shutting_down")
        with self.assertRaises(OSError):  # shutdown returned only once the port was closed
            socket.create_connection((srv.host, srv.port), timeout=1).close()
        self.assertEqual(srv.proc.wait(10), 0)

    def test_bad_usage_is_2(self):
        for args in (("explode",), ("status", "--url", "ftp://x"), ("status", "--timeout", "0")):
            r = self.ctl(*args)
            self.assertEqual(r.returncode, 2, args)
            self.assertEqual(len(r.stderr.decode().strip().splitlines()), 1, r.stderr)


class CtlCommandsTest(unittest.TestCase):

    ctl = staticmethod(ctl)

    def test_version(self):
        r = self.ctl("--version")
        self.assertEqual((r.returncode, r.stdout.decode()), (0, "dpmockctl %s\n" % dpmock.__version__))

    def test_a_reader_that_leaves_early_is_no_error(self):
        rfd, wfd = os.pipe()
        os.close(rfd)  # like `status | head -3` once head has gone
        try:
            r = subprocess.run([PY, DPMOCKCTL, "status", "--url", SERVER.url], stdout=wfd, stderr=subprocess.PIPE,
                               timeout=30)
        finally:
            os.close(wfd)
        self.assertEqual((r.returncode, r.stderr), (0, b""))

    def test_wait_and_restart_print_one_line_or_json(self):
        srv = Server()
        self.addCleanup(srv.stop)
        pid = srv.proc.pid
        for cmd in ("wait", "restart"):
            r = self.ctl(cmd, "--url", srv.url)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(r.stdout.decode(), "ready %s pid %d\n" % (srv.url, pid))
            r = self.ctl(cmd, "--url", srv.url, "--json")
            self.assertEqual(json.loads(r.stdout)["pid"], pid)

    def test_requests_filters_and_wait_for(self):
        srv = Server()
        self.addCleanup(srv.stop)
        srv.request("POST", "/v1/chat/completions", chat_body(), {"Authorization": "Bearer sk-one"})
        srv.request("GET", "/v1/models", None, {"Authorization": "Bearer sk-two"})
        srv.request("POST", "/v1/chat/completions", chat_body(), {"Authorization": "Bearer RATE_LIMIT_COMPLETION"})

        def journal(*args):
            r = self.ctl("requests", "--url", srv.url, *args)
            self.assertEqual(r.returncode, 0, r.stderr)
            return [(e["seq"], e["path"]) for e in json.loads(r.stdout)["requests"]]
        self.assertEqual(len(journal()), 3)
        self.assertEqual(journal("--path", "/models"), [(2, "/v1/models")])
        self.assertEqual(journal("--route", "chat", "--limit", "1"), [(3, "/v1/chat/completions")])
        self.assertEqual(journal("--scenario", "RATE_LIMIT_COMPLETION"), [(3, "/v1/chat/completions")])
        self.assertEqual(journal("--key", "sk-two"), [(2, "/v1/models")])
        self.assertEqual(journal("--since", "2"), [(3, "/v1/chat/completions")])
        t0 = time.monotonic()
        r = self.ctl("requests", "--url", srv.url, "--path", "/messages", "--wait-for", "1", "--timeout", "1")
        self.assertEqual(r.returncode, 1)
        self.assertLess(time.monotonic() - t0, 3)
        self.assertTrue(json.loads(r.stdout)["timed_out"])
        self.assertIn("0 of 1", r.stderr.decode())
        later = threading.Timer(0.3, srv.request, ("GET", "/v1/models/gpt-4o", None, OA))
        later.start()
        self.addCleanup(later.join)
        r = self.ctl("requests", "--url", srv.url, "--route", "models_get", "--wait-for", "1", "--timeout", "5")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout)["count"], 1)
        for args in (("status", "--path", "x"), ("requests", "--limit", "0"), ("requests", "--wait-for", "-1"),
                     ("requests", "--since", "x"), ("status", "--timeout", "inf"), ("status", "--url", "http://h:99999")):
            r = self.ctl("--url", srv.url, *args)
            self.assertEqual(r.returncode, 2, args)
            self.assertEqual(len(r.stderr.decode().strip().splitlines()), 1, r.stderr)

    def test_schedules_and_reset(self):
        srv = Server()
        self.addCleanup(srv.stop)
        srv.request("POST", "/v1/chat/completions", chat_body(),
                    {"Authorization": "Bearer sk-ctl-key", "X-DP-Scenario": "FAIL_FIRST; n=1"})
        r = self.ctl("schedules", "--url", srv.url)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(len(json.loads(r.stdout)["counters"]), 1)
        r = self.ctl("reset", "--url", srv.url)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout), {"cleared_requests": 1, "cleared_counters": 1, "test": None})
        self.assertEqual(json.loads(self.ctl("schedules", "--url", srv.url).stdout)["counters"], [])

    def test_stop_and_status_by_pid_file(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        pidfile = os.path.join(d, "x.pid")
        self.addCleanup(kill_pidfile, pidfile)
        nowhere = "http://127.0.0.1:%d" % free_port()
        r = self.ctl("status", "--pidfile", pidfile, "--url", nowhere)  # no pid file, nothing listens
        self.assertEqual(r.returncode, 3, r.stderr)
        self.assertIn("not running", r.stderr.decode())
        self.assertEqual(self.ctl("status", "--url", nowhere).returncode, 2)  # without --pidfile: as before
        r = run([PY, DPMOCK, "--port", "0", "--pidfile", pidfile])
        self.assertEqual(r.returncode, 0, r.stderr)
        url = r.stdout.decode().strip().split("=", 1)[1]
        pid = pid_of(pidfile)
        self.assertEqual(self.ctl("status", "--pidfile", pidfile, "--url", url).returncode, 0)
        r = self.ctl("stop", "--pidfile", pidfile)  # by the pid file alone: no URL needed
        self.assertEqual((r.returncode, r.stdout.decode()), (0, "stopped pid %d\n" % pid), r.stderr)
        self.assertTrue(wait_gone(pid))
        self.assertFalse(os.path.exists(pidfile))
        stale = os.path.join(d, "stale.pid")  # not one kill_pidfile acts on: its pid may be reused
        with open(stale, "w") as f:  # what a kill -9 leaves: a pid file nobody holds
            f.write("%d\n" % pid)
        r = self.ctl("status", "--pidfile", stale, "--url", SERVER.url)  # a server there is not this one
        self.assertEqual(r.returncode, 3, r.stderr)
        self.assertTrue(os.path.exists(stale))  # status changes nothing
        r = self.ctl("stop", "--pidfile", stale, "--url", SERVER.url)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("not running", r.stdout.decode())
        self.assertFalse(os.path.exists(stale))
        self.assertEqual(SERVER.request("GET", "/_control/status")[0], 200)  # never touched
        r = self.ctl("stop", "--url", nowhere)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.ctl("shutdown", "--url", nowhere).returncode, 2)  # shutdown stays strict
