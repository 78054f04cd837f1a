"""The Flask mock's contract (the C library's scenario keys and answers), kept byte for byte."""

import json
import unittest

from dpmocklib.base import Stream
from dpmocklib.base import Upload
from dpmocklib.base import scenarios
import dpmock

from .support import (CHAT, ROUTE_PATHS, SERVER, decode_chunks, key_headers, provider_of_route, split_response,
    sse_events)


class ContractTest(unittest.TestCase):
    """Every scenario answers exactly as the Flask mock did, on every route it covers and every prefix."""

    def test_every_scenario_route_and_prefix(self):
        for name in [n for n in scenarios.names() if scenarios.get(n).group == "contract"]:
            for route, value in scenarios.get(name).routes.items():
                method, path = ROUTE_PATHS[route]
                for prefix in dpmock.PREFIXES:
                    body = None if method == "GET" else (b"hello" if route in ("files", "gemini_upload") else b"{}")
                    headers = key_headers(route, name)
                    with self.subTest(route=route, prefix=prefix, scenario=name):
                        status, hdrs, data = SERVER.request(method, prefix + path, body, headers)
                        want = value.get(provider_of_route(route, headers, prefix)) \
                            if isinstance(value, scenarios.ByProvider) else value
                        if isinstance(want, Upload):
                            want = scenarios.upload_reply(want, len(body))
                        if isinstance(want, Stream):
                            self.assertEqual(status, 200)
                            self.assertEqual(hdrs["content-type"], "text/event-stream; charset=utf-8")
                            self.assertEqual(hdrs["transfer-encoding"], "chunked")
                            got = sse_events(data)
                            self.assertEqual([e for e, _ in got][:len(want.events)], [e.event for e in want.events])
                        else:
                            self.assertEqual(status, want.status)
                            self.assertEqual(hdrs["content-type"], want.content_type)
                            for k, v in want.headers:
                                self.assertEqual(hdrs[k.lower()], v)
                            if isinstance(want.body, str):
                                self.assertEqual(data.decode(), want.body)
                            else:
                                self.assertEqual(json.loads(data), want.body)

    def test_scenario_key_on_an_uncovered_route_is_an_ordinary_key(self):
        st, _, data = SERVER.request("POST", "/v1/chat/completions", CHAT, {"Authorization": "Bearer EMPTY_LIST"})
        self.assertEqual((st, json.loads(data)["object"]), (200, "chat.completion"))
        st, _, data = SERVER.request("GET", "/v1/models", None, {"Authorization": "Bearer RATE_LIMIT_COMPLETION"})
        self.assertEqual((st, json.loads(data)["object"]), (200, "list"))

    def test_exact_contract_bytes(self):
        cases = [
            ("POST", "/chat/completions", {"Authorization": "Bearer RATE_LIMIT_COMPLETION"}, b"{}", 429,
             b'{"error": {"message": "Rate limit exceeded", "type": "rate_limit_error", "code": 429}}'),
            ("POST", "/v1/chat/completions", {"Authorization": "Bearer NON_JSON_ERROR"}, b"{}", 500,
             b"<html><body><h1>500 Internal Server Error</h1></body></html>"),
            ("POST", "/v1/models/gemini-pro:generateContent?key=AUTH_FAILURE_GEMINI", {}, b"{}", 401,
             b'{"error": {"message": "Invalid Authentication", "code": 401}}'),
            ("GET", "/models", {"x-api-key": "AUTH_FAILURE_ANTHROPIC"}, None, 401,
             b'{"type": "error", "message": "Authentication Error"}'),
            ("GET", "/v1/models", {"Authorization": "Bearer EMPTY_LIST"}, None, 200,
             b'{"object": "list", "data": []}'),
            ("POST", "/chat/completions", {"X-DP-Scenario": "NO_SCENARIO"}, b"{}", 400,
             b'{"error": "No test scenario triggered in mock server"}'),
            ("POST", "/v1/files:upload?key=ZERO_BYTE_FILE", {}, b"", 400,
             b'{"error": {"message": "File is empty", "code": 400}}'),
            ("POST", "/files", {"Authorization": "Bearer ZERO_BYTE_FILE"}, b"abc", 200,
             b'{"id": "file-123", "filename": "test_file.txt", "purpose": "fine-tune", "bytes": 3}'),
        ]
        for method, path, headers, body, status, want in cases:
            with self.subTest(path=path, headers=headers):
                got_status, hdrs, data = SERVER.request(method, path, body, headers)
                self.assertEqual((got_status, data), (status, want))
                self.assertEqual(hdrs["content-length"], str(len(want)))

    def test_key_lookup_order(self):
        chat = "/v1/chat/completions"
        # Authorization wins over x-api-key and ?key= (as upstream).
        st, _, _ = SERVER.request("POST", chat + "?key=NON_JSON_ERROR", b"{}", {
            "Authorization": "Bearer RATE_LIMIT_COMPLETION", "x-api-key": "AUTH_FAILURE_OPENAI"})
        self.assertEqual(st, 429)
        st, _, _ = SERVER.request("POST", chat + "?key=NON_JSON_ERROR", b"{}", {"x-api-key": "AUTH_FAILURE_OPENAI"})
        self.assertEqual(st, 401)
        st, _, _ = SERVER.request("POST", chat, b"{}", {"x-goog-api-key": "RATE_LIMIT_COMPLETION"})
        self.assertEqual(st, 429)
        st, _, _ = SERVER.request("POST", chat + "?key=NON_JSON_ERROR", b"{}")
        self.assertEqual(st, 500)
        # X-DP-Scenario wins over every key.
        st, _, _ = SERVER.request("POST", chat, b"{}", {"Authorization": "Bearer AUTH_FAILURE_OPENAI",
                                                        "X-DP-Scenario": "RATE_LIMIT_COMPLETION"})
        self.assertEqual(st, 429)
        # Anthropic routes: x-api-key first, and Bearer as the current SDKs send it.
        st, _, _ = SERVER.request("POST", "/v1/messages", b"{}", {"x-api-key": "AUTH_FAILURE_ANTHROPIC",
                                                                  "Authorization": "Bearer x"})
        self.assertEqual(st, 401)
        st, _, _ = SERVER.request("POST", "/v1/messages", b"{}", {"Authorization": "Bearer AUTH_FAILURE_ANTHROPIC"})
        self.assertEqual(st, 401)

    def test_unknown_x_dp_scenario_is_named(self):
        st, _, data = SERVER.request("POST", "/chat/completions", b"{}", {"X-DP-Scenario": "NO_SUCH_THING"})
        self.assertEqual(st, 400)
        self.assertIn("NO_SUCH_THING", json.loads(data)["error"]["message"])

    def test_abrupt_stream_bytes(self):
        raw = SERVER.raw(b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ABRUPT_STREAM\r\n"
                         b"Content-Length: 2\r\n\r\n{}")
        status, hdrs, body, rest = split_response(raw)  # strict dechunk: the body itself ends cleanly
        self.assertEqual(status, 200)
        self.assertEqual(hdrs["connection"], "close")
        self.assertEqual(rest, b"")  # and the server closed right after the final chunk
        parts = decode_chunks(raw.partition(b"\r\n\r\n")[2])[0]
        self.assertEqual(len(parts), 2)
        first = parts[0].decode()
        self.assertTrue(first.startswith("data: ") and first.endswith("\n\n"))
        self.assertEqual(json.loads(first[6:])["choices"][0]["delta"]["role"], "assistant")
        self.assertEqual(parts[1], b'data: {"id":"truncated_chunk", "content":"partial')

    def test_anthropic_streams_carry_both_shapes(self):
        _, _, data = SERVER.request("POST", "/v1/messages", b"{}", {"x-api-key": "STREAM_ERROR_ANTHROPIC"})
        events = sse_events(data)
        self.assertEqual([e for e, _ in events], ["message_start", "content_block_start", "content_block_delta",
                                                   "error"])
        for name, payload in events:
            self.assertEqual(json.loads(payload)["type"], name)
        err = json.loads(events[-1][1])
        self.assertEqual(err["message"], "Simulated mid-stream error.")
        self.assertEqual(err["error"]["message"], "Simulated mid-stream error.")
        _, _, data = SERVER.request("POST", "/messages", b"{}", {"x-api-key": "STREAM_PING_ANTHROPIC"})
        events = sse_events(data)
        self.assertEqual([e for e, _ in events], [
            "message_start", "content_block_start", "content_block_delta", "ping", "content_block_delta",
            "message_delta", "message_stop"])
        delta = json.loads(events[5][1])
        self.assertEqual((delta["stop_reason"], delta["delta"]["stop_reason"], delta["usage"]["output_tokens"]),
                         ("end_turn", "end_turn", 2))

    def test_each_sse_event_is_its_own_chunk(self):
        raw = SERVER.raw(b"POST /messages HTTP/1.1\r\nHost: x\r\nx-api-key: STREAM_PING_ANTHROPIC\r\n"
                         b"Connection: close\r\nContent-Length: 2\r\n\r\n{}")
        parts = decode_chunks(raw.partition(b"\r\n\r\n")[2])[0]
        self.assertEqual(len(parts), 7)
        for p in parts:
            self.assertTrue(p.startswith(b"event: ") and p.endswith(b"\n\n"), p)
