"""Faults: provider errors, broken streams, broken connections, schedules, on every provider."""

import json
import os
import re
import socket
import tempfile
import time
import unittest

from dpmocklib.base import scenarios
import dpmock

from .support import (AN, ANTHROPIC_BODY, CURL, GE, GEMINI_BODY, GEMINI_GEN, GEMINI_STREAM, MIB, OA, SERVER,
    Server, chat_body, decode_chunks, post_raw, raw_request, recv_all, recv_until_reset, run, scen, split_response,
    sse_chunks, sse_events)


class FaultSelectionTest(unittest.TestCase):

    def test_parameters_by_header_and_by_key(self):
        st, hdrs, _ = SERVER.request("POST", "/v1/chat/completions", chat_body(),
                                     scen("RATE_LIMITED; retry_after=7"))
        self.assertEqual((st, hdrs["retry-after"], hdrs["retry-after-ms"]), (429, "7", "7000"))
        st, hdrs, _ = SERVER.request("POST", "/v1/chat/completions", chat_body(),
                                     {"Authorization": "Bearer RATE_LIMITED;retry_after=3"})
        self.assertEqual((st, hdrs["retry-after"]), (429, "3"))

    def test_bad_names_and_parameters_are_named(self):
        for spec, needle in (("NO_SUCH_FAULT", "NO_SUCH_FAULT"), ("STREAM_SLOW; tps=fast", "tps"),
                             ("STREAM_SLOW; speed=1", "speed"), ("STREAM_CUT; how=explode", "how"),
                             ("FAIL_FIRST; fault=FAIL_EVERY", "fault"), ("SEQUENCE; steps=OK,NOPE", "NOPE"),
                             ("STREAM_SLOW; tps", "tps")):
            with self.subTest(spec=spec):
                st, _, data = SERVER.request("POST", "/v1/chat/completions", chat_body(), scen(spec))
                self.assertEqual(st, 400)
                self.assertIn(needle, json.loads(data)["error"]["message"])
        st, _, data = SERVER.request("POST", "/v1/chat/completions", chat_body(),
                                     {"Authorization": "Bearer STREAM_SLOW; tps=fast"})
        self.assertEqual(st, 400)  # a key naming a scenario is held to the same rules

    def test_parameters_are_clamped_to_their_bounds(self):
        _, params = scenarios.resolve("STREAM_SLOW; ttft_ms=-5; tps=999999999")
        self.assertEqual(params, {"ttft_ms": 0, "tps": 100000})
        _, params = scenarios.resolve("HANG; ms=99999999")
        self.assertEqual(params["ms"], scenarios.MAX_WAIT_S * 1000)
        st, _, _ = SERVER.request("POST", "/v1/chat/completions", chat_body(True), scen("STREAM_SLOW; ttft_ms=-5"))
        self.assertEqual(st, 200)


