"""The scenario catalogue and the README's generated tables, checked against the code."""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
import unittest

from dpmocklib.base import Reply
from dpmocklib.base import Stream
from dpmocklib.base import Upload
from dpmocklib.base import scenarios
import dpmock

from .support import (DPMOCK, HERE, PY, ROUTE_PATHS, decode_chunks, make_env, raw_request, recv_all, run, scen,
    split_response, vendored_copy)


class CatalogueTest(unittest.TestCase):

    def test_readme_scenario_table_is_generated(self):
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        for table in ("markdown_table", "fault_table"):
            self.assertTrue(getattr(scenarios, table)() in readme, "README.md's %s is stale: paste in "
                            "python3 -c 'import scenarios; print(scenarios.%s())'" % (table, table))

    def test_readme_route_table_is_generated(self):
        with open(os.path.join(HERE, "README.md")) as f:
            self.assertIn(dpmock.ROUTER.markdown_table(), f.read(), "README.md's route table is stale: paste in "
                          "python3 -c 'import dpmock; print(dpmock.ROUTER.markdown_table())'")

    def test_a_new_route_gets_the_faults_of_its_kind(self):
        """One ROUTES row, no other list: every fault of its kind (provider, body, stream) applies to it."""
        script = textwrap.dedent("""
            import sys, dpmock
            def handle_echo(w, req):
                if req.route.streaming(req):
                    w.start_stream(200, "text/event-stream")
                    for word in ("one", "two", "three"):
                        w.send_sse_event({"word": word})
                    w.end_stream()
                else:
                    w.send_json(200, {"echo": req.json})
            router = dpmock.Router(dpmock.ROUTES + (
                dpmock.Route("POST", "/echo", "echo", handle_echo, dpmock.OPENAI, dpmock.BODY_JSON, dpmock.STREAM_FLAG),
                dpmock.Route("POST", "/_echo", "own_echo", handle_echo, dpmock.DPMOCK, dpmock.BODY_JSON)))
            sys.exit(dpmock.main(sys.argv[1:], router=router))
            """)
        proc = subprocess.Popen([PY, "-c", script, "--foreground", "-q", "--port", "0"], cwd=HERE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (proc.poll() is None and proc.terminate(), proc.wait(), proc.stdout.close()))
        url = proc.stdout.readline().decode().strip().split("=", 1)[1]
        host, port = url[7:].rsplit(":", 1)

        def post(path, body, spec):
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(raw_request(path, scen(spec), body, close=True))
                return recv_all(s)
        st, _, body, _ = split_response(post("/v1/echo", {"x": 1}, "RATE_LIMITED; retry_after=3"))
        self.assertEqual((st, json.loads(body)["error"]["code"]), (429, "rate_limit_exceeded"))  # provider kind
        self.assertEqual(split_response(post("/v1/echo", {"x": 1}, "EXPECT_REJECT; status=401"))[0], 401)  # body
        cut = post("/v1/echo", {"stream": True}, "STREAM_CUT; events=1")  # stream kind
        self.assertEqual(len(decode_chunks(cut.partition(b"\r\n\r\n")[2], strict=False)[0]), 1)
        self.assertFalse(cut.endswith(b"0\r\n\r\n"))
        st, _, body, _ = split_response(post("/v1/echo", {"x": 1}, "STREAM_CUT; events=1"))
        self.assertEqual((st, json.loads(body)), (200, {"echo": {"x": 1}}))  # not a stream: left alone
        st, _, body, _ = split_response(post("/_echo", {"x": 1}, "RATE_LIMITED"))
        self.assertEqual(st, 200)  # dpmock's own routes take no faults

    def test_a_fault_kind_without_an_implementation_is_refused_at_start(self):
        for extra, named in (
                ('SCENARIOS["BROKEN"] = Scenario("BROKEN", "x", On(ANY_PROVIDER_ROUTE, Fault("HANGG")), (), "fault")',
                 "HANGG"),
                ('SCENARIOS["BROKEN"] = Scenario("BROKEN", "x", {"chatt": Reply(200, {})})', "chatt")):
            with self.subTest(named=named), tempfile.TemporaryDirectory() as d:
                shutil.copy(DPMOCK, d)
                shutil.copytree(os.path.join(HERE, "dpmocklib"), os.path.join(d, "dpmocklib"))
                with open(os.path.join(HERE, "scenarios.py")) as f, open(os.path.join(d, "scenarios.py"), "w") as g:
                    g.write(f.read() + "\n" + extra + "\n")
                r = run([PY, os.path.join(d, "dpmock.py"), "--foreground", "--port", "0"], timeout=10, cwd=d)
                self.assertEqual(r.returncode, 1)
                lines = r.stderr.decode().strip().splitlines()
                self.assertEqual(len(lines), 1, lines)
                self.assertIn(named, lines[0])
                r = run([PY, "-c", "import dpmock; dpmock.ROUTES"], timeout=10, cwd=d)
                self.assertNotEqual(r.returncode, 0)
                self.assertIn(named, r.stderr.decode())

    def test_scenario_routes_exist(self):
        names = {r.name for r in dpmock.ROUTES}
        for s in scenarios.SCENARIOS.values():
            for route, value in s.routes.items():
                self.assertIn(route, names, s.name)
                self.assertIsInstance(value, (Reply, Stream, Upload, scenarios.ByProvider, scenarios.ProviderError,
                                              scenarios.Fault))
        for route in ROUTE_PATHS:
            self.assertIn(route, names)

    def test_vendored_makefile(self):
        dest = vendored_copy(self)  # its daemon is killed before its folder goes, even on a failure
        d = os.path.dirname(os.path.dirname(dest))
        pidfile = os.path.join(dest, "dpmock.pid")
        r = run(["make", "-s", "-C", os.path.join(d, "tests"), "-f", "mock-server/Makefile", "start",
                 "PORT=0"], env=make_env())
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(b"DP_MOCK_SERVER=http://127.0.0.1:", r.stdout)
        r = run(["make", "-s", "-C", dest, "status"], env=make_env())
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout)["status"], "running")
        r = run(["make", "-s", "-C", dest, "stop"], env=make_env())
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertFalse(os.path.exists(pidfile))
