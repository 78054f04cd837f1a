"""Rules: matching, answers, per-test namespaces, text and embedding rules, strict mode."""

import base64
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
import unittest

from dpmock import cosine
from dpmock import embedding
from dpmock import embedding_b64
from dpmocklib.base import scenarios
import dpmock

from .support import (AN, DPMOCK, DPMOCKCTL, GE, OA, PY, Server, chat_body, ctl, decode_chunks, raw_request, run,
    scen, sse_chunks, sse_events)


WEATHER_RULES = [
    {"id": "ask-weather", "match": {"text_regex": r"weather in (?P<city>\w+)", "tool_result": False},
     "respond": {"tool_calls": [{"name": "get_weather", "arguments": {"city": "{{city}}"}}]}},
    {"id": "after-weather", "match": {"tool_result": "get_weather"}, "respond": {"text": "It is sunny in Paris"}},
    {"id": "greeting", "match": {"text": "hello"}, "respond": {"text": "Hi from {{model}}"}},
]
OPENAI_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def openai_text(r):
    return r["choices"][0]["message"]["content"]


def stream_text(raw, provider):
    """The text a client assembles from a raw streamed answer."""
    out = []
    for c in sse_chunks(raw)[1]:
        for _, data in sse_events(c.replace(b"\r\n", b"\n")):
            if data in (None, "[DONE]"):
                continue
            d = json.loads(data)
            if provider == "openai":
                out.append(d["choices"][0]["delta"].get("content") or "" if d.get("choices") else "")
            elif provider == "anthropic":
                out.append(d.get("delta", {}).get("text", "") if d["type"] == "content_block_delta" else "")
            else:
                out.append("".join(p.get("text", "") for p in d["candidates"][0]["content"]["parts"]))
    return "".join(out)