class ProviderErrorFaultTest(unittest.TestCase):

    def test_shapes_by_provider(self):
        cases = [
            ("SERVER_ERROR", 500, 500, 500), ("OVERLOADED", 503, 529, 503), ("REQUEST_TIMEOUT", 408, 408, 408),
            ("TOO_LARGE", 413, 413, 413), ("RATE_LIMITED", 429, 429, 429)]
        for name, s_oa, s_an, s_ge in cases:
            with self.subTest(name=name):
                st, hdrs, data = SERVER.request("POST", "/v1/chat/completions", chat_body(), scen(name))
                err = json.loads(data)["error"]
                self.assertEqual((st, set(err)), (s_oa, {"message", "type", "param", "code"}))
                self.assertTrue(hdrs["x-request-id"].startswith("req_"))
                st, hdrs, data = SERVER.request("POST", "/v1/messages", json.dumps(ANTHROPIC_BODY).encode(),
                                                dict(AN, **{"X-DP-Scenario": name}))
                body = json.loads(data)
                self.assertEqual((st, body["type"]), (s_an, "error"))
                self.assertEqual(body["request_id"], hdrs["request-id"])
                st, _, data = SERVER.request("POST", GEMINI_GEN + "?key=g",
                                             json.dumps(GEMINI_BODY).encode(), {"X-DP-Scenario": name})
                self.assertEqual((st, json.loads(data)["error"]["code"]), (s_ge, s_ge))
        st, _, data = SERVER.request("POST", "/v1/messages", json.dumps(ANTHROPIC_BODY).encode(),
                                     dict(AN, **{"X-DP-Scenario": "OVERLOADED"}))
        self.assertEqual(json.loads(data)["error"]["type"], "overloaded_error")

    def test_rate_limit_headers_per_provider(self):
        _, hdrs, _ = SERVER.request("POST", "/v1/messages", json.dumps(ANTHROPIC_BODY).encode(),
                                    dict(AN, **{"X-DP-Scenario": "RATE_LIMITED; retry_after=5"}))
        self.assertEqual((hdrs["retry-after"], hdrs["anthropic-ratelimit-requests-remaining"]), ("5", "0"))
        _, _, data = SERVER.request("POST", GEMINI_GEN + "?key=g", json.dumps(GEMINI_BODY).encode(),
                                    {"X-DP-Scenario": "RATE_LIMITED; retry_after=5"})
        err = json.loads(data)["error"]
        self.assertEqual((err["status"], err["details"][0]["retryDelay"]), ("RESOURCE_EXHAUSTED", "5s"))
        _, hdrs, _ = SERVER.request("GET", "/v1/models", None, scen("RATE_LIMITED"))
        self.assertTrue(hdrs["x-ratelimit-remaining-requests"] == "0")

    def test_proxy_html_pages(self):
        for name, status in (("BAD_GATEWAY", 502), ("SERVICE_UNAVAILABLE", 503)):
            st, hdrs, data = SERVER.request("POST", "/v1/chat/completions", chat_body(), scen(name))
            self.assertEqual((st, hdrs["content-type"]), (status, "text/html; charset=utf-8"))
            self.assertIn(b"<h1>%d" % status, data)


