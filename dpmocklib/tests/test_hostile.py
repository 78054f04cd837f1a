"""Rules, rules files, namespaces, recordings and query numbers under hostile and faulty use: each bad
input is a clear 4xx (or one log line), the server keeps answering, no change is half made, and the
server's stderr holds no traceback after each group."""

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest
from urllib.parse import quote

from .support import (AN, GE, GEMINI_GEN, OA, PY, DPMOCK, HERE, Server, gemini_contents,
    openai_chat, openai_headers)


def deep(levels, leaf=1):
    value = leaf
    for _ in range(levels):
        value = {"a": value}
    return value


class HostileCase(unittest.TestCase):
    """A server per test; after the test, its stderr must hold no traceback."""

    ARGS = ()

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.srv = self.start(*self.ARGS)

    def start(self, *args):
        srv = Server(*args)
        self.addCleanup(self.no_traceback, srv)
        self.addCleanup(srv.stop)
        return srv

    def no_traceback(self, srv):
        self.assertNotIn(b"Traceback", srv.errors(), srv.errors()[-2000:])
        self.assertNotIn(b"internal error", srv.errors())

    def rules(self, specs, query="", headers=None):
        st, _, body = self.srv.request("POST", "/_control/rules" + query, json.dumps(specs).encode(), headers)
        return st, json.loads(body)

    def chat(self, text, headers=OA, timeout=10, **extra):
        body = dict(openai_chat(text), **extra)
        st, _, data = self.srv.request("POST", "/v1/chat/completions", json.dumps(body).encode(), headers,
                                       timeout=timeout)
        return st, json.loads(data)

    def rule_count(self):
        return json.loads(self.srv.request("GET", "/_control/rules")[2])["count"]