class RulesTest(unittest.TestCase):
    """Rules written once answer on every provider and route, streamed or not."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        with open(os.path.join(self.dir, "weather.json"), "w") as f:
            json.dump(WEATHER_RULES, f)
        self.log = os.path.join(self.dir, "log.txt")
        self.srv = Server("--rules", self.dir, logfile=self.log)
        self.addCleanup(self.srv.stop)

    def post(self, path, body, headers, raw=False):
        data = json.dumps(body).encode()
        if raw:
            return self.srv.raw(raw_request(path, headers, data, close=True))
        st, _, out = self.srv.request("POST", path, data, headers)
        return st, json.loads(out)

    def test_one_rule_serves_every_provider_streamed_or_not(self):
        oa = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello there"}]}
        st, r = self.post("/v1/chat/completions", oa, OA)
        self.assertEqual((st, openai_text(r), r["object"]), (200, "Hi from gpt-4o", "chat.completion"))
        self.assertEqual(stream_text(self.post("/v1/chat/completions", dict(oa, stream=True), OA, True), "openai"),
                         "Hi from gpt-4o")
        an = {"model": "claude-sonnet-4-5", "max_tokens": 50, "messages": [{"role": "user", "content": "hello"}]}
        st, r = self.post("/v1/messages", an, AN)
        self.assertEqual((st, r["type"], r["content"][0]["text"], r["stop_reason"]),
                         (200, "message", "Hi from claude-sonnet-4-5", "end_turn"))
        self.assertEqual(stream_text(self.post("/v1/messages", dict(an, stream=True), AN, True), "anthropic"),
                         "Hi from claude-sonnet-4-5")
        ge = {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}
        st, r = self.post("/v1beta/models/gemini-2.5-flash:generateContent", ge, GE)
        self.assertEqual((st, r["candidates"][0]["content"]["parts"][0]["text"]), (200, "Hi from gemini-2.5-flash"))
        raw = self.post("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", ge, GE, True)
        self.assertEqual(stream_text(raw, "gemini"), "Hi from gemini-2.5-flash")
        st, r = self.post("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hello"}, OA)
        self.assertEqual(r["choices"][0]["text"], "Hi from gpt-3.5-turbo-instruct")
        st, r = self.post("/v1/responses", {"model": "gpt-4.1", "input": "hello"}, OA)
        self.assertEqual((st, r["object"], r["output"][0]["content"][0]["text"]), (200, "response", "Hi from gpt-4.1"))
        raw = self.post("/v1/responses", {"model": "gpt-4.1", "input": "hello", "stream": True}, OA, True)
        deltas = [json.loads(d)["delta"] for c in sse_chunks(raw)[1] for n, d in sse_events(c)
                  if n == "response.output_text.delta"]
        self.assertEqual("".join(deltas), "Hi from gpt-4.1")
        journal = json.loads(self.srv.request("GET", "/_control/requests?rule=greeting")[2])
        self.assertEqual(journal["matched"], 9)

    def test_agent_loop_on_each_provider(self):
        first = [{"role": "user", "content": "What is the weather in Paris?"}]
        st, r = self.post("/v1/chat/completions", {"model": "gpt-4o", "messages": first, "tools": OPENAI_TOOLS}, OA)
        call = r["choices"][0]["message"]["tool_calls"][0]
        self.assertEqual((r["choices"][0]["finish_reason"], call["function"]["name"],
                          json.loads(call["function"]["arguments"])), ("tool_calls", "get_weather", {"city": "Paris"}))
        second = first + [r["choices"][0]["message"], {"role": "tool", "tool_call_id": call["id"], "content": "22C"}]
        st, r = self.post("/v1/chat/completions", {"model": "gpt-4o", "messages": second, "tools": OPENAI_TOOLS}, OA)
        self.assertEqual(openai_text(r), "It is sunny in Paris")
        tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
        st, r = self.post("/v1/messages", {"model": "m", "max_tokens": 9, "messages": first, "tools": tools}, AN)
        use = r["content"][0]
        self.assertEqual((r["stop_reason"], use["name"], use["input"]), ("tool_use", "get_weather", {"city": "Paris"}))
        msgs = first + [{"role": "assistant", "content": r["content"]},
                        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"], "content": "22C"}]}]
        st, r = self.post("/v1/messages", {"model": "m", "max_tokens": 9, "messages": msgs, "tools": tools}, AN)
        self.assertEqual(r["content"][0]["text"], "It is sunny in Paris")
        r = self.post("/v1/responses", {"model": "gpt-4o", "input": "weather in Paris?", "tools": [
            {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]}, OA)[1]
        call = r["output"][0]
        self.assertEqual((call["type"], call["name"], json.loads(call["arguments"])),
                         ("function_call", "get_weather", {"city": "Paris"}))
        r = self.post("/v1/responses", {"model": "gpt-4o", "previous_response_id": r["id"], "input": [
            {"type": "function_call_output", "call_id": call["call_id"], "output": "22C"}]}, OA)[1]
        self.assertEqual(r["output"][0]["content"][0]["text"], "It is sunny in Paris")
        ge = {"contents": [{"role": "user", "parts": [{"text": "weather in Paris"}]}]}
        st, r = self.post("/v1beta/models/gemini-2.5-flash:generateContent", ge, GE)
        fc = r["candidates"][0]["content"]["parts"][0]["functionCall"]
        self.assertEqual(fc, {"name": "get_weather", "args": {"city": "Paris"}})
        ge["contents"] += [r["candidates"][0]["content"], {"role": "user", "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"t": "22C"}}}]}]
        st, r = self.post("/v1beta/models/gemini-2.5-flash:generateContent", ge, GE)
        self.assertEqual(r["candidates"][0]["content"]["parts"][0]["text"], "It is sunny in Paris")

    def test_a_base_url_namespace_gets_its_own_rules(self):
        """A C-library-style client can set only a base URL: OPENAI_API_BASE_URL=$DP_MOCK_SERVER/_t/alpha/v1."""
        rule = {"id": "alpha-only", "match": {"text": "status"}, "respond": {"text": "alpha says ok"}}
        st, _, out = self.srv.request("POST", "/_control/rules?test=alpha", json.dumps(rule).encode())
        self.assertEqual((st, json.loads(out)), (200, {"ids": ["alpha-only"], "test": "alpha"}))
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "status?"}]}
        self.assertEqual(openai_text(self.post("/_t/alpha/v1/chat/completions", body, OA)[1]), "alpha says ok")
        self.assertEqual(openai_text(self.post("/v1/chat/completions", body, dict(OA, **{"X-DP-Test-Id": "alpha"}))[1]),
                         "alpha says ok")
        self.assertEqual(openai_text(self.post("/_t/beta/v1/chat/completions", body, OA)[1]), "dpmock reply to: status?")
        self.assertEqual(openai_text(self.post("/_t/beta/v1/chat/completions", dict(body, messages=[
            {"role": "user", "content": "hello"}]), OA)[1]), "Hi from gpt-4o")  # global rules apply in every test
        entries = json.loads(self.srv.request("GET", "/_control/requests?test=alpha")[2])["requests"]
        self.assertEqual([(e["test"], e["rule"], e["path"]) for e in entries],
                         [("alpha", "alpha-only", "/v1/chat/completions")] * 2)
        reset = json.loads(self.srv.request("POST", "/_control/reset?test=alpha", b"")[2])
        self.assertEqual(reset["cleared_requests"], 2)
        self.assertEqual(json.loads(self.srv.request("GET", "/_control/requests?test=beta")[2])["matched"], 2)
        self.assertEqual(self.srv.request("GET", "/_t/bad%01name/v1/models", None, OA)[0], 400)  # a control char

    def test_strict_mode_names_the_nearest_rule(self):
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "the weather in"}]}
        st, r = self.post("/v1/chat/completions", body, dict(OA, **{"X-DP-Strict": "1"}))
        self.assertEqual((st, r["error"]["code"]), (400, "no_rule_matched"))
        self.assertIn("nearest: rule 'ask-weather' (text_regex", r["error"]["message"])
        self.assertIn('got "the weather in"', r["error"]["message"])
        st, r = self.post("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [
            {"role": "user", "content": "nope"}]}, dict(AN, **{"X-DP-Strict": "true"}))
        self.assertEqual((st, r["type"], r["error"]["type"]), (400, "error", "invalid_request_error"))
        e = json.loads(self.srv.request("GET", "/_control/requests?limit=1")[2])["requests"][0]
        self.assertTrue(e["rule"].startswith("miss: rule"), e["rule"])
        self.assertEqual(self.srv.request("GET", "/v1/models", None, dict(OA, **{"X-DP-Strict": "1"}))[0], 200)

    def test_files_reload_on_change_and_sighup_and_a_broken_file_keeps_its_rules(self):
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}
        path = os.path.join(self.dir, "weather.json")
        with open(path, "w") as f:
            json.dump([{"id": "greeting", "match": {"text": "hello"}, "respond": {"text": "v2"}}], f)
        deadline = time.monotonic() + 4
        while openai_text(self.post("/v1/chat/completions", body, OA)[1]) != "v2":
            self.assertLess(time.monotonic(), deadline, "a changed rules file was not reloaded")
            time.sleep(0.1)
        with open(path, "w") as f:
            f.write('[{"id": "greeting",\n "match": {"text": "hello"}, "respond": {"text": "v3"}\n')  # cut off
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10 ** 9))
        self.srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 4
        while True:
            with open(self.log) as f:
                text = f.read()
            if "weather.json: line" in text:
                break
            self.assertLess(time.monotonic(), deadline, text)
            time.sleep(0.05)
        self.assertEqual(len([l for l in text.splitlines() if "weather.json: line" in l]), 1)
        self.assertEqual(openai_text(self.post("/v1/chat/completions", body, OA)[1]), "v2")  # the old rules stay
        self.assertIsNone(self.srv.proc.poll())

    def test_runtime_rules_and_refusals_name_the_field(self):
        add = lambda spec, q="": self.srv.request("POST", "/_control/rules" + q, json.dumps(spec).encode())
        st, _, out = add([{"match": {"text": "x1"}, "respond": {"text": "one"}},
                          {"id": "two", "match": {"text": "x2"}, "respond": {"text": "two"}}])
        ids = json.loads(out)["ids"]
        self.assertEqual((st, len(ids), ids[1]), (200, 2, "two"))
        for bad, named in (({"match": {"colour": 1}, "respond": {"text": "x"}}, "colour"),
                           ({"match": {"turn": "1"}, "respond": {"text": "x"}}, "match.turn"),
                           ({"match": {}, "respond": {"finish": "done"}}, "respond.finish"),
                           ({"match": {}, "respond": {"scenario": "NOPE"}}, "respond.scenario"),
                           ({"match": {}, "respond": [{"text": 1}]}, "respond[0].text"),
                           ({"id": "two", "match": {}, "respond": {"text": "dup"}}, "two"),
                           ({"match": {"text_regex": "("}, "respond": {"text": "x"}}, "text_regex")):
            st, _, out = add(bad)
            r = json.loads(out)
            self.assertEqual((st, r["error"]["code"]), (400, "bad_rule"), bad)
            self.assertIn(named, r["error"]["message"])
        listing = json.loads(self.srv.request("GET", "/_control/rules")[2])
        self.assertEqual(listing["count"], 5)
        self.assertEqual(self.srv.request("DELETE", "/_control/rules/two")[0], 200)
        self.assertEqual(self.srv.request("DELETE", "/_control/rules/two")[0], 404)
        self.assertEqual(self.srv.request("DELETE", "/_control/rules/greeting")[0], 409)  # from a file
        self.assertEqual(json.loads(self.srv.request("DELETE", "/_control/rules")[2])["cleared"], 1)
        self.assertEqual(json.loads(self.srv.request("GET", "/_control/rules")[2])["count"], 3)

    def test_times_priority_scripts_templates_errors_scenarios_embeddings(self):
        rules = [{"id": "once", "priority": 5, "times": 1, "match": {"text": "ping"}, "respond": {"text": "first"}},
                 {"id": "script", "match": {"text": "ping"}, "respond": [{"text": "a"}, {"text": "b"}]},
                 {"id": "err", "match": {"text": "boom", "provider": "anthropic"},
                  "respond": {"error": {"status": 529, "message": "busy", "type": "overloaded_error"}}},
                 {"id": "cut", "match": {"text": "cut me", "stream": True}, "respond": {
                     "text": "one two three four five", "scenario": "STREAM_CUT; events=2"}},
                 {"id": "limit", "match": {"text": "filter", "model": "gpt-*"},
                  "respond": {"text": "blocked", "finish": "content_filter", "usage": {"input_tokens": 7}}},
                 {"id": "vec", "match": {"route": "embeddings"}, "respond": {"embedding": [0.6, 0.8]}},
                 {"id": "hdr", "match": {"header": {"x-team": "red"}, "body": {"/temperature": 0.5}},
                  "respond": {"json": {"team": "red"}}}]
        self.assertEqual(self.srv.request("POST", "/_control/rules", json.dumps(rules).encode())[0], 200)
        body = lambda text, **kw: dict({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}, **kw)
        texts = [openai_text(self.post("/v1/chat/completions", body("ping"), OA)[1]) for _ in range(4)]
        self.assertEqual(texts, ["first", "a", "b", "b"])
        st, r = self.post("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "user",
                                                                                      "content": "boom"}]}, AN)
        self.assertEqual((st, r["error"]["type"], r["error"]["message"]), (529, "overloaded_error", "busy"))
        raw = self.post("/v1/chat/completions", body("cut me", stream=True), OA, True)
        self.assertEqual(len(decode_chunks(raw.partition(b"\r\n\r\n")[2], strict=False)[0]), 2)
        st, r = self.post("/v1/chat/completions", body("filter"), OA)
        self.assertEqual((r["choices"][0]["finish_reason"], r["usage"]["prompt_tokens"]), ("content_filter", 7))
        st, r = self.post("/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}, OA)
        self.assertEqual(r["data"][0]["embedding"], [0.6, 0.8])
        st, r = self.post("/v1/chat/completions", body("x", temperature=0.5), dict(OA, **{"X-Team": "red"}))
        self.assertEqual(json.loads(openai_text(r)), {"team": "red"})
        listing = {x["id"]: x for x in json.loads(self.srv.request("GET", "/_control/rules")[2])["rules"]}
        self.assertEqual((listing["once"]["hits"], listing["script"]["hits"]), (1, 3))

    def test_parallel_namespaces_never_see_each_other(self):
        errors = []

        def one_test(name):
            try:
                rule = {"id": "r", "match": {"text": "who"}, "respond": {"text": "I am %s" % name}}
                st, _, out = self.srv.request("POST", "/_control/rules?test=%s" % name, json.dumps(rule).encode())
                assert st == 200, out
                for _ in range(10):
                    r = self.post("/_t/%s/v1/chat/completions" % name,
                                  {"model": "m", "messages": [{"role": "user", "content": "who?"}]}, OA)[1]
                    assert openai_text(r) == "I am %s" % name, r
                self.srv.request("DELETE", "/_control/rules?test=%s" % name)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=one_test, args=("t%d" % i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        self.assertEqual(errors, [])
        self.assertEqual(json.loads(self.srv.request("GET", "/_control/rules")[2])["count"], 3)

    def test_a_requested_scenario_answer_comes_before_the_rules(self):
        self.assertEqual(self.srv.request("POST", "/_control/rules", json.dumps(
            {"match": {}, "respond": {"text": "from a rule"}}).encode())[0], 200)
        st, _, body = self.srv.request("POST", "/v1/chat/completions", b"{}",
                                       {"Authorization": "Bearer RATE_LIMIT_COMPLETION"})
        self.assertEqual((st, json.loads(body)), (429, scenarios.RATE_LIMIT))  # the Flask mock's answer, unread
        raw = self.srv.raw(raw_request("/v1/chat/completions", scen("STREAM_CUT; events=2"), chat_body(True)))
        self.assertIn(b"from", raw)  # a fault shapes the rule's answer
        self.assertEqual(len(decode_chunks(raw.partition(b"\r\n\r\n")[2], strict=False)[0]), 2)

    def test_dpmockctl_rules_commands(self):
        env = dict(os.environ, DP_MOCK_SERVER=self.srv.url)
        r = subprocess.run([PY, DPMOCKCTL, "rules", "add", "-", "--test", "ctl"], env=env, timeout=20,
                           input=json.dumps({"id": "c", "match": {"text": "q"}, "respond": {"text": "r"}}).encode(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual((r.returncode, json.loads(r.stdout)["ids"]), (0, ["c"]), r.stderr)
        r = ctl("rules", "list", "--test", "ctl", env=env)
        self.assertEqual(sorted(x["id"] for x in json.loads(r.stdout)["rules"]),
                         ["after-weather", "ask-weather", "c", "greeting"])
        r = ctl("rules", "clear", "--test", "ctl", env=env)
        self.assertEqual(json.loads(r.stdout), {"cleared": 1})
        r = ctl("rules", "add", os.path.join(self.dir, "missing.json"), env=env)
        self.assertEqual(r.returncode, 1)
        self.assertEqual(len(r.stderr.decode().strip().splitlines()), 1)
        r = subprocess.run([PY, DPMOCKCTL, "rules", "add", "-"], env=env, input=b'{"match": 3}', timeout=20,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual(r.returncode, 1)
        self.assertIn("match must be an object", r.stderr.decode())

    def test_a_bad_rules_file_refuses_to_start_in_one_line(self):
        bad = os.path.join(self.dir, "bad.json")
        with open(bad, "w") as f:
            f.write('[{"match": {"text": "x"}, "respond": {"txt": "y"}}]')
        r = run([PY, DPMOCK, "--foreground", "--port", "0", "--rules", bad])
        self.assertEqual(r.returncode, 1)
        lines = r.stderr.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("bad.json: rule 1: unknown field respond.txt", lines[0])


class EmbeddingRuleTest(unittest.TestCase):
    TRIPLES = [
        ("the cat sat on the mat", "a cat on a mat", "quarterly revenue grew"),
        ("how do I reset my password", "password reset instructions", "best pizza in naples"),
        ("python list comprehension example", "list comprehension in python", "the weather is sunny today"),
        ("machine learning model training", "training a learning model", "grandma's apple pie recipe"),
        ("stock market crash", "the market crash hit stock prices", "kittens playing with yarn"),
        ("Où est la gare ?", "la gare est loin", "je mange une pomme"),
    ]

    def test_unit_length_and_dims(self):
        for dims in (1, 2, 3, 8, 256, 768, 1536, 3072):
            for text in ("", "   ", "!!!", "hello", "the cat sat on the mat " * 20):
                vec = embedding(text, dims)
                self.assertEqual(dims, len(vec))
                self.assertAlmostEqual(1.0, math.sqrt(sum(x * x for x in vec)), places=9)
        self.assertEqual(1536, len(embedding("x")))
        self.assertEqual(3072, len(embedding("x", dims=3072)))
        self.assertEqual(dpmock.EMBED_MAX_DIMS, len(embedding("x", 10 ** 9)))
        self.assertEqual(1, len(embedding("x", 0)))
        self.assertEqual(1536, len(embedding("x", "bad")))

    def test_deterministic_and_distinct(self):
        self.assertEqual(embedding("hello world"), embedding("hello world"))
        self.assertEqual(embedding(""), embedding(""))
        self.assertNotEqual(embedding("hello world"), embedding("Hello, world!"))
        self.assertGreater(cosine(embedding("hello world"), embedding("Hello, world!")), 0.95)
        self.assertNotEqual(embedding("a b"), embedding("b a"))

    def test_shared_words_are_closer(self):
        for dims in (64, 256, 1536, 3072):
            for a, near, far in self.TRIPLES:
                va, vn, vf = embedding(a, dims), embedding(near, dims), embedding(far, dims)
                with self.subTest(dims=dims, a=a):
                    self.assertGreater(cosine(va, vn), cosine(va, vf))
                    if dims >= 256:
                        self.assertGreater(cosine(va, vn), 0.3)
                        self.assertLess(abs(cosine(va, vf)), 0.25)

    def test_model_dims(self):
        self.assertEqual(1536, dpmock.embedding_dims("text-embedding-3-small"))
        self.assertEqual(3072, dpmock.embedding_dims("text-embedding-3-large"))
        self.assertEqual(3072, dpmock.embedding_dims("models/gemini-embedding-001"))
        self.assertEqual(768, dpmock.embedding_dims("models/text-embedding-004"))
        self.assertEqual(1536, dpmock.embedding_dims(None))

    def test_base64_is_little_endian_float32(self):
        vec = embedding("hello", 8)
        raw = base64.b64decode(embedding_b64(vec))
        self.assertEqual(32, len(raw))
        for x, y in zip(vec, struct.unpack("<8f", raw)):
            self.assertAlmostEqual(x, y, places=6)


#: One agent step on each provider: (path, headers, first request, the request after the tool's result,
#: the answer text of a reply, the tool calls of a reply).
def _agent_cases():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tool_oa = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}}]
    ask = "What is the weather in Paris?"
    oa1 = {"model": "gpt-4o", "tools": tool_oa, "messages": [{"role": "user", "content": ask}]}
    oa2 = dict(oa1, messages=oa1["messages"] + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 18}'}])
    rs1 = {"model": "gpt-4o", "input": ask,
           "tools": [{"type": "function", "name": "get_weather", "parameters": schema}]}
    rs2 = dict(rs1, input=[{"type": "message", "role": "user", "content": ask},
                           {"type": "function_call", "call_id": "c1", "name": "get_weather",
                            "arguments": '{"city": "Paris"}'},
                           {"type": "function_call_output", "call_id": "c1", "output": '{"temp": 18}'}])
    an1 = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": ask}],
           "tools": [{"name": "get_weather", "input_schema": schema}]}
    an2 = dict(an1, messages=an1["messages"] + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather",
                                       "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": '{"temp": 18}'}]}])
    ge1 = {"contents": [{"role": "user", "parts": [{"text": ask}]}],
           "tools": [{"functionDeclarations": [{"name": "get_weather", "parameters": schema}]}]}
    ge2 = dict(ge1, contents=ge1["contents"] + [
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp": 18}}}]}])
    return [
        ("chat", "/v1/chat/completions", OA, oa1, oa2, lambda r: r["choices"][0]["message"]["content"],
         lambda r: [c["function"]["name"] for c in r["choices"][0]["message"].get("tool_calls") or []]),
        ("responses", "/v1/responses", OA, rs1, rs2,
         lambda r: "".join(c["text"] for o in r["output"] if o["type"] == "message" for c in o["content"]),
         lambda r: [o["name"] for o in r["output"] if o["type"] == "function_call"]),
        ("messages", "/v1/messages", AN, an1, an2,
         lambda r: "".join(b["text"] for b in r["content"] if b["type"] == "text"),
         lambda r: [b["name"] for b in r["content"] if b["type"] == "tool_use"]),
        ("gemini", "/v1beta/models/gemini-2.5-flash:generateContent", GE, ge1, ge2,
         lambda r: "".join(p.get("text", "") for p in r["candidates"][0]["content"]["parts"]),
         lambda r: [p["functionCall"]["name"] for p in r["candidates"][0]["content"]["parts"] if "functionCall" in p]),
    ]


class AgentRuleTest(unittest.TestCase):
    """What an agent loop sees: the same rules mean the same on every provider's tool-result turn."""

    RULES = [
        {"id": "ask", "match": {"text": "weather"},  # no tool_result condition: it must not loop the agent
         "respond": {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}},
        {"id": "answer", "match": {"tool_result": "get_weather", "text_regex": r"weather in (?P<city>\w+)"},
         "respond": {"text": "Sunny in {{city}}"}},
    ]

    def setUp(self):
        self.srv = Server("-q")
        self.addCleanup(self.srv.stop)

    def post(self, path, body, headers):
        st, _, out = self.srv.request("POST", path, json.dumps(body).encode(), headers)
        return st, json.loads(out)

    def add(self, rules, test=None):
        path = "/_control/rules" + ("?test=" + test if test else "")
        st, _, out = self.srv.request("POST", path, json.dumps(rules).encode(), {})
        self.assertEqual(st, 200, out)

    def test_a_text_rule_answers_the_users_turn_and_a_tool_result_rule_the_next(self):
        self.add(self.RULES)
        for name, path, headers, first, second, text, calls in _agent_cases():
            with self.subTest(name):
                st, r = self.post(path, first, headers)
                self.assertEqual((st, calls(r)), (200, ["get_weather"]), r)
                st, r = self.post(path, second, headers)
                self.assertEqual((st, calls(r), text(r)), (200, [], "Sunny in Paris"), r)

    def test_templates_give_the_tool_result_and_the_calls_arguments(self):
        self.add({"match": {"tool_result": True},
                  "respond": {"text": "{{tool_name}}: {{tool_result.temp}} degrees in {{args.city}} "
                                      "({{tool_result}})"}})
        for name, path, headers, _, second, text, _ in _agent_cases():
            with self.subTest(name):
                st, r = self.post(path, second, headers)
                self.assertEqual(st, 200, r)
                self.assertEqual(json.loads(text(r).split(" (", 1)[1][:-1]), {"temp": 18})
                self.assertEqual(text(r).split(" (")[0], "get_weather: 18 degrees in Paris")

    def test_a_template_name_nothing_defines_is_refused_when_the_rule_loads(self):
        for rule, named in (({"match": {"text_regex": r"in (?P<city>\w+)"}, "respond": {"text": "in {{cty}}"}}, "cty"),
                            ({"match": {"text": "x"}, "respond": {"tool_calls": [
                                {"name": "f", "arguments": {"q": "{{2}}"}}]}}, "{{2}}")):
            st, _, out = self.srv.request("POST", "/_control/rules", json.dumps(rule).encode(), {})
            self.assertEqual(st, 400, out)
            message = json.loads(out)["error"]["message"]
            self.assertIn(named, message)
            self.assertIn("{{args.KEY}}", message)

    def test_a_tool_call_that_does_not_fit_the_request_is_refused_in_strict_mode_and_flagged_otherwise(self):
        for i, (call, named) in enumerate(((
                {"name": "get_wether", "arguments": {"city": "Paris"}},
                "'get_wether', which the request does not offer"),
                ({"name": "get_weather", "arguments": {"city": 5}}, "/city: 5 is not of type string"),
                ({"name": "get_weather", "arguments": {}}, "'city' is required"))):
            test = "bad-call-%d" % i
            self.add({"id": "bad", "match": {"text": "weather"}, "respond": {"tool_calls": [call]}}, test)
            for name, path, headers, first, _, _, calls in _agent_cases():
                with self.subTest(name, call=call):
                    h = dict(headers, **{"X-DP-Test-Id": test})
                    st, r = self.post(path, first, dict(h, **{"X-DP-Strict": "1"}))
                    self.assertEqual(st, 400, r)
                    self.assertIn("rule 'bad' calls tool", json.dumps(r))
                    self.assertIn(named, json.dumps(r).replace('\\"', '"'))
                    st, r = self.post(path, first, h)  # without strict mode: served, and flagged
                    self.assertEqual((st, calls(r)), (200, [call["name"]]), r)
            st, _, out = self.srv.request("GET", "/_control/requests?test=" + test, None, {})
            warnings = [e["warning"] for e in json.loads(out)["requests"]]
            self.assertEqual(len(warnings), 8)
            self.assertTrue(all(w and named in w for w in warnings[1::2]), warnings)

    def test_a_refused_tool_call_does_not_use_up_the_rule(self):
        self.add({"id": "once", "times": 1, "match": {"text": "weather"},
                  "respond": {"tool_calls": [{"name": "get_weather", "arguments": {}}]}}, "once")
        _, path, headers, first, _, _, calls = _agent_cases()[0]
        h = dict(headers, **{"X-DP-Test-Id": "once"})
        self.assertEqual(self.post(path, first, dict(h, **{"X-DP-Strict": "1"}))[0], 400)
        st, r = self.post(path, first, h)
        self.assertEqual((st, calls(r)), (200, ["get_weather"]), r)  # still its one time

    def test_a_miss_says_why_in_the_journal(self):
        self.add(self.RULES, "miss")
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "something else"}]}
        self.post("/v1/chat/completions", body, dict(OA, **{"X-DP-Test-Id": "miss"}))
        st, _, out = self.srv.request("GET", "/_control/requests?test=miss", None, {})
        rule = json.loads(out)["requests"][0]["rule"]
        self.assertTrue(rule.startswith("miss: rule 'ask' (text \"weather\""), rule)

    def test_edges_mean_the_same_everywhere(self):
        self.add(self.RULES + [{"id": "typed", "priority": 1, "match": {"tool_result": "get_weather", "text": "typed"},
                                "respond": {"tool_calls": [{"name": "get_weather", "arguments": {
                                    "city": "{{args.city}}", "n": "{{tool_result.temp}}", "raw": "{{{{city}}"}}]}}])
        cases = {c[0]: c for c in _agent_cases()}
        # Responses with tool_choice required: rules still see the tool's result, as on Chat
        _, path, headers, _, second, text, calls = cases["responses"]
        st, r = self.post(path, dict(second, tool_choice="required"), headers)
        self.assertEqual((calls(r), text(r)), ([], "Sunny in Paris"), r)
        # a user message of results plus the user's own words is the user's turn (as a user message after them)
        follow = "And the weather in Rome?"
        _, path, headers, _, second, _, calls = cases["messages"]
        last = dict(second["messages"][-1],
                    content=second["messages"][-1]["content"] + [{"type": "text", "text": follow}])
        st, r = self.post(path, dict(second, messages=second["messages"][:-1] + [last]), headers)
        self.assertEqual(calls(r), ["get_weather"], r)
        _, path, headers, _, second, _, calls = cases["gemini"]
        last = dict(second["contents"][-1], parts=second["contents"][-1]["parts"] + [{"text": follow}])
        st, r = self.post(path, dict(second, contents=second["contents"][:-1] + [last]), headers)
        self.assertEqual(calls(r), ["get_weather"], r)
        _, path, headers, _, second, _, calls = cases["chat"]
        st, r = self.post(path, dict(second, messages=second["messages"] + [{"role": "user", "content": follow}]),
                          headers)
        self.assertEqual(calls(r), ["get_weather"], r)
        # one template alone in tool call arguments keeps its JSON type; {{{{ is a literal {{
        body = dict(second, messages=[dict(second["messages"][0], content="typed weather in Paris")] +
                    second["messages"][1:])
        st, r = self.post(path, body, dict(headers, **{"X-DP-Strict": "1"}))
        self.assertEqual(st, 200, r)
        args = json.loads(r["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
        self.assertEqual(args, {"city": "Paris", "n": 18, "raw": "{{city}}"})
        # an empty ?test= on a request that changes state names no test: refused, not "every test"
        st, _, out = self.srv.request("POST", "/_control/reset?test=", b"", {})
        self.assertEqual(st, 400, out)

    def test_strict_mode_names_the_implied_condition(self):
        self.add(self.RULES[:1])
        for name, path, headers, _, second, _, _ in _agent_cases():
            with self.subTest(name):
                st, r = self.post(path, second, dict(headers, **{"X-DP-Strict": "1"}))
                self.assertEqual(st, 400, r)
                message = json.dumps(r)
                self.assertIn("tool_result (implied by a text condition", message)
                self.assertIn('got \\"get_weather\\"', message)

    def test_a_tests_rules_come_before_the_global_ones(self):
        self.add({"match": {"text": "hello"}, "respond": {"text": "global"}})
        self.add({"match": {"text": "hello"}, "respond": {"text": "the test's own"}}, "t1")
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}
        for headers, want in (({"X-DP-Test-Id": "t1"}, "the test's own"), ({}, "global"),
                              ({"X-DP-Test-Id": "t2"}, "global")):
            st, r = self.post("/v1/chat/completions", body, dict(OA, **headers))
            self.assertEqual(r["choices"][0]["message"]["content"], want, headers)

    def test_any_printable_test_id_names_a_namespace(self):
        node = "tests/test_agent.py::test_weather[openai-plain] (x)"
        self.add({"match": {"text": "hello"}, "respond": {"text": "node id"}}, urllib_quote(node))
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}
        st, r = self.post("/v1/chat/completions", body, dict(OA, **{"X-DP-Test-Id": node}))
        self.assertEqual(r["choices"][0]["message"]["content"], "node id")
        st, r = self.post("/_t/%s/v1/chat/completions" % urllib_quote(node), body, OA)
        self.assertEqual(r["choices"][0]["message"]["content"], "node id")
        st, _, out = self.srv.request("GET", "/_control/requests", None, {})
        self.assertEqual([e["test"] for e in json.loads(out)["requests"]], [node, node])
        st, _, out = self.srv.request("GET", "/_control/requests?test=", None, {})
        self.assertEqual(json.loads(out)["requests"], [])
        for bad in ("x" * 201, " padded", "tab\there"):
            st, _, out = self.srv.request("GET", "/_t/%s/v1/models" % urllib_quote(bad), None, OA)
            self.assertEqual(st, 400, bad)
            self.assertIn("printable", json.loads(out)["error"]["message"])