class StreamFaultTest(unittest.TestCase):

    def stream(self, spec, path="/v1/chat/completions", body=None, headers=None):
        raw = post_raw(body or json.loads(chat_body(True)), path, dict(headers or OA, **{"X-DP-Scenario": spec}))
        return raw

    def test_openai_in_stream_error(self):
        raw = self.stream("STREAM_ERROR; after=2")
        hdrs, chunks = sse_chunks(raw)
        self.assertEqual(len(chunks), 3)
        self.assertEqual(json.loads(chunks[-1][6:])["error"]["type"], "server_error")
        self.assertEqual(hdrs["connection"], "close")

    def test_anthropic_in_stream_error(self):
        raw = self.stream("STREAM_ERROR; after=3", "/v1/messages", dict(ANTHROPIC_BODY, stream=True), AN)
        events = [sse_events(c)[0] for c in sse_chunks(raw)[1]]
        self.assertEqual([n for n, _ in events], ["message_start", "content_block_start", "ping", "error"])
        self.assertEqual(json.loads(events[-1][1])["error"]["type"], "overloaded_error")

    def test_gemini_in_stream_error_sse_and_array(self):
        path = GEMINI_STREAM + "?alt=sse&key=g"
        chunks = sse_chunks(self.stream("STREAM_ERROR; after=1", path, GEMINI_BODY, {}))[1]
        self.assertEqual(list(json.loads(chunks[-1][6:])), ["error"])
        raw = self.stream("STREAM_ERROR; after=1", GEMINI_STREAM + "?key=g", GEMINI_BODY, {})
        items = json.loads(split_response(raw)[2])
        self.assertEqual((len(items), items[-1]["error"]["status"]), (2, "INTERNAL"))

    def test_stream_slow_paces_events(self):
        t0 = time.monotonic()
        with socket.create_connection((SERVER.host, SERVER.port), timeout=10) as s:
            s.sendall(raw_request("/v1/chat/completions", scen("STREAM_SLOW; ttft_ms=300; tps=20"), chat_body(True)))
            first = s.recv(65536)
            t_head = time.monotonic() - t0
            rest = recv_all(s) if b"Connection: close" in first else b""
            buf = first
            while b"0\r\n\r\n" not in buf:
                piece = s.recv(65536)
                if not piece:
                    break
                buf += piece
        total = time.monotonic() - t0
        events = len(decode_chunks(buf.partition(b"\r\n\r\n")[2])[0]) + len(rest)
        self.assertGreaterEqual(total, 0.3 + (events - 2) / 20.0 - 0.05)
        self.assertLess(t_head, 0.3)  # headers at once, the first event after ttft

    def test_stream_not_streaming_request_is_unaffected(self):
        st, _, data = SERVER.request("POST", "/v1/chat/completions", chat_body(), scen("STREAM_CUT; events=0"))
        self.assertEqual((st, json.loads(data)["object"]), (200, "chat.completion"))

    def test_sse_split_breaks_events_inside_everything(self):
        raw = self.stream("SSE_SPLIT; every=3")
        hdrs, chunks = sse_chunks(raw)
        self.assertLessEqual(max(len(c) for c in chunks), 3)
        events = [e for e in b"".join(chunks).decode("utf-8").split("\n\n") if e]
        text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events
                       if e != "data: [DONE]")
        self.assertTrue(text.startswith("dpmock ünïcödé ✓ 😀 "), text)
        with self.assertRaises(UnicodeDecodeError):  # some piece ends inside a multi-byte character
            for c in chunks:
                c.decode("utf-8")
        _, chunks = sse_chunks(self.stream("SSE_SPLIT; at=3,5"))  # inside "data: ", then the rest
        self.assertEqual(chunks[:2], [b"dat", b"a:"])
        self.assertTrue(all(b"".join(chunks[i:i + 3]).startswith(b"data: ") for i in range(0, len(chunks), 3)))
        st, _, data = SERVER.request("POST", "/v1/chat/completions", chat_body(True), scen("SSE_SPLIT; at=x"))
        self.assertEqual(st, 400)

    def test_line_endings_and_comments(self):
        for eol, sep in (("crlf", b"\r\n\r\n"), ("cr", b"\r\r"), ("lf", b"\n\n")):
            with self.subTest(eol=eol):
                _, chunks = sse_chunks(self.stream("SSE_LINE_ENDINGS; eol=" + eol, "/v1/messages",
                                                   dict(ANTHROPIC_BODY, stream=True), AN))
                self.assertTrue(all(c.endswith(sep) for c in chunks))
                self.assertEqual(chunks[0].count(b"\n"), 0 if eol == "cr" else 3)  # event, data, blank
        _, chunks = sse_chunks(self.stream("SSE_COMMENTS"))
        self.assertTrue(all(c.startswith(b": dpmock comment") and c.endswith(b":\n\n") for c in chunks))

    def test_big_event_and_many_events(self):
        _, chunks = sse_chunks(self.stream("SSE_BIG_EVENT"))
        big = max(chunks, key=len)
        self.assertGreater(len(big), 64 * 1024)
        self.assertEqual(big.count(b"\n"), 2)  # still one event on one data line
        _, chunks = sse_chunks(self.stream("SSE_MANY_EVENTS; n=10000"))
        self.assertEqual(len(chunks), 10000 + 3)  # role chunk, 10,000 one-character events, finish, [DONE]

    def test_stream_without_end_marker(self):
        _, chunks = sse_chunks(self.stream("STREAM_NO_END"))
        self.assertNotIn(b"data: [DONE]\n\n", chunks)
        self.assertEqual(json.loads(chunks[-1][6:])["choices"][0]["finish_reason"], "stop")
        events = [sse_events(c)[0][0] for c in sse_chunks(self.stream(
            "STREAM_NO_END", "/v1/messages", dict(ANTHROPIC_BODY, stream=True), AN))[1]]
        self.assertEqual(events[-1], "message_delta")

    def test_invalid_json_and_html_200(self):
        st, _, data = SERVER.request("POST", "/v1/chat/completions", chat_body(), scen("INVALID_JSON_200"))
        self.assertEqual(st, 200)
        with self.assertRaises(ValueError):
            json.loads(data)
        _, chunks = sse_chunks(self.stream("INVALID_JSON_200"))
        with self.assertRaises(ValueError):
            json.loads(chunks[1][6:])
        st, hdrs, data = SERVER.request("POST", "/v1/chat/completions", chat_body(True), scen("HTML_200"))
        self.assertEqual((st, hdrs["content-type"], data[:6]), (200, "text/html; charset=utf-8", b"<html>"))

    def test_stream_fault_beyond_the_stream_fires_at_its_end(self):
        raw = post_raw(json.loads(chat_body(True)), "/v1/chat/completions",
                       dict(OA, **{"X-DP-Scenario": "STREAM_CUT; events=100"}))
        self.assertFalse(raw.endswith(b"0\r\n\r\n"))  # cut: no final chunk