class RegexTest(HostileCase):
    """A text_regex that backtracks catastrophically cannot stall the server."""

    def test_a_catastrophic_regex_never_stalls_other_requests_or_the_stop(self):
        st, _ = self.rules([{"id": "evil", "match": {"text_regex": "(a+)+$"}, "respond": {"text": "evil"}},
                            {"id": "city", "match": {"text_regex": r"weather in (?P<city>\w+)"},
                             "respond": {"text": "sunny in {{city}}"}}])
        self.assertEqual(st, 200)
        done = []

        def evil():
            done.append(self.chat("a" * 60 + "!"))
        threads = [threading.Thread(target=evil) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        for _ in range(5):  # while six searches that would take centuries run, the rest is answered at once
            t0 = time.monotonic()
            st, body = self.chat("what is the weather in Paris")
            self.assertEqual((st, body["choices"][0]["message"]["content"]), (200, "sunny in Paris"))
            self.assertEqual(self.srv.request("GET", "/_control/status")[0], 200)
            self.assertLess(time.monotonic() - t0, 1.0)
        for t in threads:
            t.join(10)
        self.assertEqual([st for st, _ in done], [200] * 6)  # no match: dpmock's own answer
        self.assertTrue(all("dpmock reply to" in b["choices"][0]["message"]["content"] for _, b in done))
        warned = [e for e in json.loads(self.srv.request("GET", "/_control/requests")[2])["requests"]
                  if e.get("warning")]
        self.assertEqual(len(warned), 6)
        self.assertIn("'evil'", warned[0]["warning"])
        self.assertIn("ran out of time", self.srv.errors().decode())
        self.chat("a" * 60 + "!", timeout=10)  # one more in flight while the server is told to stop
        t0 = time.monotonic()
        self.assertEqual(self.srv.stop(), 0)
        self.assertLess(time.monotonic() - t0, 3.0)

    def test_patterns_that_look_cheap_but_are_not_never_stall(self):
        wide = "".join(chr(0x10000 + 2 * i) for i in range(975))  # a class re checks item by item
        evil = ["(?:){100000000}x", "(?:\\b){100000000}x", "(?:(?=a)){100000000}x", "(?:a|aa)" * 30 + "b",
                "\\w*\\w*\\w*\\w*\\d", "(.*a){25}", ".{0,15}[%s]{100}x" % wide, "(?:" + "()" * 192 + "){0,12}!"]
        self.rules([{"id": "evil%d" % i, "match": {"text_regex": p}, "respond": {"text": "hit"}}
                    for i, p in enumerate(evil)])
        def fmt(pattern):
            return {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "required": ["v"], "properties": {"v": {"type": "string", "pattern": pattern}}}}}
        done = []
        threads = [threading.Thread(target=lambda: done.append(self.chat("a" * 60, timeout=20))),
                   threading.Thread(target=lambda: done.append(self.chat(wide[-1] * 256, timeout=20))),
                   threading.Thread(target=lambda: done.append(self.chat("a" * 256, timeout=20)))]
        threads.append(threading.Thread(target=lambda: done.append(self.chat(
            "a" * 60, timeout=20, response_format=fmt(evil[0])))))
        for t in threads:
            t.start()
        time.sleep(0.05)
        for _ in range(5):
            t0 = time.monotonic()
            self.assertEqual(self.srv.request("GET", "/_control/status")[0], 200)
            self.assertLess(time.monotonic() - t0, 1.0)
            time.sleep(0.05)
        for t in threads:
            t.join(20)
        self.assertEqual(sorted(st for st, _ in done), [200] * len(threads))

    def test_a_rule_ruled_out_by_another_condition_costs_no_search(self):
        self.rules({"id": "evil", "match": {"text_regex": "(a+)+$", "model": "never-this-model"},
                    "respond": {"text": "hit"}})
        t0 = time.monotonic()
        self.chat("a" * 49 + "!")
        self.assertLess(time.monotonic() - t0, 0.2)
        entry = json.loads(self.srv.request("GET", "/_control/requests")[2])["requests"][-1]
        self.assertIsNone(entry["warning"])

    def helpers(self):
        """The pids of the server's regex helpers."""
        out = []
        for pid in os.listdir("/proc"):
            try:
                with open("/proc/%s/stat" % pid) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    helper = b"dpmock regex helper" in f.read()
            except (OSError, ValueError, IndexError):
                continue
            if helper and ppid == self.srv.proc.pid:
                out.append(int(pid))
        return out

    @unittest.skipUnless(os.path.isdir("/proc"), "needs /proc to find the helpers")
    def test_helpers_killed_or_hung_up_from_outside_are_replaced(self):
        self.rules({"match": {"text_regex": r"order (\d+)$"}, "respond": {"text": "order {{1}}"}})
        long_text = "x " * 200 + "order 7"  # over 256 characters: searched in a helper
        self.assertEqual(self.chat(long_text)[1]["choices"][0]["message"]["content"], "order 7")
        pids = self.helpers()
        self.assertTrue(pids)
        for pid in pids:
            os.kill(pid, signal.SIGHUP)  # pkill -HUP -f dpmock reaches them too: ignored
        time.sleep(0.2)
        self.assertEqual(sorted(self.helpers()), sorted(pids))
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        for _ in range(3):  # a dead helper is replaced, not a miss
            st, body = self.chat(long_text)
            self.assertEqual(body["choices"][0]["message"]["content"], "order 7")

    @unittest.skipUnless(os.path.isdir("/proc"), "needs /proc to find the helpers")
    def test_a_helper_ends_when_the_server_is_killed_mid_search(self):
        self.rules({"match": {"text_regex": "(a+)+$"}, "respond": {"text": "x"}})
        t = threading.Thread(target=lambda: self.assertRaises(Exception, self.chat, "a" * 80 + "!"))
        t.start()
        for _ in range(50):
            pids = self.helpers()
            if pids:
                break
            time.sleep(0.02)
        self.assertTrue(pids)
        self.srv.proc.kill()
        t.join(10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(os.path.exists("/proc/%d" % p) and not _zombie(p) for p in pids):
            time.sleep(0.05)
        self.assertFalse([p for p in pids if os.path.exists("/proc/%d" % p) and not _zombie(p)])

    def test_groups_fill_templates_on_short_and_long_prompts(self):
        self.rules([{"match": {"text_regex": r"order (?P<num>\d+) for (\w+)"},
                     "respond": {"text": "order {{num}} ({{2}})"}}])
        for pad in ("", "x " * 5000):  # a short text is searched here, a long one in the helper: same answer
            st, body = self.chat(pad + "order 42 for Ann")
            self.assertEqual(body["choices"][0]["message"]["content"], "order 42 (Ann)")
        st, body = self.chat("a" * 100000 + "x")  # a tame pattern on a long text: in the helper, bounded
        self.assertEqual(st, 200)

    def test_a_client_schema_pattern_cannot_stall_the_server(self):
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
            "type": "object", "additionalProperties": False, "required": ["v"],
            "properties": {"v": {"type": "string", "pattern": "^(a|a)*$"}}}}}
        t0 = time.monotonic()
        st, body = self.chat("a" * 60 + "!", response_format=fmt)
        self.assertEqual(st, 200, body)
        self.assertLess(time.monotonic() - t0, 2.0)
        self.assertIsInstance(json.loads(body["choices"][0]["message"]["content"])["v"], str)

    def test_a_model_glob_never_backtracks(self):
        self.rules([{"match": {"model": "*a*a*a*a*a*a*a*a*b"}, "respond": {"text": "glob"}},
                    {"match": {"model": "gpt-[45]*-m?ni"}, "respond": {"text": "mini"}}])
        t0 = time.monotonic()
        st, body = self.chat("hi", model="a" * 5000)
        self.assertLess(time.monotonic() - t0, 1.0)
        self.assertNotEqual(body["choices"][0]["message"]["content"], "glob")
        self.assertEqual(self.chat("hi", model="gpt-4o-mini")[1]["choices"][0]["message"]["content"], "mini")
        self.assertEqual(self.chat("hi", model="a" * 40 + "b")[1]["choices"][0]["message"]["content"], "glob")


