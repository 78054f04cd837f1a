"""Record and replay: forwarding upstream, saving rules, serving them back byte for byte."""

import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import unittest

import dpmock

from .support import (CA, DPMOCK, HERE, OA, PY, SERVER, Server, anthropic_headers, anthropic_messages,
    decode_chunks, free_port, gemini_contents, gemini_headers, openai_chat, openai_headers, raw_request,
    recv_until_reset, run, scen, tls_port)


REC_KEYS = {"openai": "sk-rec-OPENAI-0123456789", "anthropic": "sk-ant-rec-ANTHROPIC-0123456789",
            "gemini": "g-rec-GEMINI-0123456789"}
REC_OA = openai_headers(REC_KEYS["openai"])
REC_AN = anthropic_headers(REC_KEYS["anthropic"])
REC_GE = gemini_headers(REC_KEYS["gemini"])
GEMINI_PATH = "/v1beta/models/gemini-2.5-flash:"


#: (name, path, headers, body): every provider, streamed and not, as the SDKs and the C library send them.
REC_REQUESTS = [
    ("chat", "/v1/chat/completions", dict(REC_OA, **{"X-DP-Strict": "0"}), openai_chat("Record chat")),
    ("chat_stream", "/v1/chat/completions", REC_OA, openai_chat("Record chat stream", True)),
    ("chat_bare", "/chat/completions", REC_OA, openai_chat("Record the C library's bare path")),
    ("messages", "/v1/messages", REC_AN, anthropic_messages("Record messages")),
    ("messages_stream", "/messages", REC_AN, anthropic_messages("Record messages stream", True)),
    ("gemini", GEMINI_PATH + "generateContent", REC_GE, gemini_contents("Record gemini")),
    ("gemini_sse", GEMINI_PATH + "streamGenerateContent?alt=sse&key=" + REC_KEYS["gemini"], {},
     gemini_contents("Record gemini sse")),
    ("gemini_array", GEMINI_PATH + "streamGenerateContent", REC_GE, gemini_contents("Record gemini array")),
]


def unids(data):
    """An answer with its ids and times masked: the live answer and its replay agree on the rest."""
    text = data.decode("utf-8")
    text = re.sub(r'"(chatcmpl-|msg_|call_|toolu_|req_)[A-Za-z0-9_]+"', r'"\1X"', text)
    return re.sub(r'"(created|responseId)": ?("[^"]*"|\d+)', r'"\1": X', text)


def raw_body(raw):
    """The bytes a recorded answer (respond.raw) serves."""
    if "events" in raw:
        return "".join(e["data"] for e in raw["events"]).encode("utf-8")
    return raw["body"].encode("utf-8")


class LineReader:
    """The lines a process prints, read by a thread, so a test waits for one with a bound."""

    def __init__(self, stream):
        import queue
        self.lines = queue.Queue()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        try:
            for line in iter(stream.readline, b""):
                self.lines.put(line.decode().rstrip("\n"))
        except (OSError, ValueError):
            pass

    def next(self, timeout=5):
        return self.lines.get(timeout=timeout)