def urllib_quote(text):
    from urllib.parse import quote
    return quote(text, safe="")


class RuleSourcesTest(unittest.TestCase):

    def test_a_rules_file_broken_at_reload_is_listed_until_mended(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "a.json")
        with open(path, "w") as f:
            json.dump([{"match": {"text": "hi"}, "respond": {"text": "from a"}}], f)
        srv = Server("-q", "--rules", d)
        self.addCleanup(srv.stop)

        def listed():  # the two lists agree (read again if a reload came between the two requests)
            for _ in range(20):
                rules = json.loads(srv.request("GET", "/_control/rules")[2])
                status = json.loads(srv.request("GET", "/_control/status")[2])
                if rules["broken"] == status["rules_broken"]:
                    break
            self.assertEqual(rules["broken"], status["rules_broken"])
            return rules
        self.assertEqual(listed()["broken"], [])
        with open(path, "w") as f:
            f.write('[{"match": {"text": "hi"},\n "respond": {"txt": "typo"}}]')
        os.utime(path, ns=(time.time_ns() + 10 ** 9,) * 2)
        os.kill(srv.proc.pid, signal.SIGHUP)  # re-read now, not at the next second's check
        for _ in range(100):
            broken = listed()["broken"]
            if broken:
                break
            time.sleep(0.05)
        self.assertEqual([b["file"] for b in broken], [path])
        self.assertIn("txt", broken[0]["problem"])
        self.assertEqual(listed()["count"], 1)  # the old rule still answers
        with open(path, "w") as f:
            json.dump([{"match": {"text": "hi"}, "respond": {"text": "mended"}}], f)
        os.utime(path, ns=(time.time_ns() + 2 * 10 ** 9,) * 2)
        os.kill(srv.proc.pid, signal.SIGHUP)
        for _ in range(100):
            if not listed()["broken"]:
                break
            time.sleep(0.05)
        self.assertEqual(listed()["broken"], [])

    def test_dpmockctl_rules_clear_asks_for_all(self):
        srv = Server("-q")
        self.addCleanup(srv.stop)
        env = dict(os.environ, DP_MOCK_SERVER=srv.url)
        r = ctl("rules", "clear", env=env)
        self.assertEqual(r.returncode, 2)
        self.assertIn("--all", r.stderr.decode())
        self.assertEqual(len(r.stderr.decode().strip().splitlines()), 1)
        r = ctl("rules", "clear", "--all", env=env)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(ctl("rules", "list", "--all", env=env).returncode, 2)


