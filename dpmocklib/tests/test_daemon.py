"""The daemon: detaching, pid files, signals, restarts (also broken ones), the harness variables."""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unittest

from dpmocklib.base import scenarios

from .support import DPMOCK, PY, SERVER, Server, ctl, kill_pidfile, pid_of, recv_all, run, vendored_copy, wait_gone


class HarnessTest(unittest.TestCase):

    def test_port_file_in_daemon_and_foreground(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        pidfile, portfile = os.path.join(d, "pid"), os.path.join(d, "port")
        self.addCleanup(kill_pidfile, pidfile)
        r = run([PY, DPMOCK, "--port", "0", "--pidfile", pidfile, "--port-file", portfile])
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(portfile) as f:
            port = int(f.read())
        self.assertTrue(r.stdout.decode().strip().endswith(":%d" % port))
        with open(pidfile) as f:
            pid = int(f.read())
        self.assertEqual(ctl("shutdown", "--url", "http://127.0.0.1:%d" % port).returncode, 0)
        self.assertTrue(wait_gone(pid))
        self.assertFalse(os.path.exists(pidfile))
        self.assertFalse(os.path.exists(portfile))
        srv = Server("--port-file", portfile)
        self.addCleanup(srv.stop)
        with open(portfile) as f:
            self.assertEqual(int(f.read()), srv.port)

    def test_io_timeout_closes_idle_and_stalled_connections(self):
        srv = Server("--io-timeout", "1")
        self.addCleanup(srv.stop)
        for data in (b"", b"GET /v1/models HTTP/1.1\r\nHost: x\r\n",
                     b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{\"a\""):
            with self.subTest(data=data):
                with socket.create_connection((srv.host, srv.port), timeout=10) as s:
                    s.sendall(data)
                    t0 = time.monotonic()
                    self.assertEqual(recv_all(s), b"")  # closed, without an answer
                    self.assertTrue(0.9 <= time.monotonic() - t0 < 5)
        self.assertEqual(srv.request("GET", "/_control/status")[0], 200)

    def test_idle_exit(self):
        srv = Server("--idle-exit", "0.5")
        self.addCleanup(srv.stop)
        for _ in range(3):
            time.sleep(0.3)
            self.assertEqual(srv.request("GET", "/_control/status")[0], 200)  # activity keeps it alive
        self.assertEqual(srv.proc.wait(5), 0)

    def test_parent_pid(self):
        parent = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
        self.addCleanup(parent.kill)
        srv = Server("--parent-pid", str(parent.pid))
        self.addCleanup(srv.stop)
        time.sleep(0.3)
        self.assertIsNone(srv.proc.poll())
        parent.kill()
        parent.wait()
        self.assertEqual(srv.proc.wait(5), 0)


class DaemonTest(unittest.TestCase):

    def start_daemon(self, *args, cwd=None):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        pidfile = os.path.join(d, "dpmock.pid")
        self.addCleanup(kill_pidfile, pidfile)
        r = run([PY, DPMOCK, "--port", "0", "--pidfile", pidfile] + list(args), cwd=cwd or d)
        return r, pidfile, d

    def test_start_is_ready_on_exit_and_stops_on_sigterm(self):
        r, pidfile, _ = self.start_daemon()
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stderr, b"")
        m = re.match(rb"^DP_MOCK_SERVER=(http://127\.0\.0\.1:(\d+))\n$", r.stdout)
        self.assertTrue(m, r.stdout)
        port = int(m.group(2))
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # accepting as soon as the launcher returned: no sleep, no poll
        with open(pidfile) as f:
            pid = int(f.read())
        self.assertNotEqual(pid, os.getpid())
        os.kill(pid, signal.SIGTERM)
        self.assertTrue(wait_gone(pid))
        self.assertFalse(os.path.exists(pidfile))
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()

    def test_second_daemon_on_same_pidfile_fails_in_one_line(self):
        r, pidfile, d = self.start_daemon()
        self.assertEqual(r.returncode, 0)
        url = r.stdout.decode().strip().split("=", 1)[1]
        r2 = run([PY, DPMOCK, "--port", "0", "--pidfile", pidfile])
        self.assertEqual(r2.returncode, 1)
        lines = r2.stderr.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("locked", lines[0])
        self.assertEqual(ctl("shutdown", "--url", url).returncode, 0)

    def test_busy_port_fails_in_one_line(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            port = s.getsockname()[1]
            for extra in ([], ["--foreground"]):
                r = run([PY, DPMOCK, "--port", str(port)] + extra)
                self.assertEqual(r.returncode, 1)
                err = r.stderr.decode()
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertIn(str(port), err)
                self.assertIn("in use", err)
                self.assertNotIn("Traceback", err)

    def test_bad_host_and_bad_args(self):
        r = run([PY, DPMOCK, "--host", "no-such-host.invalid", "--port", "0"])
        self.assertEqual(r.returncode, 1)
        self.assertEqual(len(r.stderr.decode().strip().splitlines()), 1, r.stderr)
        for args in (["--port", "99999"], ["--port"], ["--bogus"], ["-q", "-v"], ["--port", "x"]):
            r = run([PY, DPMOCK] + args)
            self.assertEqual(r.returncode, 2, args)
            self.assertEqual(len(r.stderr.decode().strip().splitlines()), 1, r.stderr)
        r = run([PY, DPMOCK, "--help"])
        self.assertEqual((r.returncode, r.stdout[:6]), (0, b"usage:"))

    def test_restart_keeps_socket_and_refuses_no_one(self):
        # Relative pid file and log file from another directory: the daemon chdirs to / yet restarts.
        r, pidfile, d = self.start_daemon("--logfile", "log.txt")
        self.assertEqual(r.returncode, 0, r.stderr)
        url = r.stdout.decode().strip().split("=", 1)[1]
        host, port = url[7:].rsplit(":", 1)
        with open(pidfile) as f:
            pid = int(f.read())
        errors, count, stop = [], [0], threading.Event()

        def load():
            while not stop.is_set():
                try:
                    c = http.client.HTTPConnection(host, int(port), timeout=10)
                    c.request("GET", "/_control/status")
                    c.getresponse().read()
                    c.close()
                    count[0] += 1
                except Exception as e:  # any failure is what this test looks for
                    errors.append(repr(e))
        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            boots = set()
            for _ in range(3):
                r = ctl("restart", "--url", url, "--json")
                self.assertEqual(r.returncode, 0, r.stderr)
                boots.add(json.loads(r.stdout)["boot_id"])
        finally:
            stop.set()
            for t in threads:
                t.join()
        self.assertEqual(errors, [])
        self.assertGreater(count[0], 10)
        self.assertEqual(len(boots), 3)
        st = json.loads(ctl("status", "--url", url).stdout)
        self.assertEqual((st["pid"], st["restarts"]), (pid, 3))
        self.assertTrue(os.path.exists(os.path.join(d, "log.txt")))
        self.assertEqual(ctl("shutdown", "--url", url).returncode, 0)
        self.assertTrue(wait_gone(pid))
        self.assertFalse(os.path.exists(pidfile))

    def test_idle_keep_alive_connection_does_not_delay_a_stop(self):
        srv = Server()
        self.addCleanup(srv.stop)
        c = srv.conn()
        self.addCleanup(c.close)
        c.request("GET", "/_control/status")
        c.getresponse().read()  # the connection now idles, kept alive
        t0 = time.monotonic()
        self.assertEqual(srv.stop(), 0)
        self.assertLess(time.monotonic() - t0, 2)

    def test_foreground_sigint_stops_cleanly(self):
        srv = Server()
        self.addCleanup(srv.stop)
        srv.proc.send_signal(signal.SIGINT)
        self.assertEqual(srv.proc.wait(10), 0)
        self.assertNotIn(b"Traceback", srv.errors())

    def test_status_fields(self):
        st, _, data = SERVER.request("GET", "/_control/status")
        body = json.loads(data)
        for k in ("status", "version", "pid", "foreground_mode", "endpoints", "uptime_s", "requests", "scenarios"):
            self.assertIn(k, body)
        self.assertEqual(body["scenarios"], scenarios.names())
        self.assertTrue(body["foreground_mode"])


class BrokenRestartTest(unittest.TestCase):
    """A restart onto code that no longer loads: one line in the log, no pid file, dpmockctl says so."""

    def break_catalogue(self, dest):
        with open(os.path.join(dest, "scenarios.py"), "a") as f:
            f.write("\nbroken = (\n")

    def test_daemon_logs_why_removes_pid_file_and_ctl_reports_death(self):
        dest = vendored_copy(self)
        pidfile, log, portfile = (os.path.join(dest, n) for n in ("dpmock.pid", "dpmock.log", "dpmock.port"))
        r = run([PY, os.path.join(dest, "dpmock.py"), "--port", "0", "--pidfile", pidfile, "--logfile", log,
                 "--port-file", portfile])
        self.assertEqual(r.returncode, 0, r.stderr)
        url = r.stdout.decode().strip().split("=", 1)[1]
        pid = pid_of(pidfile)
        self.break_catalogue(dest)
        t0 = time.monotonic()
        r = ctl("restart", "--url", url, "--timeout", "10")
        self.assertLess(time.monotonic() - t0, 5)  # told at once, not after the timeout
        self.assertEqual(r.returncode, 1)
        err = r.stderr.decode()
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("died", err)
        self.assertTrue(wait_gone(pid))
        self.assertFalse(os.path.exists(pidfile))
        self.assertFalse(os.path.exists(portfile))
        with open(log) as f:
            last = f.read().strip().splitlines()[-1]
        self.assertIn("cannot start: %s line" % os.path.join(dest, "scenarios.py"), last)
        self.assertIn("SyntaxError", last)
        self.assertIn("dpmock[%d]" % pid, last)

    def test_foreground_says_why_on_stderr(self):
        dest = vendored_copy(self)
        proc = subprocess.Popen([PY, os.path.join(dest, "dpmock.py"), "--foreground", "--port", "0", "-q"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(proc.kill)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.stderr.close)
        url = proc.stdout.readline().decode().strip().split("=", 1)[1]
        self.break_catalogue(dest)
        self.assertEqual(ctl("restart", "--url", url).returncode, 1)
        self.assertEqual(proc.wait(10), 1)
        err = proc.stderr.read().decode()
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertTrue(err.startswith("dpmock: cannot start: "), err)

    def test_fresh_start_fails_in_one_line_and_leaves_others_pid_file(self):
        dest = vendored_copy(self)
        self.break_catalogue(dest)
        pidfile = os.path.join(dest, "other.pid")
        with open(pidfile, "w") as f:
            f.write("1\n")
        r = run([PY, os.path.join(dest, "dpmock.py"), "--port", "0", "--pidfile", pidfile])
        self.assertEqual((r.returncode, r.stdout), (1, b""))
        self.assertEqual(len(r.stderr.decode().strip().splitlines()), 1, r.stderr)
        self.assertNotIn(b"Traceback", r.stderr)
        self.assertTrue(os.path.exists(pidfile))  # never ours: not removed