class DepthAndAtomicTest(HostileCase):
    """Nesting is bounded when a rule loads; a list of rules is added whole or not at all."""

    def test_deeply_nested_rules_are_refused_naming_the_field(self):
        for spec, field in (({"match": {"text": "d"}, "respond": {"json": deep(40)}}, "respond.json"),
                            ({"match": {"text": "d"}, "respond": {"tool_calls": [
                                {"name": "f", "arguments": deep(40)}]}}, "respond.tool_calls"),
                            ({"match": {"body": {"/x": deep(40)}}, "respond": {"text": "d"}}, "match.body")):
            st, body = self.rules(spec)
            self.assertEqual(st, 400, body)
            self.assertIn(field, body["error"]["message"])
            self.assertIn("nested more than", body["error"]["message"])
        st, body = self.srv.request("POST", "/_control/rules", b"[" * 100000 + b"]" * 100000)[:3:2]
        self.assertEqual(st, 400)
        self.assertEqual(self.rule_count(), 0)
        st, _ = self.rules({"match": {"text": "nested"}, "respond": {"json": deep(30, "{{model}}")}})
        self.assertEqual(st, 200)
        st, body = self.chat("nested please")
        self.assertEqual(st, 200)
        value = json.loads(body["choices"][0]["message"]["content"])
        for _ in range(30):
            value = value["a"]
        self.assertEqual(value, "gpt-4o")

    def test_a_deep_tool_result_in_a_template_is_a_400_not_a_500(self):
        self.rules({"match": {"tool_result": "f"}, "respond": {"json": {"got": "{{tool_result.a}}"}}})
        msgs = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(deep(900))}]
        body = {"model": "gpt-4o", "messages": msgs,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
        st, _, data = self.srv.request("POST", "/v1/chat/completions", json.dumps(body).encode(), OA)
        self.assertEqual(st, 400, data[:300])
        self.assertIn("too deep", json.loads(data)["error"]["message"])
        msgs[2]["content"] = json.dumps(deep(5))
        st, _, data = self.srv.request("POST", "/v1/chat/completions", json.dumps(body).encode(), OA)
        self.assertEqual(st, 200, data[:300])

    def test_a_bad_rule_in_a_list_adds_none_and_breaks_nothing(self):
        good = {"id": "good", "match": {"text": "hello"}, "respond": {"text": "hi"}}
        for bad in ({"match": {"text": "x"}, "respond": {"text": "y"}, "priority": None},
                    {"match": {"text": "x"}, "respond": {"text": "y"}, "priority": "1"},
                    {"match": {"text": "x"}, "respond": {"text": "y"}, "priority": 10 ** 30},
                    {"match": {"text": "x"}, "respond": {"text": "y"}, "times": 0},
                    {"match": [], "respond": {"text": "y"}},
                    {"match": None, "respond": {"text": "y"}},
                    {"match": "text", "respond": {"text": "y"}},
                    {"match": {"header": {"x-a": 1}}, "respond": {"text": "y"}},
                    {"match": {"body": {"/a~2": 1}}, "respond": {"text": "y"}},
                    {"match": {"text_regex": "(unclosed"}, "respond": {"text": "y"}},
                    {"match": {"text_regex": "a" * 5000}, "respond": {"text": "y"}},
                    {"match": {"text": "x"}, "respond": {"text": "{{²}}"}},
                    dict(good)):  # the same id twice in one list
            st, body = self.rules([good, bad])
            self.assertEqual(st, 400, (bad, body))
            self.assertIn("rule", body["error"]["message"])
            self.assertEqual(self.rule_count(), 0, bad)
        self.assertEqual(self.rules([good])[0], 200)
        self.assertEqual(self.chat("hello")[1]["choices"][0]["message"]["content"], "hi")
        self.assertEqual(self.rules({"match": {"text": "bye"}, "respond": {"text": "ciao"}, "times": None})[0], 200)
        self.assertEqual(self.chat("bye")[1]["choices"][0]["message"]["content"], "ciao")


class MatchingTest(HostileCase):
    """JSON pointers follow RFC 6901 and JSON values compare by JSON type."""

    def test_pointers_and_types(self):
        self.rules([{"id": "idx", "match": {"body": {"/messages/0/role": "user", "/metadata/n": 1}},
                     "respond": {"text": "one"}},
                    {"id": "true", "match": {"body": {"/metadata/n": True}}, "respond": {"text": "true"}},
                    {"id": "zero", "match": {"body": {"/metadata/n": 0}}, "respond": {"text": "zero"}},
                    {"id": "lead", "match": {"body": {"/messages/00/role": "user"}}, "respond": {"text": "lead"}},
                    {"id": "slash", "match": {"body": {"/metadata/a~1b~0c": "x"}}, "respond": {"text": "slash"}},
                    {"id": "list", "match": {"body": {"/metadata/l": [1, "1", True]}}, "respond": {"text": "list"}}])

        def answer(**metadata):
            return self.chat("hi", metadata=metadata)[1]["choices"][0]["message"]["content"]
        self.assertEqual(answer(n=1), "one")
        self.assertEqual(answer(n=1.0), "one")  # one JSON number
        self.assertEqual(answer(n=True), "true")  # not "one": true is not 1
        self.assertEqual(answer(n=False), "dpmock reply to: hi")  # false is not 0
        self.assertEqual(answer(n=0), "zero")
        self.assertEqual(answer(n="1"), "dpmock reply to: hi")
        self.assertEqual(answer(**{"a/b~c": "x"}), "slash")
        self.assertEqual(answer(l=[1, "1", True]), "list")
        self.assertEqual(answer(l=[True, "1", 1]), "dpmock reply to: hi")
        self.assertEqual(answer(l=[1, 1, 1]), "dpmock reply to: hi")
        st, _, data = self.srv.request("POST", "/_control/rules", json.dumps(
            {"match": {"body": {"/messages/²/role": "user"}}, "respond": {"text": "sup"}}).encode())
        self.assertEqual(st, 200)  # a valid pointer (a member name), which no array index is
        self.assertEqual(answer(n=5), "dpmock reply to: hi")


class WatcherTest(HostileCase):
    """The rules-file watcher sees every change, never blocks, and says each problem once."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.write("a.json", [{"match": {"text": "hi"}, "respond": {"text": "AAAA"}}])
        self.write("b.json", [{"match": {"text": "bye"}, "respond": {"text": "b1"}}])
        self.parent = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
        self.addCleanup(self.reap_parent)
        self.srv = self.start("--rules", self.dir, "--parent-pid", str(self.parent.pid))

    def reap_parent(self):
        self.parent.kill()
        self.parent.wait()

    def write(self, name, doc, mtime=None):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(doc if isinstance(doc, str) else json.dumps(doc))
        if mtime is not None:
            os.utime(path, ns=(mtime, mtime))
        return path

    def reload(self, until, timeout=5):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(self.srv.proc.pid, signal.SIGHUP)
            time.sleep(0.1)
            if until():
                return True
        return False

    def answer(self, text):
        return self.chat(text)[1]["choices"][0]["message"]["content"]

    def test_a_change_that_keeps_size_and_mtime_is_seen(self):
        path = os.path.join(self.dir, "a.json")
        mtime = os.stat(path).st_mtime_ns
        self.assertEqual(self.answer("hi"), "AAAA")
        self.write("a.json", [{"match": {"text": "hi"}, "respond": {"text": "BBBB"}}], mtime=mtime)
        self.assertEqual(os.stat(path).st_mtime_ns, mtime)
        self.assertTrue(self.reload(lambda: self.answer("hi") == "BBBB"))

    def test_special_files_loops_and_bad_text_are_one_line_each_and_block_nothing(self):
        os.mkfifo(os.path.join(self.dir, "fifo.json"))
        os.symlink("loop.json", os.path.join(self.dir, "loop.json"))
        with open(os.path.join(self.dir, "latin.json"), "wb") as f:
            f.write(b'[{"match": {"text": "caf\xe9"}, "respond": {"text": "x"}}]')
        self.write("b.json", [{"match": {"text": "bye"}, "respond": {"text": "b2"}}])
        self.assertTrue(self.reload(lambda: self.answer("bye") == "b2"))  # the other files go on reloading
        for _ in range(3):
            os.kill(self.srv.proc.pid, signal.SIGHUP)
            time.sleep(0.1)
        broken = {os.path.basename(b["file"]): b["problem"]
                  for b in json.loads(self.srv.request("GET", "/_control/rules")[2])["broken"]}
        self.assertEqual(sorted(broken), ["fifo.json", "latin.json", "loop.json"])
        self.assertIn("not a regular file", broken["fifo.json"])
        self.assertIn("not UTF-8", broken["latin.json"])
        log = self.srv.errors().decode()
        for name in broken:
            lines = [l for l in log.splitlines() if name in l]
            self.assertEqual(len(lines), 1, lines)
        os.remove(os.path.join(self.dir, "a.json"))
        self.assertTrue(self.reload(lambda: self.answer("hi") == "dpmock reply to: hi"))
        self.assertEqual(len([l for l in self.srv.errors().decode().splitlines()
                              if "a.json" in l and "gone" in l]), 1)
        self.parent.kill()  # the lifetime watch is not held up by the rules watch
        self.parent.wait()
        self.assertIsNotNone(wait_exit(self.srv.proc, 3))

    def test_a_named_file_removed_and_put_back_unchanged_is_mended(self):
        path = self.write("solo.json", [{"match": {"text": "solo"}, "respond": {"text": "s1"}}])
        with open(path, "rb") as f:
            text = f.read()
        srv = self.start("--rules", path)
        os.remove(path)

        def broken():
            return json.loads(srv.request("GET", "/_control/rules")[2])["broken"]
        os.kill(srv.proc.pid, signal.SIGHUP)
        self.assertTrue(wait_for(lambda: broken()))
        self.assertEqual(json.loads(srv.request("GET", "/_control/rules")[2])["count"], 1)  # it keeps its rules
        with open(path, "wb") as f:
            f.write(text)
        os.kill(srv.proc.pid, signal.SIGHUP)
        self.assertTrue(wait_for(lambda: not broken()))
        self.assertTrue(wait_for(lambda: b"mended" in srv.errors()))

    def test_a_fifo_at_start_is_one_line_and_no_hang(self):
        os.mkfifo(os.path.join(self.dir, "pipe.json"))
        r = subprocess.run([PY, DPMOCK, "--foreground", "--port", "0", "--rules", self.dir], cwd=HERE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=10)
        self.assertEqual(r.returncode, 1)
        self.assertEqual(len(r.stderr.decode().strip().splitlines()), 1, r.stderr)
        self.assertIn("pipe.json", r.stderr.decode())


def wait_for(cond, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _zombie(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_exit(proc, timeout):
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


class EmptyTestIdTest(HostileCase):
    """An empty test id (an unset variable) never acts on every test."""

    def test_empty_parameters_and_headers_are_refused(self):
        self.chat("mine", headers=dict(OA, **{"X-DP-Test-Id": "neighbour"}))
        self.rules({"match": {"text": "x"}, "respond": {"text": "y"}}, "?test=neighbour")
        for method, path in (("POST", "/_control/reset"), ("DELETE", "/_control/requests"),
                             ("DELETE", "/_control/rules"), ("GET", "/_control/rules"),
                             ("POST", "/_control/rules"), ("GET", "/_control/schedules")):
            body = json.dumps({"match": {"text": "x"}, "respond": {"text": "y"}}).encode() if method == "POST" else None
            for query, headers in (("?test=", {}), ("", {"X-DP-Test-Id": ""}), ("", {"X-DP-Test-Id": "  "})):
                st, _, data = self.srv.request(method, path + query, body, headers)
                self.assertEqual(st, 400, (method, path, query, headers, data))
                self.assertEqual(json.loads(data)["error"]["param"], "test")
        journal = json.loads(self.srv.request("GET", "/_control/requests?test=neighbour")[2])
        self.assertEqual(journal["count"], 1)
        rules = json.loads(self.srv.request("GET", "/_control/rules?test=neighbour")[2])
        self.assertEqual(rules["count"], 1)
        st, _, data = self.srv.request("POST", "/_t/neighbour/_control/reset", None, {"X-DP-Test-Id": ""})
        self.assertEqual(st, 200, data)  # the path names the test


class NumbersTest(HostileCase):
    """A number in a query of thousands of digits, or out of range, is a 400 naming the parameter."""

    def test_every_numeric_parameter_is_bounded(self):
        huge = "9" * 5000
        for path, headers, param in (
                ("/_control/requests?since=" + huge, {}, "since"),
                ("/_control/requests?limit=" + huge, {}, "limit"),
                ("/_control/requests?wait_for=" + huge, {}, "wait_for"),
                ("/_control/requests?timeout=" + huge, {}, "timeout"),
                ("/_control/requests?timeout=nan", {}, "timeout"),
                ("/_control/requests?limit=0", {}, "limit"),
                ("/_control/requests?limit=%C2%B2", {}, "limit"),
                ("/v1/models?limit=" + huge, AN, None),
                ("/v1beta/models?pageSize=" + huge, GE, None),
                ("/v1beta/models?pageToken=" + huge, GE, None),
                ("/v1beta/files?pageToken=" + huge, GE, None),
                ("/v1/responses/resp_x/input_items?limit=" + huge, OA, None)):
            st, _, data = self.srv.request("GET", path, None, headers)
            self.assertIn(st, (400, 404), (path[:60], data[:200]))
            if st == 400:
                err = json.loads(data)["error"]
                self.assertLess(len(err["message"]), 300)
                if param:
                    self.assertEqual(err["param"], param)
        for path, headers in (("/_control/requests?limit=" + "0" * 5000 + "1", {}),
                              ("/v1beta/models?pageToken=" + "0" * 5000 + "1", GE),
                              ("/v1beta/files?pageToken=" + "0" * 5000 + "1", GE)):
            self.assertEqual(self.srv.request("GET", path, None, headers)[0], 200, path[:40])  # leading zeros: 1
        st, _, data = self.srv.request("POST", "/v1/chat/completions", json.dumps(openai_chat("x")).encode(),
                                       dict(OA, **{"X-DP-Scenario": "STREAM_SLOW; tps=" + huge}))
        self.assertEqual(st, 400)
        self.assertLess(len(data), 400)
        st, _, data = self.srv.request("POST", GEMINI_GEN, json.dumps(gemini_contents()).encode(),
                                       dict(GE, **{"X-DP-Scenario": "STREAM_CUT; events=" + huge}))
        self.assertEqual(st, 400)


class RecordingsTest(HostileCase):
    """Redaction reaches binary answers; any test id records; a killed recorder's leftovers go; a broken
    file in the folder is one line."""

    KEY = "sk-rec-HOSTILE-0123456789"

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.rules_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.rules_dir, True)
        blob = b"\xff\xfe\x00 ACCT-778899 " + self.KEY.encode() + b" \x80\x81 tail"
        with open(os.path.join(self.rules_dir, "bin.json"), "w") as f:
            json.dump([{"match": {"text": "binary"}, "respond": {"raw": {
                "status": 200, "headers": {"content-type": "application/octet-stream"},
                "body_base64": base64.b64encode(blob).decode()}}}], f)
        self.up = self.start("-q", "--rules", self.rules_dir)

    def recorder(self, *extra):
        ups = ["%s=%s" % (p, self.up.url) for p in ("openai", "anthropic", "gemini")]
        return self.start("--record", self.dir, "--upstream", *ups, "--record-redact", r"ACCT-\d+", *extra)

    def test_redaction_applies_to_binary_bodies(self):
        rec = self.recorder()
        st, _, data = rec.request("POST", "/v1/chat/completions", json.dumps(openai_chat("binary")).encode(),
                                  openai_headers(self.KEY))
        self.assertEqual(st, 200)
        self.assertIn(b"ACCT-778899", data)  # the client gets the answer as it came
        with open(os.path.join(self.dir, "default.json")) as f:
            raw = json.load(f)["rules"][0]["respond"]["raw"]
        saved = base64.b64decode(raw["body_base64"])
        self.assertNotIn(b"ACCT-778899", saved)
        self.assertNotIn(self.KEY.encode(), saved)
        self.assertEqual(saved, b"\xff\xfe\x00 [REDACTED] [REDACTED] \x80\x81 tail")

    def test_a_test_named_like_a_reserved_file_records_and_replays(self):
        rec = self.recorder()
        for test in ("default", "default.json", ".hidden", "a/../../b"):
            st, _, _ = rec.request("POST", "/v1/chat/completions", json.dumps(openai_chat("hi " + test)).encode(),
                                   dict(openai_headers(self.KEY), **{"X-DP-Test-Id": test}))
            self.assertEqual(st, 200)
        rec.stop()
        names = sorted(os.listdir(self.dir))
        self.assertNotIn("default.json", names)  # no request outside a test: default.json is nobody's
        self.assertEqual(len(names), 4, names)
        self.assertTrue(all(os.path.dirname(os.path.join(self.dir, n)) == self.dir for n in names))
        replay = self.start("-q", "--rules", self.dir)
        for test in ("default", "default.json", ".hidden", "a/../../b"):
            st, _, _ = replay.request("POST", "/v1/chat/completions",
                                      json.dumps(openai_chat("hi " + test)).encode(),
                                      dict(openai_headers(self.KEY), **{"X-DP-Test-Id": test}))
            entry = json.loads(replay.request("GET", "/_control/requests?limit=1&test=" + quote(test, safe=""))[2])
            self.assertEqual(entry["requests"][-1]["source"], "replayed", test)

    def test_leftovers_and_broken_files_at_start(self):
        gone_pid = 4000000
        while True:
            try:
                os.kill(gone_pid, 0)
                gone_pid += 1
            except ProcessLookupError:
                break
            except PermissionError:
                gone_pid += 1
        stale = os.path.join(self.dir, ".default.json.%d.1.tmp" % gone_pid)
        live = os.path.join(self.dir, ".default.json.%d.1.tmp" % os.getpid())
        for path in (stale, live):
            with open(path, "w") as f:
                f.write('{"rules": [')  # cut off mid-write
        with open(os.path.join(self.dir, "broken.json"), "w") as f:
            f.write('{"rules": [{"id": ')
        with open(os.path.join(self.dir, "deep.json"), "w") as f:
            f.write("[" * 100000)
        rec = self.recorder()
        self.assertFalse(os.path.exists(stale))
        self.assertTrue(os.path.exists(live))  # a recorder that is still running owns it
        st, _, _ = rec.request("POST", "/v1/chat/completions", json.dumps(openai_chat("binary")).encode(),
                               openai_headers(self.KEY))
        self.assertEqual(st, 200)
        self.assertTrue(os.path.exists(os.path.join(self.dir, "default.json")))
        log = rec.errors().decode().splitlines()
        self.assertEqual(len([l for l in log if "broken.json" in l]), 1, log)
        self.assertEqual(len([l for l in log if "deep.json" in l]), 1, log)
        self.assertEqual(len([l for l in log if "tmp" in l and "removed" in l]), 1, log)


if __name__ == "__main__":
    unittest.main()