class ThreeStepAgentTest(unittest.TestCase):
    """One rule set, one three-step agent with parallel tool calls: the same answers turn by turn on Chat,
    Responses, Messages and generateContent, streamed and not."""

    RULES = [
        {"id": "ask", "match": {"text": "weather"}, "respond": {"tool_calls": [
            {"name": "get_weather", "arguments": {"city": "Paris"}},
            {"name": "get_weather", "arguments": {"city": "London"}}]}},
        {"id": "then-time", "match": {"tool_result": "get_weather"},
         "respond": {"tool_calls": [{"name": "get_time", "arguments": {"city": "{{args.city}}"}}]}},
        {"id": "done", "match": {"tool_result": "get_time"},
         "respond": {"text": "It is {{tool_result}} in {{args.city}}, {{tool_result.x}}and the user asked: {{text}}"}},
    ]
    RESULTS = {"get_weather": '{"temp": 18}', "get_time": "10:00"}
    SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    ASK = "What is the weather in Paris and London?"

    def setUp(self):
        self.srv = Server("-q", "--strict")
        self.addCleanup(self.srv.stop)
        st, _, out = self.srv.request("POST", "/_control/rules", json.dumps(self.RULES).encode(), {})
        self.assertEqual(st, 200, out)

    # one adapter per API: (path, headers, first body, calls of a reply, text of a reply, the next body)
    def chat(self):
        tools = [{"type": "function", "function": {"name": n, "parameters": self.SCHEMA}} for n in self.RESULTS]

        def calls(r):
            return [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                    for c in r["choices"][0]["message"].get("tool_calls") or []]

        def nxt(body, found):
            msgs = body["messages"] + [{"role": "assistant", "content": None, "tool_calls": [
                {"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
                for i, n, a in found]}]
            msgs += [{"role": "tool", "tool_call_id": i, "content": self.RESULTS[n]} for i, n, _ in found]
            return dict(body, messages=msgs)
        return ("/v1/chat/completions", OA, {"model": "gpt-4o", "tools": tools,
                                             "messages": [{"role": "user", "content": self.ASK}]},
                calls, lambda r: r["choices"][0]["message"]["content"], nxt, "openai")

    def responses(self):
        tools = [{"type": "function", "name": n, "parameters": self.SCHEMA} for n in self.RESULTS]

        def calls(r):
            return [(o["call_id"], o["name"], json.loads(o["arguments"])) for o in r["output"]
                    if o["type"] == "function_call"]

        def nxt(body, found):
            items = [{"type": "message", "role": "user", "content": body["input"]}] if isinstance(
                body["input"], str) else body["input"]
            items = items + [{"type": "function_call", "call_id": i, "name": n, "arguments": json.dumps(a)}
                             for i, n, a in found]
            items += [{"type": "function_call_output", "call_id": i, "output": self.RESULTS[n]} for i, n, _ in found]
            return dict(body, input=items)
        return ("/v1/responses", OA, {"model": "gpt-4o", "tools": tools, "input": self.ASK}, calls,
                lambda r: "".join(c["text"] for o in r["output"] if o["type"] == "message" for c in o["content"]),
                nxt, "responses")

    def messages(self):
        tools = [{"name": n, "input_schema": self.SCHEMA} for n in self.RESULTS]

        def calls(r):
            return [(b["id"], b["name"], b["input"]) for b in r["content"] if b["type"] == "tool_use"]

        def nxt(body, found):
            return dict(body, messages=body["messages"] + [
                {"role": "assistant", "content": [{"type": "tool_use", "id": i, "name": n, "input": a}
                                                  for i, n, a in found]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": i, "content": self.RESULTS[n]}
                                             for i, n, _ in found]}])
        return ("/v1/messages", AN, {"model": "claude-sonnet-4-5", "max_tokens": 200, "tools": tools,
                                     "messages": [{"role": "user", "content": self.ASK}]}, calls,
                lambda r: "".join(b["text"] for b in r["content"] if b["type"] == "text"), nxt, "anthropic")

    def gemini(self):
        tools = [{"functionDeclarations": [{"name": n, "parameters": self.SCHEMA} for n in self.RESULTS]}]

        def calls(r):
            return [(None, p["functionCall"]["name"], p["functionCall"]["args"])
                    for p in r["candidates"][0]["content"]["parts"] if "functionCall" in p]

        def nxt(body, found):
            return dict(body, contents=body["contents"] + [
                {"role": "model", "parts": [{"functionCall": {"name": n, "args": a}} for _, n, a in found]},
                {"role": "user", "parts": [{"functionResponse": {"name": n, "response": {"content": self.RESULTS[n]}}}
                                           for _, n, _ in found]}])
        return ("/v1beta/models/gemini-2.5-flash:generateContent", GE, {
            "contents": [{"role": "user", "parts": [{"text": self.ASK}]}], "tools": tools}, calls,
            lambda r: "".join(p.get("text", "") for p in r["candidates"][0]["content"]["parts"]), nxt, "gemini")

    def run_agent(self, api):
        path, headers, body, calls, text, nxt, name = api()
        turns = []
        for _ in range(3):
            st, _, out = self.srv.request("POST", path, json.dumps(body).encode(), headers)
            self.assertEqual(st, 200, out[:300])
            r = json.loads(out)
            found = calls(r)
            streamed = self.stream(path, body, headers, name)
            turns.append(([(n, a) for _, n, a in found], text(r) or ""))  # OpenAI: content null beside calls
            self.assertEqual(streamed, (len(found), text(r) or ""), name)  # the stream says the same
            if not found:
                break
            body = nxt(body, found)
        return turns

    def stream(self, path, body, headers, name):
        """(tool calls, text) of the same request streamed: calls counted by their names in the events."""
        if name == "gemini":
            path = path.replace(":generateContent", ":streamGenerateContent") + "?alt=sse"
        else:
            body = dict(body, stream=True)
        raw = self.srv.raw(raw_request(path, headers, json.dumps(body).encode(), close=True))
        events = [json.loads(d) for c in sse_chunks(raw)[1] for _, d in sse_events(c.replace(b"\r\n", b"\n"))
                  if d not in (None, "[DONE]")]
        if name == "responses":
            final = next(e["response"] for e in events if e["type"] == "response.completed")
            return (sum(o["type"] == "function_call" for o in final["output"]),
                    "".join(c["text"] for o in final["output"] if o["type"] == "message" for c in o["content"]))
        if name == "openai":
            n = len({tc["index"] for e in events for tc in (e["choices"][0]["delta"].get("tool_calls") or [])
                     if e.get("choices")})
        elif name == "anthropic":
            n = sum(e["type"] == "content_block_start" and e["content_block"]["type"] == "tool_use" for e in events)
        else:
            n = sum("functionCall" in p for e in events for p in e["candidates"][0]["content"]["parts"])
        return n, stream_text(raw, name)

    def test_the_same_turns_on_every_api_streamed_and_not(self):
        want = [([("get_weather", {"city": "Paris"}), ("get_weather", {"city": "London"})], ""),
                ([("get_time", {"city": "London"})], ""),
                ([], "It is 10:00 in London, and the user asked: " + self.ASK)]
        for api in (self.chat, self.responses, self.messages, self.gemini):
            with self.subTest(api.__name__):
                turns = self.run_agent(api)
                self.assertEqual(turns, want)
