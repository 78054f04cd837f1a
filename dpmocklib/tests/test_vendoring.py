"""Vendoring: a copy in a C library's tests/mock-server/, its Makefile and the automake recipe."""

import json
import os
import re
import signal
import unittest

from .support import (CURL, HERE, PY, SERVER, SHIPPED, Server, free_port, lines_of, make_env, pid_of, run,
    vendored_copy, wait_gone)


class VendoredMakefileTest(unittest.TestCase):
    """The Makefile's targets, run from a temporary copy of the folder, as a vendoring project has it."""

    def make(self, dest, *args, env=None):
        # From inside the folder (no -C): make then prints only what the recipes print.
        return run(["make"] + list(args), cwd=dest, env=make_env(env))

    def start(self, dest, *args):
        r = self.make(dest, "start", "PORT=0", *args)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(len(r.stdout.decode().splitlines()), 1, r.stdout)  # only the DP_MOCK_SERVER= line
        self.assertTrue(r.stdout.startswith(b"DP_MOCK_SERVER=http://127.0.0.1:"), r.stdout)
        return r.stdout.decode().strip().split("=", 1)[1], pid_of(os.path.join(dest, "dpmock.pid"))

    def test_start_passes_args_and_prints_one_line(self):
        dest = vendored_copy(self)
        url, pid = self.start(dest, "ARGS=--listen 127.0.0.1:0 --refuse-key sk-refused -v")
        st = json.loads(self.make(dest, "status").stdout)
        self.assertEqual((st["pid"], len(st["urls"])), (pid, 2))
        self.assertEqual(self.make(dest, "restart").stdout.decode(), "ready %s pid %d\n" % (url, pid))
        r = run([CURL or "false", "-s", "-o", "/dev/null", "-w", "%{http_code}", url + "/v1/models",
                 "-H", "Authorization: Bearer sk-refused-1"]) if CURL else None
        if r is not None:
            self.assertEqual(r.stdout, b"401")  # ARGS survive the restart
        self.assertEqual(self.make(dest, "stop").returncode, 0)
        self.assertTrue(wait_gone(pid))
        left = sorted(set(os.listdir(dest)) - {"__pycache__"})
        self.assertEqual(left, sorted(list(SHIPPED) + ["dpmock.log"]))  # no dpmock.pid, no dpmock.env

    def test_explicit_port_wins_over_dpmock_env(self):
        dest = vendored_copy(self)
        url, pid = self.start(dest)
        other = Server()
        self.addCleanup(other.stop)
        r = self.make(dest, "stop", "PORT=%d" % other.port)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(other.proc.wait(10), 0)  # the one on PORT stopped...
        st = json.loads(self.make(dest, "status").stdout)
        self.assertEqual(st["pid"], pid)  # ...ours runs on, still known
        r = self.make(dest, "status", "URL=" + other.url)
        self.assertNotEqual(r.returncode, 0)
        self.assertEqual(self.make(dest, "stop", "URL=" + url).returncode, 0)
        self.assertTrue(wait_gone(pid))
        self.assertFalse(os.path.exists(os.path.join(dest, "dpmock.env")))

    def test_after_kill_9_stop_cleans_up_and_status_says_not_running(self):
        dest = vendored_copy(self)
        _, pid = self.start(dest)
        os.kill(pid, signal.SIGKILL)
        self.assertTrue(wait_gone(pid))
        pidfile = os.path.join(dest, "dpmock.pid")  # stale now: never let the cleanup kill a reused pid
        self.addCleanup(lambda: os.path.exists(pidfile) and os.unlink(pidfile))
        r = self.make(dest, "status")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("dpmockctl: not running: no live process holds the pid file", r.stderr.decode())
        self.assertIn("Error 3", r.stderr.decode())  # dpmockctl's own code, under make's 2
        r = self.make(dest, "stop")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("not running", r.stdout.decode())
        for name in ("dpmock.pid", "dpmock.env"):
            self.assertFalse(os.path.exists(os.path.join(dest, name)), name)
        nowhere = dict(make_env(), PORT=str(free_port()))  # no pid file: the URL (an unused port here)
        r = self.make(dest, "stop", env=nowhere)
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.make(dest, "status", env=nowhere)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("not running", r.stderr.decode())

    def test_clean_stops_its_server_first(self):
        dest = vendored_copy(self)
        _, pid = self.start(dest)
        r = self.make(dest, "clean")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(wait_gone(pid))
        self.assertEqual(sorted(os.listdir(dest)), sorted(SHIPPED))
        r = self.make(dest, "clean")  # nothing running, nothing to clean: fine
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_readme_automake_recipe(self):
        """The README's AM_TESTS_ENVIRONMENT, as automake's test harness runs it: before each test, in its shell."""
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        recipe = re.search(r"```make\n(.*?PYTHON3 = python3\nAM_TESTS_ENVIRONMENT = .*?)```", readme, re.S).group(1)
        dest = vendored_copy(self)
        tests = os.path.dirname(dest)
        with open(os.path.join(tests, "probe.py"), "w") as f:
            f.write("import json, os, urllib.request\n"
                    "url = os.environ.get('DP_MOCK_SERVER')\n"
                    "pid = url and json.loads(urllib.request.urlopen(url + '/_control/status').read())['pid']\n"
                    "print(url, pid)\n")
        with open(os.path.join(tests, "Makefile"), "w") as f:
            f.write("srcdir = .\n%s\ncheck:\n\t@$(AM_TESTS_ENVIRONMENT) $(PYTHON3) probe.py\n" % recipe)

        def check(env):
            r = run(["make", "-s", "check", "PYTHON3=" + PY], cwd=tests, env=make_env(env))
            self.assertEqual(r.returncode, 0, r.stderr)
            url, pid = r.stdout.decode().split()
            return url, pid
        env = {k: v for k, v in os.environ.items() if k != "DP_MOCK_SERVER"}
        url, pid = check(env)  # a server of its own, exported to the test...
        self.assertTrue(url.startswith("http://127.0.0.1:"), url)
        self.assertTrue(wait_gone(int(pid), 3))  # ...and gone with the test's shell
        self.assertEqual(check(dict(env, DP_MOCK_SERVER=SERVER.url)), (SERVER.url, str(SERVER.proc.pid)))
        dead = "http://127.0.0.1:%d" % free_port()
        self.assertEqual(check(dict(env, DP_MOCK_SERVER=dead)), ("None", "None"))  # unset: the test skips (77)

    def test_optional_files_missing_say_so_in_one_line(self):
        dest = vendored_copy(self)
        for target, missing in (("test", "test_dpmock.py"), ("check", "test_dpmock.py"), ("bench", "bench_dpmock.py")):
            r = self.make(dest, target)
            self.assertNotEqual(r.returncode, 0, target)
            err = lines_of(r.stderr)
            self.assertEqual(len(err), 1, err)
            self.assertIn("%s is missing" % missing, err[0])
            self.assertNotIn("can't open file", err[0])