class RecordReplayTest(unittest.TestCase):
    """--record: answers forwarded to an upstream (a second dpmock), relayed, saved as rules; --rules: replayed."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)

    def server(self, *args, **kw):
        srv = Server(*args, **kw)
        self.addCleanup(srv.stop)
        return srv

    def recorder(self, url, *extra, **kw):
        ups = ["%s=%s" % (p, url) for p in ("openai", "anthropic", "gemini")]
        return self.server("-q", "--record", self.dir, "--upstream", *ups, *extra, **kw)

    def recordings(self, name="default"):
        with open(os.path.join(self.dir, name + ".json"), encoding="utf-8") as f:
            return json.load(f)

    def journal(self, srv, query=""):
        return json.loads(srv.request("GET", "/_control/requests" + query)[2])["requests"]

    def slow_upstream(self, tps=20):
        """A dpmock upstream whose answer to "slow ..." streams at ``tps`` events a second."""
        rules = tempfile.mkdtemp()  # not in the recording folder, which holds recordings only
        self.addCleanup(shutil.rmtree, rules, True)
        with open(os.path.join(rules, "slow.json"), "w") as f:
            json.dump([{"match": {"text": "slow"}, "respond": {
                "text": "one two three four five six seven eight", "scenario": "STREAM_SLOW; ttft_ms=0; tps=%d" % tps}}],
                f)
        return self.server("-q", "--rules", rules)

    def test_record_then_replay_offline_for_every_provider(self):
        log = os.path.join(self.dir, "..", os.path.basename(self.dir) + ".log")
        self.addCleanup(lambda: os.path.exists(log) and os.unlink(log))
        up = self.server("-q")
        ups = ["%s=%s" % (p, up.url) for p in ("openai", "anthropic", "gemini")]
        rec = self.server("--record", self.dir, "--upstream", *ups, logfile=log)
        live = {}
        for name, path, headers, body in REC_REQUESTS:
            st, hdrs, data = rec.request("POST", path, body, headers)
            self.assertEqual(st, 200, (name, data[:300]))
            live[name] = data
            self.assertNotIn(REC_KEYS["openai"], data.decode())
        self.assertIn("event: message_start", live["messages_stream"].decode())
        self.assertTrue(live["gemini_array"].startswith(b"[{"))
        entries = self.journal(rec)
        self.assertEqual([e["source"] for e in entries], ["recorded"] * len(REC_REQUESTS))
        self.assertTrue(all(e["rule"].startswith("rec-") for e in entries))
        forwarded = self.journal(up)  # what the upstream got: versioned paths, the client's keys, no X-DP-*
        self.assertEqual([e["path"] for e in forwarded][2], "/v1/chat/completions")
        self.assertEqual([e["path"] for e in forwarded][4], "/v1/messages")
        self.assertFalse(any(k.lower().startswith("x-dp-") for e in forwarded for k, _ in e["headers"]))
        for provider, key in REC_KEYS.items():
            self.assertGreaterEqual(len(self.journal(up, "?key=" + key)), 2, provider)
        self.assertEqual(up.stop(), 0)
        self.assertEqual(rec.stop(), 0)
        self.assertEqual(sorted(os.listdir(self.dir)), ["default.json"])  # no temporary file left
        with open(os.path.join(self.dir, "default.json"), encoding="utf-8") as f:
            text = f.read()
        for key in list(REC_KEYS.values()) + ["Bearer"]:
            self.assertNotIn(key, text)
        with open(log) as f:
            self.assertEqual(f.read().count("recorded POST "), len(REC_REQUESTS))
        rules = {r["recorded"]["path"] + r["match"].get("text_exact", ""): r for r in self.recordings()["rules"]}
        self.assertEqual(len(rules), len(REC_REQUESTS))
        replay = self.server("-q", "--rules", self.dir)  # the upstream is gone: offline
        for name, path, headers, body in REC_REQUESTS:
            with self.subTest(name=name):
                st, hdrs, data = replay.request("POST", path, body, headers)
                self.assertEqual(st, 200, data[:300])
                rule = next(r for r in rules.values() if r["match"].get("text_exact") == (
                    body["messages"][0]["content"] if "messages" in body else body["contents"][0]["parts"][0]["text"]))
                self.assertEqual(data, raw_body(rule["respond"]["raw"]))  # byte for byte, as recorded
                self.assertEqual(unids(data), unids(live[name]))  # the live answer, ids and times aside
                self.assertNotIn("x-dp-seed", hdrs)
        self.assertEqual({e["source"] for e in self.journal(replay)}, {"replayed"})

    def test_a_responses_chain_records_upstream_and_replays_whole_offline(self):
        tools = [{"type": "function", "name": "get_weather",
                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
        first = {"model": "gpt-4o", "input": "What is the weather in Paris?", "tools": tools}

        def chain(srv, stream):
            """The agent's two steps: ask, then answer the tool call, chained by previous_response_id."""
            st, _, data = srv.request("POST", "/v1/responses", dict(first, stream=stream), REC_OA)
            self.assertEqual(st, 200, data[:300])
            r1 = responses_final(data, stream)
            call = next(o for o in r1["output"] if o["type"] == "function_call")
            second = {"model": "gpt-4o", "tools": tools, "previous_response_id": r1["id"], "stream": stream,
                      "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": "18 C"}]}
            st, _, data = srv.request("POST", "/v1/responses", second, REC_OA)
            self.assertEqual(st, 200, data[:300])
            r2 = responses_final(data, stream)
            return [o["type"] for o in r1["output"]], r2["output"][-1]["content"][0]["text"]

        up = self.server("-q")  # the upstream holds the chain: dpmock here knows neither response id
        rec = self.recorder(up.url)
        recorded = [chain(rec, stream) for stream in (False, True)]
        self.assertEqual([e["source"] for e in self.journal(rec)], ["recorded"] * 4)
        rec.stop()
        up.stop()
        replay = self.server("-q", "--rules", self.dir, "--strict")  # offline: nothing to forward to
        self.assertEqual([chain(replay, stream) for stream in (False, True)], recorded)
        self.assertEqual([e["source"] for e in self.journal(replay)], ["replayed"] * 4)

    def test_record_command_prints_each_recording_one_file_per_test(self):
        up = self.server("-q")
        ups = ["%s=%s" % (p, up.url) for p in ("openai", "anthropic", "gemini")]
        rec = self.server("-q", "--upstream", *ups, sub=("record", self.dir))
        lines = LineReader(rec.proc.stdout)
        for test, path in (("t1", "/v1/chat/completions"), (None, "/_t/t2/v1/chat/completions"), (None, "/v1/chat/completions")):
            headers = dict(REC_OA, **({"X-DP-Test-Id": test} if test else {}))
            self.assertEqual(rec.request("POST", path, openai_chat("Per test"), headers)[0], 200)
            line = lines.next()
            self.assertRegex(line, r"^recorded POST /v1/chat/completions -> (.*) \(rule rec-[0-9a-f]{12}\)$")
            name = test or ("t2" if "/_t/" in path else "default")
            self.assertIn(" -> %s (" % os.path.join(self.dir, name + ".json"), line)
        self.assertEqual(sorted(os.listdir(self.dir)), ["default.json", "t1.json", "t2.json"])
        self.assertEqual((self.recordings("t1")["test"], self.recordings("t2")["test"]), ("t1", "t2"))
        self.assertNotIn("test", self.recordings())
        first = self.recordings("t1")
        self.assertEqual(rec.request("POST", "/v1/chat/completions", openai_chat("Per test"),
                                     dict(REC_OA, **{"X-DP-Test-Id": "t1"}))[0], 200)
        lines.next()
        again = self.recordings("t1")  # re-recorded: the same rule, replaced; ids and times normalised

        def untimed(doc):
            for r in doc["rules"]:
                r["respond"]["raw"].pop("t")
            return doc
        self.assertEqual(untimed(again), untimed(first))
        self.assertEqual(len(again["rules"]), 1)
        body = again["rules"][0]["respond"]["raw"]["body"]
        self.assertIn('"id":"chatcmpl-rec', body)
        self.assertIn('"created":%d' % dpmock.RECORDED_TIME, body)
        self.assertEqual(rec.stop(), 0)
        replay = self.server("-q", "--rules", self.dir)
        replay.request("POST", "/v1/chat/completions", openai_chat("Per test"), dict(REC_OA, **{"X-DP-Test-Id": "t1"}))
        replay.request("POST", "/_t/t3/v1/chat/completions", openai_chat("Per test"), REC_OA)
        self.assertEqual([(e["test"], e["source"]) for e in self.journal(replay)], [("t1", "replayed"),
                                                                                    ("t3", "replayed")])
        self.assertEqual(self.journal(replay)[1]["rule"], self.recordings()["rules"][0]["id"])  # the global one

    def test_faults_apply_to_replayed_answers(self):
        up = self.server("-q")
        rec = self.recorder(up.url)
        for body in (openai_chat("Fault me", True), openai_chat("Fault me")):
            self.assertEqual(rec.request("POST", "/v1/chat/completions", body, REC_OA)[0], 200)
        up.stop()
        rec.stop()
        events = [e["data"].encode() for e in self.recordings()["rules"][0]["respond"]["raw"]["events"]]
        replay = self.server("-q", "--rules", self.dir)
        cut = replay.raw(raw_request("/v1/chat/completions", scen("STREAM_CUT; events=2", **REC_OA),
                                     openai_chat("Fault me", True), close=True))
        chunks, _ = decode_chunks(cut.partition(b"\r\n\r\n")[2], strict=False)
        self.assertEqual(chunks, events[:2])  # two recorded events, then the cut
        self.assertFalse(cut.endswith(b"0\r\n\r\n"))
        noend = replay.request("POST", "/v1/chat/completions", openai_chat("Fault me", True),
                               scen("STREAM_NO_END", **REC_OA))[2]
        self.assertEqual(noend, b"".join(events[:-1]))  # data: [DONE] dropped
        errored = replay.request("POST", "/v1/chat/completions", openai_chat("Fault me", True),
                                 scen("STREAM_ERROR; after=1", **REC_OA))[2]
        self.assertTrue(errored.startswith(events[0]) and b"server_error" in errored)
        st, _, half = replay.request("POST", "/v1/chat/completions", openai_chat("Fault me"),
                                     scen("INVALID_JSON_200", **REC_OA))
        whole = self.recordings()["rules"][1]["respond"]["raw"]["body"].encode()
        self.assertEqual((st, half), (200, whole[:len(whole) // 2]))
        with socket.create_connection((replay.host, replay.port), timeout=5) as s:
            s.sendall(raw_request("/v1/chat/completions", scen("RESET; after_bytes=40", **REC_OA),
                                  openai_chat("Fault me"), close=True))
            got = recv_until_reset(s)
        self.assertEqual(len(got), 40)
        self.assertEqual(replay.request("POST", "/v1/chat/completions", openai_chat("Fault me"),
                                        scen("RATE_LIMITED", **REC_OA))[0], 429)
        self.assertEqual([e["source"] for e in self.journal(replay)], ["replayed"] * 5 + ["dpmock"])

    def test_recorded_pace_when_asked(self):
        up = self.slow_upstream(tps=20)
        rec = self.recorder(up.url)
        self.assertEqual(rec.request("POST", "/v1/chat/completions", openai_chat("slow please", True), REC_OA)[0], 200)
        up.stop()
        rec.stop()
        raw = self.recordings()["rules"][0]["respond"]["raw"]
        times = [e["t"] for e in raw["events"]]
        self.assertEqual(times, sorted(times))
        span = times[-1]
        self.assertGreater(span, 0.25)
        for timing, low, high in (("recorded", span * 0.8, span + 2), ("fast", 0, span / 2)):
            with self.subTest(timing=timing):
                replay = self.server("-q", "--rules", self.dir, "--replay-timing", timing)
                t0 = time.monotonic()
                st, _, data = replay.request("POST", "/v1/chat/completions", openai_chat("slow please", True), REC_OA)
                took = time.monotonic() - t0
                self.assertEqual((st, data), (200, raw_body(raw)))
                self.assertTrue(low <= took <= high, (timing, took, span))
                replay.stop()

    def test_tls_upstream_verified_with_the_test_ca(self):
        up = self.server("-q", "--listen", "tls:0")
        url = "https://127.0.0.1:%d" % tls_port(up)
        rec = self.recorder(url, "--upstream-ca", CA)
        for path, headers, body in (("/v1/chat/completions", REC_OA, openai_chat("Over TLS", True)),
                                    ("/v1/messages", REC_AN, anthropic_messages("Over TLS")),
                                    (GEMINI_PATH + "streamGenerateContent?alt=sse", REC_GE,
                                     gemini_contents("Over TLS"))):
            st, _, data = rec.request("POST", path, body, headers)
            self.assertEqual(st, 200, data[:300])
        rules = self.recordings()["rules"]
        self.assertEqual([r["recorded"]["upstream"] for r in rules], [url] * 3)
        untrusted = self.server("-q", "--record", os.path.join(self.dir, "other"), "--upstream", "openai=" + url)
        st, _, data = untrusted.request("POST", "/v1/chat/completions", openai_chat("Over TLS"), REC_OA)
        err = json.loads(data)["error"]
        self.assertEqual((st, err["code"], err["type"]), (502, "upstream_unreachable", "server_error"))
        self.assertIn(url, err["message"])
        self.assertIn("certificate verify failed", err["message"])
        self.assertEqual(os.listdir(os.path.join(self.dir, "other")), [])

    def test_unreachable_upstream_is_a_502_in_each_providers_shape(self):
        url = "http://127.0.0.1:%d" % free_port()  # nothing listens there
        rec = self.recorder(url)
        st, _, data = rec.request("POST", "/v1/chat/completions", openai_chat("Anyone?"), REC_OA)
        err = json.loads(data)["error"]
        self.assertEqual((st, err["type"], err["code"]), (502, "server_error", "upstream_unreachable"))
        self.assertIn("the openai upstream %s cannot be reached" % url, err["message"])
        st, _, data = rec.request("POST", "/v1/messages", anthropic_messages("Anyone?"), REC_AN)
        body = json.loads(data)
        self.assertEqual((st, body["type"], body["error"]["type"]), (502, "error", "api_error"))
        self.assertIn(url, body["error"]["message"])
        st, _, data = rec.request("POST", GEMINI_PATH + "generateContent", gemini_contents("Anyone?"), REC_GE)
        err = json.loads(data)["error"]
        self.assertEqual((st, err["code"], err["status"]), (502, 502, "UNAVAILABLE"))
        self.assertEqual(os.listdir(self.dir), [])
        self.assertEqual({e["status"] for e in self.journal(rec)}, {502})

    def test_upstream_errors_are_relayed_and_recorded_only_when_asked(self):
        up = self.server("-q")
        body = openai_chat("No such model", model="gpt-does-not-exist")
        direct = up.request("POST", "/v1/chat/completions", body, REC_OA)
        rec = self.recorder(up.url)
        st, _, data = rec.request("POST", "/v1/chat/completions", body, REC_OA)
        self.assertEqual((st, data), (404, direct[2]))
        self.assertEqual(os.listdir(self.dir), [])
        self.assertEqual(self.journal(rec)[0]["source"], "upstream")
        rec.stop()
        rec = self.recorder(up.url, "--record-errors")
        self.assertEqual(rec.request("POST", "/v1/chat/completions", body, REC_OA)[0], 404)
        self.assertEqual(self.recordings()["rules"][0]["respond"]["raw"]["status"], 404)
        up.stop()
        replay = self.server("-q", "--rules", self.dir)
        st, _, data = replay.request("POST", "/v1/chat/completions", body, REC_OA)
        self.assertEqual((st, json.loads(data)["error"]["code"]), (404, "model_not_found"))

    def test_a_scenario_is_answered_by_dpmock_not_forwarded(self):
        up = self.server("-q")
        rec = self.recorder(up.url)
        st, _, _ = rec.request("POST", "/v1/chat/completions", openai_chat("Limit me"), scen("RATE_LIMITED", **REC_OA))
        self.assertEqual(st, 429)
        cut = rec.raw(raw_request("/v1/chat/completions", scen("STREAM_CUT; events=1", **REC_OA),
                                  openai_chat("Cut me", True), close=True))
        self.assertFalse(cut.endswith(b"0\r\n\r\n"))
        self.assertEqual(self.journal(up), [])
        self.assertEqual(os.listdir(self.dir), [])

    def test_a_forwarding_loop_is_refused(self):
        port = free_port()
        rec = self.recorder("http://127.0.0.1:%d" % port, "--port", str(port))  # its own upstream
        st, _, data = rec.request("POST", "/v1/chat/completions", openai_chat("Loop"), REC_OA)
        self.assertEqual((st, json.loads(data)["error"]["code"]), (508, "forwarding_loop"))
        self.assertEqual([e["source"] for e in self.journal(rec)], ["upstream", "dpmock"])  # one hop, no more
        via = dict(self.journal(rec)[1]["headers"])["Via"]
        self.assertRegex(via, r"^1\.1 dpmock-[0-9a-f]{12}$")
        self.assertEqual(os.listdir(self.dir), [])

    def test_a_client_that_leaves_mid_stream_leaves_no_recording(self):
        up = self.slow_upstream(tps=10)
        rec = self.recorder(up.url)
        with socket.create_connection((rec.host, rec.port), timeout=5) as s:
            s.sendall(raw_request("/v1/chat/completions", REC_OA, openai_chat("slow please", True)))
            got = b""
            while b"data: " not in got:  # the head and the first event: then leave
                piece = s.recv(65536)
                self.assertTrue(piece, got)
                got += piece
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self.journal(rec)[0]["ended"] == "pending":
            time.sleep(0.05)
        self.assertEqual(self.journal(rec)[0]["ended"], "client_gone")
        self.assertEqual(os.listdir(self.dir), [])  # no recording, whole or half, and no temporary file
        self.assertEqual(rec.stop(), 0)

    def test_redaction_keys_and_patterns(self):
        up = self.server("-q")
        rec = self.recorder(up.url, "--record-redact", r"ACCT-\d+")
        prompt = "Account ACCT-123456, key %s, please" % REC_KEYS["openai"]
        st, _, live = rec.request("POST", "/v1/chat/completions", openai_chat(prompt), REC_OA)
        self.assertEqual(st, 200)
        self.assertIn(b"ACCT-123456", live)  # the client gets the answer as the provider gave it
        with open(os.path.join(self.dir, "default.json")) as f:
            text = f.read()
        self.assertNotIn("ACCT-123456", text)
        self.assertNotIn(REC_KEYS["openai"], text)
        rule = self.recordings()["rules"][0]
        self.assertIn("[REDACTED]", rule["respond"]["raw"]["body"])
        self.assertNotIn("text_exact", rule["match"])
        up.stop()
        rec.stop()
        replay = self.server("-q", "--rules", self.dir)  # the redacted prompt still matches
        st, _, data = replay.request("POST", "/v1/chat/completions", openai_chat(prompt), REC_OA)
        self.assertEqual((st, data), (200, rule["respond"]["raw"]["body"].encode()))
        self.assertEqual(self.journal(replay)[0]["source"], "replayed")

    def test_raw_answers_and_their_validation(self):
        good = {"match": {"text_exact": "raw please", "query": {"v": None}},
                "respond": {"raw": {"status": 201, "headers": {"content-type": "text/plain", "x-extra": "1"},
                                    "body": "as {{text}} is"}}, "recorded": {"method": "POST", "status": 201}}
        st, _, data = SERVER.request("POST", "/_control/rules?test=rawtest", [good])
        self.assertEqual(st, 200, data)
        self.addCleanup(SERVER.request, "DELETE", "/_control/rules?test=rawtest")
        headers = dict(OA, **{"X-DP-Test-Id": "rawtest"})
        st, hdrs, data = SERVER.request("POST", "/v1/chat/completions", openai_chat("raw please"), headers)
        self.assertEqual((st, hdrs["content-type"], hdrs["x-extra"], data), (201, "text/plain", "1", b"as {{text}} is"))
        self.assertEqual(SERVER.request("POST", "/v1/chat/completions?v=1", openai_chat("raw please"), headers)[0], 200)
        self.assertEqual(SERVER.request("POST", "/v1/chat/completions", openai_chat("raw please!"), headers)[0], 200)
        events = ["data: {\"n\": %d}\n\n" % i for i in range(3)]
        cut = {"match": {"text_exact": "raw cut"}, "respond": {"scenario": "STREAM_CUT; events=1", "raw": {
            "status": 200, "headers": {"content-type": "text/event-stream"}, "events": [
                {"t": 0.001 * i, "data": e} for i, e in enumerate(events)]}}}
        self.assertEqual(SERVER.request("POST", "/_control/rules?test=rawtest", cut)[0], 200)
        got = SERVER.raw(raw_request("/v1/chat/completions", headers, openai_chat("raw cut", True), close=True))
        self.assertEqual(decode_chunks(got.partition(b"\r\n\r\n")[2], strict=False)[0], [events[0].encode()])
        raw = good["respond"]["raw"]
        for spec, named in (
                ({"raw": dict(raw, status=99)}, "respond.raw.status"),
                ({"raw": dict(raw, events=[])}, "exactly one of body"),
                ({"raw": {"status": 200, "events": [{"t": -1, "data": "x"}]}}, "respond.raw.events[0].t"),
                ({"raw": {"status": 200, "events": [{"t": 0}]}}, "respond.raw.events[0]"),
                ({"raw": dict(raw, headers={"Content-Length": "3"})}, "Content-Length"),
                ({"raw": dict(raw, body_base64="!!")}, "exactly one of body"),
                ({"raw": {"status": 200, "body_base64": 3}}, "respond.raw.body_base64"),
                ({"raw": dict(raw, colour="red")}, "respond.raw.colour"),
                ({"raw": raw, "text": "hi"}, "goes alone")):
            with self.subTest(named=named):
                st, _, data = SERVER.request("POST", "/_control/rules?test=rawtest", {"respond": spec})
                self.assertEqual(st, 400, data)
                self.assertIn(named, json.loads(data)["error"]["message"])
        for bad, named in (({"recorded": "yesterday"}, "recorded"), ({"match": {"query": {"v": 1}}}, "match.query"),
                           ({"match": {"text_exact": 3}}, "match.text_exact")):
            with self.subTest(named=named):
                st, _, data = SERVER.request("POST", "/_control/rules?test=rawtest", dict(good, **bad))
                self.assertEqual(st, 400, data)
                self.assertIn(named, json.loads(data)["error"]["message"])

    def test_replay_timing_of_a_hand_written_recording(self):
        rule = {"match": {"text_exact": "paced"}, "respond": {"raw": {
            "status": 200, "headers": {"content-type": "text/event-stream"}, "t": 0.1,
            "events": [{"t": t, "data": "data: %s\n\n" % t} for t in (0.0, 0.15, 0.3)]}}}
        paced = self.server("-q", "--replay-timing", "recorded")
        for srv, low, high in ((paced, 0.38, 3.0), (SERVER, 0.0, 0.2)):
            self.assertEqual(srv.request("POST", "/_control/rules?test=paced", rule)[0], 200)
            self.addCleanup(srv.request, "DELETE", "/_control/rules?test=paced")
            t0 = time.monotonic()
            st, _, data = srv.request("POST", "/v1/chat/completions", openai_chat("paced", True),
                                      dict(OA, **{"X-DP-Test-Id": "paced"}))
            took = time.monotonic() - t0
            self.assertEqual((st, data), (200, b"data: 0.0\n\ndata: 0.15\n\ndata: 0.3\n\n"))
            self.assertTrue(low <= took <= high, (low, took, high))

    def test_record_options_on_the_command_line(self):
        for args, named in ((["--upstream", "mistral=http://x"], "PROVIDER=URL"),
                            (["--upstream", "openai=ftp://x"], "http:// or https://"),
                            (["--upstream", "openai=http://user:pw@x"], "credentials"),
                            (["--replay-timing", "slow"], "recorded or fast"),
                            (["--record-redact", "("], "not a regular expression"),
                            (["--record-redact", ".*"], "empty text"),
                            (["--upstream-ca", "/nonexistent/ca.pem"], "no such file")):
            with self.subTest(args=args):
                r = run([PY, DPMOCK, "--foreground", "--port", "0"] + args, timeout=10)
                self.assertEqual(r.returncode, 2)
                lines = r.stderr.decode().strip().splitlines()
                self.assertEqual(len(lines), 1, lines)
                self.assertIn(named, lines[0])
        r = run([PY, DPMOCK, "record", "--port", "0"], timeout=10)
        self.assertEqual(r.returncode, 2)
        self.assertIn("record needs a folder", r.stderr.decode())
        config = dpmock.parse_args(["--record", self.dir, "--upstream", "openai=http://127.0.0.1:1/base/",
                                    "gemini=https://g.example", "--record-errors", "--replay-timing", "recorded"])
        self.assertEqual(config.upstreams["openai"], "http://127.0.0.1:1/base")
        again = dpmock.parse_args(config.to_argv())
        self.assertEqual((again.record, again.upstreams, again.record_errors, again.replay_timing),
                         (self.dir, config.upstreams, True, "recorded"))
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            self.assertTrue("## Record and replay" in f.read(), "README.md has no Record and replay section")
        self.assertIn("--record DIR", run([PY, DPMOCK, "--help"]).stdout.decode())


def responses_final(data, stream):
    """The response object of a /responses answer: the body, or a stream's response.completed event."""
    if not stream:
        return json.loads(data)
    for line in data.decode().splitlines():
        if line.startswith("data:") and '"response.completed"' in line:
            return json.loads(line[5:])["response"]
    raise AssertionError("no response.completed event in %r" % data[:300])
