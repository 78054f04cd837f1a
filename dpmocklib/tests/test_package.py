"""The package: its layout (sizes, an acyclic import graph, what loads lazily), the wheel and `pip install`,
the in-process API (dpmock.serve) and the pytest plugin."""

import ast
import glob
import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
import unittest
import urllib.error
import urllib.request
import zipfile

import dpmock
from dpmocklib import _build
from dpmocklib.api import DpmockError, Mock

from .support import HERE, PY, _optional, openai_chat, run

PACKAGE = os.path.join(HERE, "dpmocklib")


def module_imports(path):
    """The package modules a module imports at its top level (function-level imports are lazy ones)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.update([node.module] if node.module else [  # from . import X: X a module, or a name of __init__
                a.name for a in node.names if os.path.exists(os.path.join(PACKAGE, a.name + ".py"))])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dpmocklib."):
            out.add(node.module.split(".")[1])
    return out


def post(url, body, headers=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=dict(
        {"Content-Type": "application/json", "Authorization": "Bearer sk-test", "x-api-key": "sk-ant-test"},
        **(headers or {})))
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


class LayoutTest(unittest.TestCase):

    def modules(self):
        return sorted(glob.glob(os.path.join(PACKAGE, "*.py")))

    def test_no_module_over_1500_lines_and_no_class_over_300(self):
        for path in self.modules():
            with open(path, encoding="utf-8") as f:
                text = f.read()
            self.assertLessEqual(text.count("\n"), 1500, path)
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ClassDef):
                    self.assertLessEqual(node.end_lineno - node.lineno + 1, 300, "%s: %s" % (path, node.name))

    def test_the_import_graph_has_no_cycle(self):
        graph = {os.path.basename(p)[:-3]: module_imports(p) for p in self.modules()}
        state = {}

        def visit(mod, path):
            state[mod] = "open"
            for dep in sorted(graph.get(mod, ())):
                self.assertIn(dep, graph, "%s imports a module that is not there: %s" % (mod, dep))
                self.assertNotEqual(state.get(dep), "open", "import cycle: " + " -> ".join(path + [dep]))
                if dep not in state:
                    visit(dep, path + [dep])
            state[mod] = "done"
        for mod in graph:
            if mod not in state:
                visit(mod, [mod])

    def test_a_start_loads_none_of_the_parts_most_runs_never_use(self):
        code = ("import sys; sys.argv = ['dpmock']; import dpmocklib.cli, dpmocklib.api; "
                "print(' '.join(sorted(m for m in sys.modules if m.startswith('dpmocklib.'))))")
        r = run([PY, "-c", code], cwd=HERE)
        loaded = set(r.stdout.decode().split())
        self.assertIn("dpmocklib.server", loaded, r.stderr)
        for lazy in ("record", "sandbox", "schema", "regexgen", "pytest_plugin", "_build", "tests"):
            self.assertNotIn("dpmocklib." + lazy, loaded)

    def test_every_route_names_functions_that_exist(self):
        import importlib
        from dpmocklib.routing import Lazy
        for route in dpmock.ROUTES:
            for fn in (route.handler, route.reader):
                if isinstance(fn, Lazy):
                    module, _, name = fn.where.rpartition(".")
                    self.assertTrue(callable(getattr(importlib.import_module("dpmocklib." + module), name, None)),
                                    "%s: %s" % (route.name, fn))

    def test_the_readme_holds_the_layout_table(self):
        from dpmocklib.names import layout_table
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            self.assertTrue(layout_table() in f.read(), "README.md's module table is out of date: print a new one "
                            "with python3 -c 'import dpmocklib.names as n; print(n.layout_table())'")

    def test_dpmock_re_exports_the_package_names(self):
        self.assertIs(dpmock.serve, __import__("dpmocklib.api").api.serve)
        self.assertIs(dpmock.MockServer, __import__("dpmocklib.server").server.MockServer)
        self.assertEqual(dpmock.__version__, __import__("dpmocklib").__version__)
        with self.assertRaises(AttributeError):
            dpmock.no_such_name


class WheelTest(unittest.TestCase):

    def test_pyproject_reads_as_tomllib_reads_it(self):
        tomllib = _optional("tomllib")
        if tomllib is None:
            self.skipTest("tomllib arrives with Python 3.11")
        with open(os.path.join(HERE, "pyproject.toml"), "rb") as f:
            self.assertEqual(_build.parse_toml(f.read().decode()), tomllib.load(open(f.name, "rb")))

    def test_the_wheel_holds_the_package_and_nothing_at_the_top(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        src = os.path.join(d, "src")  # a copy after `make certs`: the CA's key and the CSR lie in certs/
        shutil.copytree(HERE, src, ignore=shutil.ignore_patterns("__pycache__", ".git", "*.pyc"))
        for junk in ("ca.key", "server.csr"):
            with open(os.path.join(src, "certs", junk), "w") as f:
                f.write("secret\n")
        r = run([PY, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from dpmocklib import _build; "
                 "print(_build.build_wheel(sys.argv[2]))", src, d])
        self.assertEqual(r.returncode, 0, r.stderr)
        name = r.stdout.decode().strip()
        self.assertEqual(name, "dpmock-%s-py3-none-any.whl" % dpmock.__version__)
        with zipfile.ZipFile(os.path.join(d, name)) as z:
            names = z.namelist()
            info = "dpmock-%s.dist-info/" % dpmock.__version__
            self.assertEqual({n.split("/")[0] for n in names}, {"dpmock.py", "dpmocklib", info[:-1]})
            self.assertEqual(sorted(n for n in names if "/certs/" in n),
                             ["dpmocklib/certs/" + n for n in ("README.md", "ca.pem", "server.ext", "server.key",
                                                               "server.pem")])
            for wanted in ("dpmocklib/scenarios.py", "dpmocklib/certs/ca.pem", "dpmocklib/certs/server.pem",
                           "dpmocklib/pytest_plugin.py", "dpmocklib/__main__.py"):
                self.assertIn(wanted, names)
            self.assertFalse([n for n in names if "/tests/" in n or n.endswith("_build.py") or ".pyc" in n])
            entry = z.read(info + "entry_points.txt").decode()
            self.assertIn("dpmock = dpmocklib.boot:run", entry)
            self.assertIn("dpmockctl = dpmocklib.ctl:main", entry)
            self.assertIn("[pytest11]\ndpmocklib.pytest_plugin = dpmocklib.pytest_plugin", entry)
            meta = z.read(info + "METADATA").decode()
            self.assertIn("Requires-Python: >=3.8", meta)
            self.assertNotIn("Requires-Dist", meta)  # no dependencies
            record = z.read(info + "RECORD").decode().splitlines()
            self.assertEqual(len(record), len(names))

    def test_pip_install_into_an_empty_venv_gives_working_commands(self):
        pip = run([PY, "-m", "pip", "--version"])
        if pip.returncode != 0:
            self.skipTest("no pip for %s" % PY)
        version = tuple(int(x) for x in pip.stdout.split()[1].decode().split(".")[:2])
        if version < (22, 3):
            self.skipTest("pip %s has no --python" % ".".join(map(str, version)))
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        venv, src = os.path.join(d, "venv"), os.path.join(d, "src")
        # A copy of the tracked files: what a fresh clone holds, without this checkout's caches.
        shutil.copytree(HERE, src, ignore=shutil.ignore_patterns("__pycache__", ".git", "*.pyc", "build", "dist"))
        self.assertEqual(run([PY, "-m", "venv", "--without-pip", venv]).returncode, 0)
        vpy = os.path.join(venv, "bin", "python")
        r = run([PY, "-m", "pip", "--python", vpy, "install", "-q", "--no-index", "--disable-pip-version-check",
                 src], timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        pidfile = os.path.join(d, "dpmock.pid")
        self.addCleanup(run, [os.path.join(venv, "bin", "dpmockctl"), "stop", "--pidfile", pidfile])
        r = run([os.path.join(venv, "bin", "dpmock"), "--port", "0", "--pidfile", pidfile], cwd=d)
        self.assertEqual(r.returncode, 0, r.stderr)
        url = r.stdout.decode().strip().split("=", 1)[1]
        r = run([os.path.join(venv, "bin", "dpmockctl"), "status", "--url", url, "--json"], cwd=d)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout)["version"], dpmock.__version__)
        # The installed copy answers from its own scenarios.py; nothing generic lands in site-packages.
        r = run([vpy, "-c", "import dpmocklib.base as b, os; print(b.scenarios.__file__); import scenarios"], cwd=d)
        self.assertIn(os.path.join("dpmocklib", "scenarios.py"), r.stdout.decode())
        self.assertIn("No module named 'scenarios'", r.stderr.decode())
        r = run([vpy, "-c", "import dpmock, dpmocklib; assert dpmock.serve is dpmocklib.serve\n"
                 "with dpmock.serve() as m: print(m.status()['status'])"], cwd=d)
        self.assertEqual((r.returncode, r.stdout), (0, b"running\n"), r.stderr)
        r = run([os.path.join(venv, "bin", "dpmockctl"), "stop", "--pidfile", pidfile])
        self.assertEqual(r.returncode, 0, r.stderr)


class ServeTest(unittest.TestCase):

    def test_serve_answers_rules_per_provider_and_records_the_journal(self):
        rule = {"match": {"text": "capital of France"}, "respond": {"text": "Paris"}}
        with dpmock.serve(rules=[rule], port=0) as mock:
            self.assertTrue(mock.url.startswith("http://127.0.0.1:"))
            oa = post(mock.base_url("openai") + "/chat/completions", openai_chat("the capital of France?"))
            self.assertEqual(oa["choices"][0]["message"]["content"], "Paris")
            an = post(mock.base_url("anthropic") + "/v1/messages", {
                "model": "claude-sonnet-4-5", "max_tokens": 50,
                "messages": [{"role": "user", "content": "the capital of France?"}]})
            self.assertEqual(an["content"][0]["text"], "Paris")
            ge = post(mock.base_url("gemini") + "/v1beta/models/gemini-2.5-flash:generateContent?key=k",
                      {"contents": [{"parts": [{"text": "the capital of France?"}]}]})
            self.assertEqual(ge["candidates"][0]["content"]["parts"][0]["text"], "Paris")
            self.assertEqual(mock.base_url("gemini", versioned=True), mock.url + "/v1beta")
            seen = mock.requests()
            self.assertEqual([e["route"] for e in seen], ["chat", "messages", "gemini_generate"])
            self.assertTrue(all(e["rule"] for e in seen))
            self.assertEqual(len(mock.requests(route="chat")), 1)
            mock.reset()
            self.assertEqual(mock.requests(), [])
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", int(mock.url.rsplit(":", 1)[1])), timeout=2).close()

    def test_tests_have_their_own_rules_and_journal(self):
        with dpmock.serve() as mock:
            a, b = mock.for_test("alpha"), mock.for_test("beta")
            a.add_rules({"match": {"text": "hello"}, "respond": {"text": "from alpha"}})
            self.assertEqual(post(a.base_url("openai") + "/chat/completions", openai_chat("hello"))
                             ["choices"][0]["message"]["content"], "from alpha")
            other = post(b.base_url("openai") + "/chat/completions", openai_chat("hello"))
            self.assertNotEqual(other["choices"][0]["message"]["content"], "from alpha")
            self.assertEqual(len(a.requests()), 1)
            self.assertEqual(len(b.requests()), 1)
            self.assertEqual(len(mock.requests()), 2)
            self.assertEqual(a.headers, {"X-DP-Test-Id": "alpha"})
            self.assertEqual([r["test"] for r in a.rules()], ["alpha"])
            self.assertEqual(a.clear_rules(), 1)

    def test_bad_input_is_a_clear_error(self):
        with dpmock.serve() as mock:
            with self.assertRaises(DpmockError) as cm:
                mock.add_rules({"match": {"text": "x"}, "respond": {"txet": "y"}})
            self.assertIn("txet", str(cm.exception))
            with self.assertRaises(ValueError):
                mock.base_url("cohere")
        for args, words in ((["--pidfile", "x"], "--pidfile"), (["--seed", "many"], "--seed"),
                            (["--rules", "/no/such/rules.json"], "no/such")):
            with self.assertRaises(DpmockError) as cm:
                dpmock.serve(args=args)
            self.assertIn(words, str(cm.exception))
        with self.assertRaises(DpmockError):
            dpmock.serve(rules=[{"match": {}, "respond": {"bogus": 1}}])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            with self.assertRaises(DpmockError) as cm:
                dpmock.serve(port=s.getsockname()[1])
            self.assertIn("cannot start", str(cm.exception))

    def test_a_restart_over_http_restarts_the_thread_not_the_process(self):
        with dpmock.serve() as mock:
            mock.add_rules({"match": {"text": "hi"}, "respond": {"text": "rule"}})
            conn = http.client.HTTPConnection(mock.url[7:], timeout=10)
            conn.request("POST", "/_control/restart", b"")
            self.assertEqual(conn.getresponse().status, 200)
            conn.close()
            for _ in range(200):
                try:
                    status = mock.status()
                    if status["restarts"] == 1:
                        break
                except DpmockError:
                    pass
                time.sleep(0.02)
            self.assertEqual(status["restarts"], 1)
            self.assertEqual(status["pid"], os.getpid())
            self.assertEqual(mock.rules(), [])  # a restart starts fresh, as the command line's does
            body = post(mock.base_url("openai") + "/chat/completions", openai_chat("hi"))
            self.assertIn("choices", body)

    def test_a_server_stopped_over_http_refuses_at_once_and_says_why(self):
        mock = dpmock.serve()
        self.addCleanup(mock.close)
        conn = http.client.HTTPConnection(mock.url[7:], timeout=10)
        conn.request("POST", "/_control/shutdown", b"")
        self.assertEqual(conn.getresponse().status, 200)
        conn.close()
        mock._runner.thread.join(10)
        t0 = time.monotonic()
        with self.assertRaises(DpmockError) as cm:
            mock.requests()
        self.assertLess(time.monotonic() - t0, 1)
        self.assertIn("stopped", str(cm.exception))
        with self.assertRaises(OSError):  # connections are refused, not left hanging
            socket.create_connection(("127.0.0.1", int(mock.url.rsplit(":", 1)[1])), timeout=2).close()

    def test_serve_rules_outlive_a_restart_and_a_view_cannot_stop_the_server(self):
        with dpmock.serve(rules=[{"match": {"text": "hi"}, "respond": {"text": "from serve"}}]) as mock:
            view = mock.for_test("t1")
            view.close()
            with view:
                pass
            self.assertEqual(mock.status()["status"], "running")
            conn = http.client.HTTPConnection(mock.url[7:], timeout=10)
            conn.request("POST", "/_control/restart", b"")
            conn.getresponse().read()
            conn.close()
            for _ in range(200):
                try:
                    if mock.status()["restarts"] == 1:
                        break
                except DpmockError:
                    pass
                time.sleep(0.02)
            body = post(view.base_url("openai") + "/chat/completions", openai_chat("hi"))
            self.assertEqual(body["choices"][0]["message"]["content"], "from serve")

    def test_serve_and_close_leave_no_descriptor_or_thread(self):
        def fds():
            return len(os.listdir("/proc/self/fd"))
        with dpmock.serve(verbose=True, args=["--logfile", os.devnull]):
            pass  # the first one loads the modules
        before, threads = fds(), threading.active_count()
        for _ in range(3):
            with dpmock.serve(args=["-v", "--logfile", os.devnull]) as mock:
                post(mock.base_url("openai") + "/chat/completions", openai_chat("hi"))
        time.sleep(0.2)
        self.assertEqual(fds(), before)
        self.assertEqual(threading.active_count(), threads)
        with self.assertRaises(DpmockError):
            dpmock.serve(args=["-h"])

    def test_a_handler_whose_module_will_not_load_is_a_500_naming_it(self):
        from dpmocklib.routing import Route, Router
        router = Router(tuple(dpmock.ROUTES) + (Route("POST", "/_broken", "broken", "no_such_module.handle",
                                                      dpmock.DPMOCK, dpmock.BODY_JSON),))
        with dpmock.serve(router=router) as mock:
            req = urllib.request.Request(mock.url + "/_broken", data=b"{}",
                                         headers={"Content-Type": "application/json"})
            with self.assertRaises(urllib.error.HTTPError) as cm:
                urllib.request.urlopen(req, timeout=10)
            self.assertEqual(cm.exception.code, 500)
            self.assertIn("dpmocklib.no_such_module.handle", cm.exception.read().decode())
            self.assertEqual(mock.status()["status"], "running")

    def test_attach_drives_a_server_elsewhere(self):
        with dpmock.serve() as started:
            mock = Mock.attach(started.url)
            mock.add_rules({"match": {"text": "x"}, "respond": {"text": "y"}})
            self.assertEqual(len(started.rules()), 1)
            mock.close()  # not its server: a no-op
            self.assertEqual(started.status()["status"], "running")
        with self.assertRaises(DpmockError):
            Mock.attach(started.url)


PLUGIN_TESTS = '''
import json, urllib.request
import pytest

def chat(mock, text):
    req = urllib.request.Request(mock.base_url("openai") + "/chat/completions", headers={
        "Authorization": "Bearer sk-test", "Content-Type": "application/json"}, data=json.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}).encode())
    with urllib.request.urlopen(req) as r:
        return json.load(r)["choices"][0]["message"]["content"]

@pytest.mark.parametrize("n", range(12))
def test_each_test_has_its_own_rules_and_journal(dpmock, n):
    dpmock.add_rules({"match": {"text": "hello"}, "respond": {"text": "hi %d" % n}})
    assert chat(dpmock, "hello") == "hi %d" % n
    assert chat(dpmock, "hello again") == "hi %d" % n
    assert [e["test"] for e in dpmock.requests()] == [dpmock.test] * 2

pytestmark = pytest.mark.dpmock_rules({"match": {"text": "marker"}, "respond": {"text": "module default"}})

@pytest.mark.dpmock_rules({"match": {"text": "weather"}, "respond": {"text": "sunny"}})
def test_marker_rules(dpmock):
    assert chat(dpmock, "the weather?") == "sunny"
    assert chat(dpmock, "which marker?") == "module default"

@pytest.mark.dpmock_rules({"match": {"text": "which marker"}, "respond": {"text": "the test's own"}})
def test_the_closest_marker_wins(dpmock):
    assert chat(dpmock, "which marker?") == "the test's own"

def test_session_server_is_shared(dpmock, dpmock_server):
    assert dpmock.url == dpmock_server.url and dpmock.test != dpmock_server.test

def test_a_failure_shows_the_journal(dpmock):
    chat(dpmock, "what went wrong")
    assert False, "on purpose"
'''


class PytestPluginTest(unittest.TestCase):

    def pytest(self, *args, source=PLUGIN_TESTS):
        if _optional("pytest") is None:
            self.skipTest("pytest is not installed (optional; the CI venv has it)")
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        with open(os.path.join(d, "test_app.py"), "w") as f:
            f.write(textwrap.dedent(source))
        env = dict(os.environ, PYTHONPATH=HERE, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
        r = subprocess.run([PY, "-m", "pytest", "-p", "dpmocklib.pytest_plugin", "-p", "no:cacheprovider", "-q",
                            "-rf"] + list(args), cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=60)
        return r.returncode, r.stdout.decode()

    def check(self, code, out):
        self.assertEqual(code, 1, out)
        self.assertIn("1 failed, 15 passed", out)
        self.assertIn("dpmock journal (test test_app.py-test_a_failure_shows_the_journal-", out)
        self.assertIn("POST /v1/chat/completions -> 200 (route chat, miss: rule", out)  # and why no rule answered
        self.assertIn('"content":"what went wrong"', out)

    def test_the_plugin_with_a_vendored_copy(self):
        self.check(*self.pytest())

    def readme_example(self, heading):
        """The first Python block after ``heading`` in the README, run with the plugin: (its lines, pytest's output)."""
        if _optional("openai") is None:
            self.skipTest("the openai package is not installed (optional; the CI venv has it)")
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        example = readme[readme.index(heading):].split("```python\n", 1)[1].split("```", 1)[0]
        code, out = self.pytest(source=example)
        self.assertEqual(code, 0, out)
        return len(example.strip().splitlines()), out

    def test_the_readme_example_passes(self):
        lines, out = self.readme_example("## From pytest")
        self.assertLessEqual(lines, 20)
        self.assertIn("2 passed", out)

    def test_the_readme_agent_example_passes(self):
        self.assertIn("1 passed", self.readme_example("### For agent developers")[1])

    def test_the_plugin_under_xdist(self):
        if _optional("xdist") is None:
            self.skipTest("pytest-xdist is not installed (optional; the CI venv has it)")
        code, out = self.pytest("-n", "4", "-p", "xdist")
        self.check(code, out)