class ConnectionFaultTest(unittest.TestCase):
    """Every way a connection ends, as the raw bytes show it."""

    def raw(self, spec, body=None, stream=False, timeout=5):
        return SERVER.raw(raw_request("/v1/chat/completions", scen(spec), body or chat_body(stream)), timeout)

    def test_empty_reply(self):
        self.assertEqual(self.raw("EMPTY_REPLY"), b"")

    def test_reset(self):
        with socket.create_connection((SERVER.host, SERVER.port), timeout=5) as s:
            s.sendall(raw_request("/v1/chat/completions", scen("RESET; after_bytes=20"), chat_body()))
            got = recv_until_reset(s)
        self.assertEqual(got, b"HTTP/1.1 200 OK\r\nDat")

    def test_short_body_no_final_chunk_bad_chunk(self):
        raw = self.raw("SHORT_BODY; missing=10")
        head, _, body = raw.partition(b"\r\n\r\n")
        declared = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        self.assertEqual(declared, len(body) + 10)
        raw = self.raw("NO_FINAL_CHUNK")
        self.assertIn(b"Transfer-Encoding: chunked", raw)
        self.assertFalse(raw.endswith(b"0\r\n\r\n"))
        self.assertTrue(raw.endswith(b"}\r\n"))
        raw = self.raw("BAD_CHUNK_SIZE")
        self.assertIn(b"\r\n\r\nzz\r\n", raw)

    def test_half_close_keeps_reading(self):
        with socket.create_connection((SERVER.host, SERVER.port), timeout=5) as s:
            s.sendall(raw_request("/v1/chat/completions", scen("HALF_CLOSE"), chat_body()))
            got = recv_all(s)  # EOF arrives: the server's sending side is shut
            head, _, body = got.partition(b"\r\n\r\n")
            declared = int(re.search(rb"Content-Length: (\d+)", head).group(1))
            self.assertEqual(len(body), declared // 2)
            s.sendall(b"still connected")  # the server still reads: no reset
            time.sleep(0.1)
            s.sendall(b"!")
            s.shutdown(socket.SHUT_WR)  # now the server sees our EOF and closes: a clean end, not a reset
            self.assertEqual(s.recv(1), b"")

    def test_hang_and_headers_stall_are_bounded(self):
        t0 = time.monotonic()
        self.assertEqual(self.raw("HANG; ms=300"), b"")
        self.assertGreaterEqual(time.monotonic() - t0, 0.3)
        t0 = time.monotonic()
        raw = self.raw("HEADERS_STALL; ms=300")
        self.assertGreaterEqual(time.monotonic() - t0, 0.3)
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200") and body == b"")

    def test_stream_stall_and_cut(self):
        t0 = time.monotonic()
        raw = self.raw("STREAM_STALL; after=1; ms=300", stream=True)
        self.assertGreaterEqual(time.monotonic() - t0, 0.3)
        self.assertEqual(len(decode_chunks(raw.partition(b"\r\n\r\n")[2], strict=False)[0]), 1)
        raw = self.raw("STREAM_CUT; events=3", stream=True)
        self.assertEqual(len(decode_chunks(raw.partition(b"\r\n\r\n")[2], strict=False)[0]), 3)
        raw = self.raw("STREAM_CUT; bytes=300", stream=True)
        self.assertEqual(len(raw), 300)
        with socket.create_connection((SERVER.host, SERVER.port), timeout=5) as s:
            s.sendall(raw_request("/v1/chat/completions", scen("STREAM_CUT; events=1; how=reset"), chat_body(True)))
            with self.assertRaises(ConnectionResetError):
                while s.recv(65536):
                    pass

    def test_slow_body_dribbles(self):
        arrivals, raw, want = [], b"", None
        with socket.create_connection((SERVER.host, SERVER.port), timeout=5) as s:
            s.sendall(raw_request("/v1/chat/completions", scen("SLOW_BODY; bytes=100; interval_ms=30"), chat_body()))
            while want is None or len(raw) < want:  # read exactly the answer: no wait for a close hides the pace
                piece = s.recv(65536)
                self.assertTrue(piece, "closed before the whole answer arrived")
                arrivals.append(time.monotonic())
                raw += piece
                head, sep, _ = raw.partition(b"\r\n\r\n")
                if sep and want is None:
                    want = len(head) + 4 + int(re.search(rb"Content-Length: (\d+)", head).group(1))
        st, _, body, _ = split_response(raw)
        self.assertEqual((st, json.loads(body)["object"]), (200, "chat.completion"))
        self.assertGreaterEqual(len(arrivals), len(raw) // 100 - 1)  # in pieces of at most 100 bytes...
        spread = arrivals[-1] - arrivals[0]
        self.assertGreaterEqual(spread, (len(raw) // 100 - 1) * 0.03 * 0.8)  # ...30 ms apart
        self.assertLess(spread, (len(raw) // 100 + 1) * 0.03 + 1.0)  # and nothing else waited

    def test_server_keeps_serving_and_stops_promptly_during_a_hang(self):
        srv = Server()
        self.addCleanup(srv.stop)
        s = socket.create_connection((srv.host, srv.port), timeout=10)
        self.addCleanup(s.close)
        s.sendall(raw_request("/v1/chat/completions", scen("HANG; ms=60000"), chat_body()))
        time.sleep(0.2)
        self.assertEqual(srv.request("GET", "/_control/status")[0], 200)
        t0 = time.monotonic()
        self.assertEqual(srv.stop(), 0)
        self.assertLess(time.monotonic() - t0, 3)


class ExpectFaultTest(unittest.TestCase):

    def test_reject_without_reading(self):
        with socket.create_connection((SERVER.host, SERVER.port), timeout=5) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                      b"X-DP-Scenario: EXPECT_REJECT; status=401\r\nContent-Length: 1000000\r\n"
                      b"Expect: 100-continue\r\n\r\n")
            st, hdrs, body, rest = split_response(recv_all(s))
        self.assertEqual((st, hdrs["connection"], rest), (401, "close", b""))
        self.assertIn("EXPECT_REJECT", json.loads(body)["error"]["message"])

    def test_ignore_sends_no_100(self):
        with socket.create_connection((SERVER.host, SERVER.port), timeout=5) as s:
            body = chat_body()
            head = raw_request("/v1/chat/completions", scen("EXPECT_IGNORE", Expect="100-continue"), body)
            s.sendall(head[:-len(body)])  # headers only: the body waits for a 100 Continue
            s.settimeout(0.4)
            with self.assertRaises(socket.timeout):  # no 100 Continue comes
                s.recv(100)
            s.settimeout(5)
            s.sendall(chat_body())
            buf = b""
            while not buf.endswith(b"}"):
                buf += s.recv(65536)
        st, _, body, _ = split_response(buf)
        self.assertEqual((st, json.loads(body)["object"]), (200, "chat.completion"))


class ScheduleTest(unittest.TestCase):

    def statuses(self, spec, n, key="sk-sched"):
        key = "%s-%s" % (key, os.urandom(4).hex())
        return [SERVER.request("POST", "/v1/chat/completions", chat_body(),
                               {"Authorization": "Bearer " + key, "X-DP-Scenario": spec})[0] for _ in range(n)]

    def test_fail_first_then_succeed_per_key(self):
        self.assertEqual(self.statuses("FAIL_FIRST; n=2; fault=RATE_LIMITED", 4), [429, 429, 200, 200])

    def test_a_schedule_passes_on_its_faults_parameters_on_every_provider(self):
        spec = "FAIL_FIRST; n=1; fault=RATE_LIMITED; retry_after=0"
        for path, headers, body in (("/v1/chat/completions", OA, chat_body()),
                                    ("/v1/messages", AN, json.dumps(ANTHROPIC_BODY).encode()),
                                    (GEMINI_GEN, GE, json.dumps(GEMINI_BODY).encode())):
            with self.subTest(path):
                h = dict(headers, **{"X-DP-Scenario": spec, "X-DP-Test-Id": "sched-" + os.urandom(4).hex()})
                st, hdrs, out = SERVER.request("POST", path, body, h)
                wait = hdrs.get("retry-after") if path != GEMINI_GEN else \
                    json.loads(out)["error"]["details"][0]["retryDelay"]  # Gemini says it in a RetryInfo
                self.assertEqual((st, wait), (429, "0" if path != GEMINI_GEN else "0s"))
                self.assertEqual(SERVER.request("POST", path, body, h)[0], 200)
        for bad, named in (("FAIL_FIRST; fault=RATE_LIMITED; retry_aftr=0", "retry_aftr"),
                           ("FAIL_FIRST; fault=RATE_LIMITED; retry_after=soon", "retry_after"),
                           ("SEQUENCE; steps=RATE_LIMITED,OK; ms=5", "'ms'")):
            st, _, out = SERVER.request("POST", "/v1/chat/completions", chat_body(),
                                        dict(OA, **{"X-DP-Scenario": bad}))
            self.assertEqual(st, 400, bad)
            self.assertIn(named, json.loads(out)["error"]["message"])

    def test_an_empty_scenario_header_is_no_scenario(self):
        for value in ("", "  "):
            st, _, out = SERVER.request("POST", "/v1/chat/completions", chat_body(),
                                        dict(OA, **{"X-DP-Scenario": value}))
            self.assertEqual(st, 200, out)
            self.assertIn("choices", json.loads(out))

    def test_fail_every_and_sequence(self):
        self.assertEqual(self.statuses("FAIL_EVERY; k=3; fault=SERVER_ERROR", 6), [200, 200, 500, 200, 200, 500])
        self.assertEqual(self.statuses("SEQUENCE; steps=SERVER_ERROR,OK,RATE_LIMITED", 5), [500, 200, 429, 200, 200])

    def test_random_is_reproducible_and_echoes_its_seed(self):
        runs = [self.statuses("FAIL_RANDOM; p=0.5; seed=42; fault=SERVER_ERROR", 20) for _ in range(2)]
        self.assertEqual(runs[0], runs[1])
        self.assertEqual(set(runs[0]), {200, 500})
        _, hdrs, _ = SERVER.request("POST", "/v1/chat/completions", chat_body(),
                                    scen("FAIL_RANDOM; p=0.5; seed=42; fault=SERVER_ERROR"))
        self.assertEqual(hdrs["x-dp-seed"], "42")

    def test_counters_listed_and_reset(self):
        srv = Server()
        self.addCleanup(srv.stop)
        for _ in range(3):
            srv.request("POST", "/v1/chat/completions", chat_body(),
                        {"Authorization": "Bearer sk-listed-key", "X-DP-Scenario": "FAIL_FIRST; n=1"})
        counters = json.loads(srv.request("GET", "/_control/schedules")[2])["counters"]
        self.assertEqual([(c["key"], c["scenario"], c["requests"]) for c in counters],
                         [(dpmock.mask_key("sk-listed-key"), "FAIL_FIRST; n=1", 3)])
        r = json.loads(srv.request("POST", "/_control/reset")[2])
        self.assertEqual(r["cleared_counters"], 1)
        self.assertEqual(json.loads(srv.request("GET", "/_control/schedules")[2])["counters"], [])
        st = srv.request("POST", "/v1/chat/completions", chat_body(),
                         {"Authorization": "Bearer sk-listed-key", "X-DP-Scenario": "FAIL_FIRST; n=1"})[0]
        self.assertEqual(st, 500)  # counting starts again


@unittest.skipUnless(CURL, "curl is not installed")
class CurlFaultTest(unittest.TestCase):
    """The exit code and error curl (the C library's client) gives for each broken connection."""

    def curl(self, spec, *extra):
        r = run([CURL, "-sS", "-o", "/dev/null", "-H", "Authorization: Bearer sk-test", "-H", "X-DP-Scenario: " + spec,
                 "-H", "Content-Type: application/json", "--data-binary", chat_body(stream="stream" in extra).decode()]
                + [e for e in extra if e != "stream"] + [SERVER.url + "/v1/chat/completions"], timeout=30)
        return r.returncode, r.stderr.decode()

    def test_exit_codes(self):
        with tempfile.NamedTemporaryFile() as f:  # an upload whose body the handler would stream
            f.write(b"x" * (3 * MIB))
            f.flush()
            r = run([CURL, "-sS", "-o", "/dev/null", "-H", "Authorization: Bearer k",
                     "-H", "X-DP-Scenario: EMPTY_REPLY", "--data-binary", "@" + f.name,
                     SERVER.url + "/v1/files:upload"])
            self.assertEqual(r.returncode, 52, r.stderr)
        cases = [("EMPTY_REPLY", (), 52, "Empty reply"), ("RESET", (), 56, "reset"),
                 ("SHORT_BODY", (), 18, ""), ("NO_FINAL_CHUNK", (), 18, ""), ("HALF_CLOSE", (), 18, ""),
                 ("HEADERS_STALL; ms=200", (), 18, ""), ("STREAM_CUT; events=2", ("stream",), 18, ""),
                 ("STREAM_CUT; events=2; how=reset", ("stream",), 56, ""), ("STREAM_STALL; after=1; ms=200",
                                                                           ("stream",), 18, ""),
                 ("BAD_CHUNK_SIZE", (), 56, "chunk"), ("HANG; ms=60000", ("--max-time", "1"), 28, "imed out")]
        for spec, extra, code, needle in cases:
            with self.subTest(spec=spec):
                rc, err = self.curl(spec, *extra)
                self.assertEqual(rc, code, err)
                self.assertIn(needle, err)

    def test_slow_stream_completes(self):
        rc, err = self.curl("STREAM_SLOW; ttft_ms=100; tps=100", "stream")
        self.assertEqual(rc, 0, err)

    def test_expect_reject_and_ignore(self):
        with tempfile.NamedTemporaryFile() as f:
            f.write(chat_body() + b" " * (2 * MIB))
            f.flush()
            base = [CURL, "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", "-H", "Authorization: Bearer k",
                    "-H", "Expect: 100-continue", "--data-binary", "@" + f.name]
            r = run(base + ["-H", "X-DP-Scenario: EXPECT_REJECT; status=413", SERVER.url + "/v1/chat/completions"])
            code, total = r.stdout.decode().split()
            self.assertEqual((r.returncode, code), (0, "413"))
            self.assertLess(float(total), 0.9)  # answered before curl's 1 s Expect wait
            r = run(base + ["-H", "X-DP-Scenario: EXPECT_IGNORE", SERVER.url + "/v1/chat/completions"])
            code, total = r.stdout.decode().split()
            self.assertEqual((r.returncode, code), (0, "200"))
            self.assertGreaterEqual(float(total), 0.9)  # curl waited for a 100 that never came
