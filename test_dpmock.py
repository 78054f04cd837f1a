#!/usr/bin/env python3
"""dpmock tests: standard-library unittest, over real sockets, against real server processes.

Every server is started on port 0 and stopped by the test that started it, even on failure.
Run: python3 test_dpmock.py (ends with one line "N passed, N failed, N skipped").
"""

import base64
import copy
import http.client
import importlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import struct
import tempfile
import textwrap
import threading
import time
import typing
import unittest
from http.server import BaseHTTPRequestHandler, HTTPServer

import dpmock
from dpmocklib.base import scenarios
from dpmock import cosine, embedding, embedding_b64, schema_instance



def _optional(name):
    """An optional package, loaded by name (the project imports none): None when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


#: When installed (the CI venv has them), generated instances are validated with these.
jsonschema, pydantic = _optional("jsonschema"), _optional("pydantic")
from dpmocklib.base import Reply, Stream, Upload

HERE = os.path.dirname(os.path.abspath(__file__))
DPMOCK = os.path.join(HERE, "dpmock.py")
DPMOCKCTL = os.path.join(HERE, "dpmockctl.py")
PY = sys.executable
CURL = shutil.which("curl")
MIB = 1024 * 1024


# ----------------------------------------------------------------------------- helpers

class Server:
    """A dpmock process in the foreground on a free port; stop() always reaps it."""

    def __init__(self, *args, logfile=None, sub=()):
        self.logfile = logfile
        cmd = [PY, DPMOCK] + list(sub) + ["--foreground", "--port", "0"] + list(args)  # sub: ("record", DIR)
        if logfile:
            cmd += ["--logfile", logfile]
        # stderr (the access log) goes to a file: an unread pipe would fill up and block the server
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr, cwd=HERE)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("DP_MOCK_SERVER="):
            self.stop()
            raise RuntimeError("dpmock did not start: %r %r" % (line, self.errors()))
        self.url = line.strip().split("=", 1)[1]
        self.host, port = self.url[len("http://"):].rsplit(":", 1)
        self.port = int(port)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        if not self.stderr.closed:
            self.stderr_text = self.errors()
            self.stderr.close()
        return self.proc.returncode

    def errors(self):
        """What the server wrote to stderr so far."""
        if self.stderr.closed:
            return self.stderr_text
        self.stderr.seek(0)
        return self.stderr.read()

    def conn(self, timeout=10):
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, timeout=10):
        """One request on a fresh connection; returns (status, headers dict lowercased, body bytes)."""
        c = self.conn(timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def raw(self, data, timeout=5):
        """Send raw bytes, return everything the server sends until it closes (or the timeout)."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as s:
            s.sendall(data)
            return recv_all(s)


def raw_request(path, headers, body=b"", method="POST", close=False):
    """The bytes of one request (a dict body is sent as JSON), for raw sockets."""
    body = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    head = "%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s" % (
        method, path, len(body), "Connection: close\r\n" if close else "")
    head += "".join("%s: %s\r\n" % kv for kv in headers.items())
    return head.encode() + b"\r\n" + body


def recv_all(sock):
    chunks = []
    try:
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            chunks.append(piece)
    except socket.timeout:
        pass
    return b"".join(chunks)


def split_response(raw):
    """Split one raw HTTP response into (status, headers dict, body bytes as framed, rest)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        parts, rest = decode_chunks(rest)
        body = b"".join(parts)
    else:
        n = int(headers.get("content-length", "0"))
        body, rest = rest[:n], rest[n:]
    return status, headers, body, rest


def decode_chunks(data, strict=True):
    """The chunk payloads of a chunked body, and the bytes after its final chunk.

    ``strict`` asserts the framing (size lines, CRLFs, the final chunk); otherwise decoding
    stops quietly where a cut-off body ends.
    """
    out = []
    while True:
        line, sep, rest = data.partition(b"\r\n")
        if not strict and (not sep or not line):
            return out, b""
        assert sep, "chunk size line not terminated"
        size = int(line, 16)
        if size == 0:
            if strict:
                assert rest.startswith(b"\r\n"), "final chunk not followed by CRLF"
            return out, rest[2:]
        if not strict and len(rest) < size:
            return out, b""
        out.append(rest[:size])
        if strict:
            assert rest[size:size + 2] == b"\r\n", "chunk not followed by CRLF"
        data = rest[size + 2:]


def sse_events(payload):
    """Parse SSE text into a list of (event name or None, data string)."""
    events = []
    for block in payload.decode().split("\n\n"):
        if not block.strip():
            continue
        name, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        events.append((name, data))
    return events


def run(cmd, timeout=30, **kw):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_gone(pid, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def kill_pidfile(path):
    """Cleanup for daemons: SIGKILL whatever pid the file names, if it is still alive."""
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return
    if pid > 0:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


ROUTE_PATHS = {
    "chat": ("POST", "/chat/completions"),
    "images": ("POST", "/images/generations"),
    "files": ("POST", "/files"),
    "messages": ("POST", "/messages"),
    "messages_count_tokens": ("POST", "/messages/count_tokens"),
    "gemini_generate": ("POST", "/models/gemini-2.5-flash:generateContent"),
    "gemini_stream": ("POST", "/models/gemini-2.5-flash:streamGenerateContent"),
    "gemini_count_tokens": ("POST", "/models/gemini-2.5-flash:countTokens"),
    "gemini_predict": ("POST", "/models/imagen-4.0-generate-001:predict"),
    "gemini_upload": ("POST", "/files:upload"),
    "models": ("GET", "/models"),
    "models_get": ("GET", "/models/gpt-4o"),
}

ANTHROPIC_ROUTES = ("messages", "messages_count_tokens")
GEMINI_ROUTES = ("gemini_generate", "gemini_stream", "gemini_count_tokens", "gemini_predict", "gemini_upload")


def key_headers(route, key):
    """Put the key where the C library puts it for that provider."""
    if route in ANTHROPIC_ROUTES:
        return {"x-api-key": key, "anthropic-version": "2023-06-01"}
    return {"Authorization": "Bearer " + key}


def provider_of_route(route, headers, prefix):
    if route in ANTHROPIC_ROUTES or "x-api-key" in headers:
        return "anthropic"
    if route in GEMINI_ROUTES or prefix == "/v1beta":
        return "gemini"
    return "openai"


CHAT = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi there"}]}).encode()
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"},
                                                   "unit": {"type": "string", "enum": ["C", "F"]}},
                  "required": ["city"]}


def post_raw(body, path, headers):
    """POST over a raw socket with Connection: close; returns the whole raw response."""
    return SERVER.raw(raw_request(path, headers, body, close=True))


def sse_chunks(raw):
    """(headers, [chunk payloads]) of a raw chunked SSE response; asserts the framing."""
    status, hdrs, _, rest = split_response(raw)
    assert status == 200, raw[:300]
    assert rest == b"", "bytes after the final chunk"
    return hdrs, decode_chunks(raw.partition(b"\r\n\r\n")[2])[0]


def jpost(path, body, headers):
    st, hdrs, data = SERVER.request("POST", path, body, headers)
    return st, hdrs, json.loads(data)


def responses_events(raw):
    """[(event name, data object)] of a raw Responses stream; asserts the framing of every event."""
    out = []
    for c in sse_chunks(raw)[1]:
        text = c.decode()
        assert text.startswith("event: ") and text.endswith("\n\n") and text.count("\n") == 3, text[:200]
        name, data = sse_events(c)[0]
        out.append((name, json.loads(data)))
    return out


OA = {"Authorization": "Bearer sk-test"}
AN = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}
GE = {"x-goog-api-key": "g-test"}
CA = os.path.join(HERE, "certs", "ca.pem")


def chat_body(stream=False):
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi there"}]}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def scen(spec, **extra):
    return dict({"Authorization": "Bearer sk-test", "X-DP-Scenario": spec}, **extra)


def tls_port(srv):
    urls = json.loads(srv.request("GET", "/_control/status")[2])["urls"]
    return int(next(u for u in urls if u.startswith("https:")).rsplit(":", 1)[1])


def _sandbox_available():
    if not sys.platform.startswith("linux") or not shutil.which("unshare"):
        return False
    flags = ["--mount", "--net", "--fork"] + ([] if os.geteuid() == 0 else ["--user", "--map-root-user"])
    return subprocess.run(["unshare"] + flags + ["true"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def _have(module):
    """Whether an optional SDK is installed (loaded by name: the project itself imports none)."""
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


SERVER = None


def setUpModule():
    global SERVER
    SERVER = Server("-q")


def tearDownModule():
    if SERVER:
        SERVER.stop()


# ----------------------------------------------------------------------------- contract

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


# ----------------------------------------------------------------------------- provider success paths (stdlib)

class OpenAIRoutesTest(unittest.TestCase):

    def test_chat_text(self):
        st, hdrs, r = jpost("/v1/chat/completions", {"model": "gpt-4o", "messages": [
            {"role": "system", "content": "Be brief"}, {"role": "user", "content": [
                {"type": "text", "text": "Hi   there"}, {"type": "image_url", "image_url": {"url": "x"}}]}]}, OA)
        self.assertEqual(st, 200)
        self.assertTrue(hdrs["x-request-id"].startswith("req_"))
        self.assertTrue(r["id"].startswith("chatcmpl-"))
        self.assertEqual(r["object"], "chat.completion")
        msg = r["choices"][0]["message"]
        self.assertEqual((msg["role"], msg["content"], r["choices"][0]["finish_reason"]),
                         ("assistant", "dpmock reply to: Hi there", "stop"))
        # 2 + 2 words of prompt + one image; 5 words of answer
        self.assertEqual((r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"], r["usage"]["total_tokens"]),
                         (4 + dpmock.MEDIA_TOKENS, 5, 9 + dpmock.MEDIA_TOKENS))

    def test_ids_are_unique(self):
        ids = {jpost("/v1/chat/completions", json.loads(CHAT), OA)[2]["id"] for _ in range(5)}
        self.assertEqual(len(ids), 5)

    def test_stream_framing_and_usage(self):
        raw = post_raw({"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True},
                        "messages": [{"role": "user", "content": "Hi there"}]}, "/chat/completions", OA)
        hdrs, chunks = sse_chunks(raw)
        self.assertEqual(hdrs["content-type"], "text/event-stream; charset=utf-8")
        for c in chunks:
            self.assertTrue(c.startswith(b"data: ") and c.endswith(b"\n\n") and c.count(b"\n") == 2, c)
        self.assertEqual(chunks[-1], b"data: [DONE]\n\n")
        events = [json.loads(c[6:]) for c in chunks[:-1]]
        self.assertEqual({e["object"] for e in events}, {"chat.completion.chunk"})
        self.assertEqual(events[0]["choices"][0]["delta"]["role"], "assistant")
        self.assertEqual("".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]),
                         "dpmock reply to: Hi there")
        finish = events[-2]["choices"][0]
        self.assertEqual((finish["delta"], finish["finish_reason"]), ({}, "stop"))
        self.assertEqual((events[-1]["choices"], events[-1]["usage"]["total_tokens"]), ([], 7))
        self.assertEqual(len({e["id"] for e in events}), 1)

    def test_tool_call_valid_against_schema_streamed_too(self):
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Weather?"}],
                "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}]}
        _, _, r = jpost("/v1/chat/completions", body, OA)
        choice = r["choices"][0]
        call = choice["message"]["tool_calls"][0]
        self.assertEqual((choice["finish_reason"], choice["message"]["content"], call["type"]),
                         ("tool_calls", None, "function"))
        self.assertTrue(call["id"].startswith("call_"))
        self.assertIsInstance(call["function"]["arguments"], str)
        self.assertEqual(json.loads(call["function"]["arguments"]), {"city": "example", "unit": "C"})
        _, chunks = sse_chunks(post_raw(dict(body, stream=True), "/v1/chat/completions", OA))
        events = [json.loads(c[6:]) for c in chunks[:-1]]
        frags = [tc for e in events for tc in e["choices"][0]["delta"].get("tool_calls", [])]
        self.assertEqual((frags[0]["function"]["name"], frags[0]["function"]["arguments"]), ("get_weather", ""))
        self.assertGreater(len(frags), 2)
        self.assertEqual(json.loads("".join(f["function"]["arguments"] for f in frags)),
                         {"city": "example", "unit": "C"})
        self.assertEqual(events[-1]["choices"][0]["finish_reason"], "tool_calls")

    def test_tool_result_answers_with_text(self):
        body = {"model": "gpt-4o", "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "22 and Sunny in Tokyo"}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}]}
        _, _, r = jpost("/v1/chat/completions", body, OA)
        self.assertEqual(r["choices"][0]["message"]["content"], "The get_weather tool returned: 22 and Sunny in Tokyo")
        body["tool_choice"] = "none"
        body["messages"] = body["messages"][:1]
        _, _, r = jpost("/v1/chat/completions", body, OA)
        self.assertEqual(r["choices"][0]["message"]["content"], "dpmock reply to: Weather?")

    def test_reasoning_content_and_max_tokens(self):
        body = {"model": "o4-mini", "reasoning_effort": "high", "max_completion_tokens": 2,
                "messages": [{"role": "user", "content": "why is it so"}]}
        _, _, r = jpost("/v1/chat/completions", body, OA)
        msg = r["choices"][0]
        self.assertEqual((msg["message"]["reasoning_content"], msg["message"]["content"], msg["finish_reason"]),
                         ("Thinking about: why is it so", "dpmock reply ", "length"))
        self.assertEqual(r["usage"]["completion_tokens_details"]["reasoning_tokens"], 6)
        _, chunks = sse_chunks(post_raw(dict(body, stream=True), "/v1/chat/completions", OA))
        deltas = [json.loads(c[6:])["choices"][0]["delta"] for c in chunks[:-1]]
        self.assertEqual("".join(d.get("reasoning_content", "") for d in deltas), "Thinking about: why is it so")

    def test_errors_in_openai_shape(self):
        msgs = [{"role": "user", "content": "x"}]
        cases = [
            ({"messages": msgs}, OA, 400, "model", None),
            ({"model": "gpt-4o", "messages": []}, OA, 400, "messages", None),
            ({"model": "gpt-4o", "messages": msgs, "tools": [{"type": "function", "function": {}}]}, OA, 400,
             "tools[0].function.name", "missing_required_parameter"),
            ({"model": "gpt-4o", "messages": msgs, "max_tokens": 0}, OA, 400, "max_tokens", None),
            ({"model": "gpt-4o", "messages": msgs}, {"Authorization": "Bearer invalid-abc"}, 401, None,
             "invalid_api_key"),
            ({"model": "gpt-4o", "messages": msgs}, {"Authorization": "Bearer dummy_key"}, 401, None,
             "invalid_api_key"),
            ({"model": "gpt-4o", "messages": msgs}, {}, 401, None, None),
            ({"model": "gpt-does-not-exist", "messages": msgs}, OA, 404, None, "model_not_found"),
        ]
        for body, headers, status, param, code in cases:
            with self.subTest(body=body, headers=headers):
                st, hdrs, r = jpost("/v1/chat/completions", body, headers)
                self.assertEqual(st, status)
                self.assertEqual(set(r["error"]), {"message", "type", "param", "code"})
                self.assertEqual((r["error"]["param"], r["error"]["code"]), (param, code))
                self.assertTrue(hdrs["x-request-id"].startswith("req_"))

    def test_models(self):
        st, _, data = SERVER.request("GET", "/v1/models", None, OA)
        r = json.loads(data)
        self.assertEqual((st, r["object"]), (200, "list"))
        self.assertEqual([m["id"] for m in r["data"]], [m[0] for m in scenarios.OPENAI_MODELS])
        st, _, data = SERVER.request("GET", "/v1/models/gpt-4o-mini", None, OA)
        self.assertEqual(json.loads(data), {"id": "gpt-4o-mini", "object": "model", "created": 1721172741,
                                            "owned_by": "system"})
        st, _, data = SERVER.request("GET", "/v1/models/gpt-does-not-exist", None, OA)
        self.assertEqual((st, json.loads(data)["error"]["code"]), (404, "model_not_found"))

    def test_file_upload_multipart_streamed(self):
        boundary = "----dpmockBoundary7"
        content = b"line\r\n--not-the-boundary\r\n" * 5000
        body = ("--%s\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nassistants\r\n"
                "--%s\r\nContent-Disposition: form-data; name=\"file\"; filename=\"notes.txt\"\r\n"
                "Content-Type: text/plain\r\n\r\n" % (boundary, boundary)).encode() + content + \
            ("\r\n--%s--\r\n" % boundary).encode()
        # chunked, in pieces of 1000 bytes, so the boundary falls across pieces
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000])
                           for i in range(0, len(body), 1000)) + b"0\r\n\r\n"
        raw = SERVER.raw(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nConnection: close\r\n"
                         b"Content-Type: multipart/form-data; boundary=" + boundary.encode() +
                         b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
        st, _, data, _ = split_response(raw)
        f = json.loads(data)
        self.assertEqual((st, f["object"], f["filename"], f["bytes"], f["purpose"]),
                         (200, "file", "notes.txt", len(content), "assistants"))
        st, _, data = SERVER.request("GET", "/v1/files/" + f["id"], None, OA)
        self.assertEqual(json.loads(data), f)
        st, _, data = SERVER.request("GET", "/v1/files", None, OA)
        self.assertIn(f["id"], [x["id"] for x in json.loads(data)["data"]])
        st, _, data = SERVER.request("DELETE", "/v1/files/" + f["id"], None, OA)
        self.assertEqual(json.loads(data), {"id": f["id"], "object": "file", "deleted": True})
        st, _, data = SERVER.request("GET", "/v1/files/" + f["id"], None, OA)
        self.assertEqual(st, 404)

    def test_file_upload_refusals(self):
        st, _, r = jpost("/v1/files", b"x", dict(OA, **{"Content-Type": "text/plain"}))
        self.assertEqual(st, 400)
        self.assertIn("multipart/form-data", r["error"]["message"])
        body = b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--b--\r\n'
        st, _, r = jpost("/v1/files", body, dict(OA, **{"Content-Type": "multipart/form-data; boundary=b"}))
        self.assertEqual((st, r["error"]["param"]), (400, "file"))

    def test_images_b64_and_url(self):
        import zlib
        _, _, r = jpost("/v1/images/generations", {"prompt": "a red fox", "model": "dall-e-3", "n": 2,
                                                   "response_format": "b64_json"}, OA)
        self.assertEqual(len(r["data"]), 2)
        png = __import__("base64").b64decode(r["data"][0]["b64_json"])
        self.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
        idat = png[png.index(b"IDAT") + 4:png.index(b"IEND") - 8]
        self.assertEqual(len(zlib.decompress(idat)), 8 * (1 + 8 * 3))  # 8 rows of filter byte + 8 RGB pixels
        _, _, r = jpost("/v1/images/generations", {"prompt": "a red fox", "model": "dall-e-3"}, OA)
        url = r["data"][0]["url"]
        self.assertTrue(url.startswith(SERVER.url + "/_images/"))
        st, hdrs, data = SERVER.request("GET", url[len(SERVER.url):])
        self.assertEqual((st, hdrs["content-type"], data[:4]), (200, "image/png", b"\x89PNG"))
        st, _, r = jpost("/v1/images/generations", {"model": "dall-e-3"}, OA)
        self.assertEqual((st, r["error"]["param"]), (400, "prompt"))


class StructuredOutputTest(unittest.TestCase):
    """JSON valid against the requested schema, on every provider, streamed or not."""

    SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "rating", "cast"],
              "properties": {"title": {"type": "string"}, "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                             "cast": {"type": "array", "minItems": 2, "items": {"$ref": "#/$defs/Person"}}},
              "$defs": {"Person": {"type": "object", "required": ["name", "role"], "additionalProperties": False,
                                   "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
                                                  "role": {"enum": ["lead", "support"]},
                                                  "age": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}}}}
    USER = [{"role": "user", "content": "Review Alien"}]

    def check(self, text):
        value = json.loads(text)
        self.assertEqual(value["title"], "dpmock reply to: Review Alien")  # the first string carries the answer
        if jsonschema is not None:
            jsonschema.validate(value, self.SCHEMA)
        self.assertEqual(len(value["cast"]), 2)
        return value

    def test_openai_json_schema_and_json_object(self):
        fmt = {"type": "json_schema", "json_schema": {"name": "review", "strict": True, "schema": self.SCHEMA}}
        st, _, r = jpost("/v1/chat/completions", {"model": "gpt-4o", "messages": self.USER, "response_format": fmt},
                         OA)
        self.assertEqual((st, r["choices"][0]["finish_reason"], r["choices"][0]["message"]["refusal"]),
                         (200, "stop", None))
        self.check(r["choices"][0]["message"]["content"])
        _, chunks = sse_chunks(post_raw({"model": "gpt-4o", "messages": self.USER, "response_format": fmt,
                                         "stream": True}, "/v1/chat/completions", OA))
        deltas = [json.loads(e[1]) for c in chunks for e in sse_events(c) if e[1] != "[DONE]"]
        self.check("".join(d["choices"][0]["delta"].get("content") or "" for d in deltas))
        st, _, r = jpost("/v1/chat/completions", {"model": "gpt-4o", "messages": self.USER,
                                                  "response_format": {"type": "json_object"}}, OA)
        self.assertEqual(json.loads(r["choices"][0]["message"]["content"]), {"response": "dpmock reply to: Review Alien"})
        st, _, r = jpost("/v1/chat/completions", {"model": "gpt-4o", "messages": self.USER,
                                                  "response_format": {"type": "xml"}}, OA)
        self.assertEqual((st, r["error"]["param"]), (400, "response_format.type"))

    def test_anthropic_output_config_format(self):
        body = {"model": "claude-sonnet-4-5", "max_tokens": 500, "messages": self.USER,
                "output_config": {"format": {"type": "json_schema", "schema": self.SCHEMA}}}
        st, _, r = jpost("/v1/messages", body, AN)
        self.assertEqual((st, r["stop_reason"], r["content"][0]["type"]), (200, "end_turn", "text"))
        self.check(r["content"][0]["text"])
        events = [json.loads(c.split(b"data: ", 1)[1]) for c in sse_chunks(post_raw(dict(body, stream=True),
                                                                                   "/v1/messages", AN))[1]]
        self.check("".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta"))
        usage = [e for e in events if e["type"] == "message_delta"][0]["usage"]
        self.assertEqual(set(usage), {"input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                                      "output_tokens"})
        self.assertEqual(usage["input_tokens"], events[0]["message"]["usage"]["input_tokens"])

    def test_gemini_response_schema_and_json_schema(self):
        gemini_schema = {"type": "OBJECT", "properties": {"score": {"type": "INTEGER"}, "title": {"type": "STRING"},
                                                          "tags": {"type": "ARRAY", "items": {"type": "STRING"},
                                                                   "nullable": True}},
                         "propertyOrdering": ["score", "title", "tags"], "required": ["score", "title"]}
        for config, schema in (({"responseMimeType": "application/json", "responseSchema": gemini_schema}, None),
                               ({"response_mime_type": "application/json", "response_json_schema": self.SCHEMA},
                                self.SCHEMA)):
            body = {"contents": [{"parts": [{"text": "Review Alien"}]}], "generationConfig": config}
            st, _, r = jpost("/v1beta/models/gemini-2.5-flash:generateContent", body, GE)
            text = r["candidates"][0]["content"]["parts"][0]["text"]
            value = self.check(text) if schema else json.loads(text)
            if schema is None:
                self.assertEqual(list(value)[:2], ["score", "title"])
                self.assertEqual(value["title"], "dpmock reply to: Review Alien")
            raw = post_raw(body, "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", GE)
            parts = [json.loads(e[1])["candidates"][0]["content"]["parts"][0]["text"]
                     for c in sse_chunks(raw)[1] for e in [c.decode().split("data: ", 1)]]
            self.assertEqual(json.loads("".join(parts)), value)

    def test_tool_arguments_for_nested_models_are_valid(self):
        tools = [{"type": "function", "function": {"name": "save", "parameters": self.SCHEMA}}]
        st, _, r = jpost("/v1/chat/completions", {"model": "gpt-4o", "messages": self.USER, "tools": tools}, OA)
        args = json.loads(r["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
        if jsonschema is not None:
            jsonschema.validate(args, self.SCHEMA)
        self.assertEqual([p["role"] for p in args["cast"]], ["lead", "lead"])


class EmbeddingsAndLegacyRoutesTest(unittest.TestCase):
    """/embeddings, Gemini's embedContent and batchEmbedContents, /completions and /moderations."""

    def test_openai_embeddings(self):
        st, _, r = jpost("/v1/embeddings", {"model": "text-embedding-3-small",
                                            "input": ["the cat sat on the mat", "a cat on a mat", "quarterly revenue grew"]},
                         OA)
        self.assertEqual((st, r["object"], r["model"], len(r["data"])), (200, "list", "text-embedding-3-small", 3))
        vecs = [d["embedding"] for d in r["data"]]
        self.assertEqual([len(v) for v in vecs], [1536] * 3)
        self.assertAlmostEqual(math.sqrt(sum(x * x for x in vecs[0])), 1.0, places=6)
        self.assertGreater(cosine(vecs[0], vecs[1]), cosine(vecs[0], vecs[2]) + 0.2)
        self.assertEqual(r["usage"], {"prompt_tokens": 14, "total_tokens": 14})  # 6 + 5 + 3 words
        st, _, r = jpost("/v1/embeddings", {"model": "text-embedding-3-large", "input": [[1, 2, 3], [4, 5]],
                                            "dimensions": 8, "encoding_format": "base64"}, OA)
        raw = base64.b64decode(r["data"][0]["embedding"])
        self.assertEqual(len(struct.unpack("<8f", raw)), 8)
        self.assertEqual(jpost("/v1/embeddings", {"model": "text-embedding-3-small", "input": "x",
                                                  "dimensions": 5000}, OA)[0], 400)
        self.assertEqual(jpost("/v1/embeddings", {"model": "text-embedding-ada-002", "input": "x",
                                                  "dimensions": 8}, OA)[0], 400)
        self.assertEqual(jpost("/v1/embeddings", {"model": "text-embedding-3-small", "input": []}, OA)[0], 400)
        st, hdrs, _ = SERVER.request("POST", "/v1/embeddings", b'{"model":"m","input":"x"}', scen("RATE_LIMITED"))
        self.assertEqual((st, hdrs["retry-after"]), (429, "1"))

    def test_gemini_embed_content_and_batch(self):
        st, _, r = jpost("/v1beta/models/gemini-embedding-001:embedContent",
                         {"content": {"parts": [{"text": "the cat sat"}]}, "outputDimensionality": 16}, GE)
        self.assertEqual((st, len(r["embedding"]["values"])), (200, 16))
        st, _, r = jpost("/v1beta/models/gemini-embedding-001:batchEmbedContents", {"requests": [
            {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": t}]}}
            for t in ("the cat sat", "the cat sat down")]}, GE)
        a, b = (e["values"] for e in r["embeddings"])
        self.assertEqual((st, len(a)), (200, 3072))
        self.assertGreater(cosine(a, b), 0.5)
        self.assertEqual(jpost("/v1beta/models/gemini-embedding-001:batchEmbedContents",
                               {"requests": [{"model": "models/other", "content": {"parts": [{"text": "x"}]}}]},
                               GE)[0], 400)

    def test_legacy_completions(self):
        st, _, r = jpost("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test"}, OA)
        self.assertEqual((st, r["object"], r["choices"][0]["text"], r["choices"][0]["finish_reason"]),
                         (200, "text_completion", "dpmock reply to: Say this is a test", "stop"))
        st, _, r = jpost("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "a b c d", "max_tokens": 2},
                         OA)
        self.assertEqual((r["choices"][0]["text"], r["choices"][0]["finish_reason"]), ("dpmock reply ", "length"))
        _, chunks = sse_chunks(post_raw({"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "stream": True},
                                        "/v1/completions", OA))
        events = [sse_events(c)[0][1] for c in chunks]
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual("".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]), "dpmock reply to: hi")

    def test_moderations(self):
        st, _, r = jpost("/v1/moderations", {"input": ["a nice day", "I will kill the process"]}, OA)
        self.assertEqual((st, [x["flagged"] for x in r["results"]]), (200, [False, True]))
        self.assertTrue(r["results"][1]["categories"]["violence"])
        self.assertEqual(set(r["results"][0]["categories"]), set(scenarios.MODERATION_WORDS))


class ResponsesRoutesTest(unittest.TestCase):
    BODY = {"model": "gpt-4o", "input": "Hi there"}
    TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather", "parameters": WEATHER_SCHEMA}]
    LONG = " ".join("word%d" % i for i in range(30))  # an answer of 33 tokens

    def create(self, body, headers=OA, status=200):
        st, hdrs, r = jpost("/v1/responses", body, headers)
        self.assertEqual(st, status, r)
        return r

    def test_text_answer_shape(self):
        st, hdrs, r = jpost("/v1/responses", dict(self.BODY, instructions="Be   brief", metadata={"k": "v"}), OA)
        self.assertEqual(st, 200)
        self.assertTrue(hdrs["x-request-id"].startswith("req_"))
        self.assertTrue(r["id"].startswith("resp_"))
        self.assertEqual((r["object"], r["status"], r["model"], r["instructions"], r["metadata"], r["store"]),
                         ("response", "completed", "gpt-4o", "Be   brief", {"k": "v"}, True))
        self.assertNotIn("output_text", r)  # the SDKs compute it
        for field in ("error", "incomplete_details", "previous_response_id", "max_output_tokens"):
            self.assertIsNone(r[field], field)
        self.assertEqual((r["tools"], r["tool_choice"], r["parallel_tool_calls"], r["text"]["format"], r["truncation"]),
                         ([], "auto", True, {"type": "text"}, "disabled"))
        [msg] = r["output"]
        self.assertTrue(msg["id"].startswith("msg_"))
        self.assertEqual({k: v for k, v in msg.items() if k != "id"}, {
            "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": "dpmock reply to: Hi there", "annotations": [], "logprobs": []}]})
        self.assertEqual(r["usage"], {"input_tokens": 4, "input_tokens_details": {"cached_tokens": 0,
                                                                                   "cache_write_tokens": 0},
                                      "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0},
                                      "total_tokens": 9})
        # items: message parts (input_text, input_image, output_text) and every role
        r = self.create({"model": "gpt-4o", "input": [
            {"role": "developer", "content": "Be brief"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "first"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "an answer"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "look  here"},
                                         {"type": "input_image", "image_url": "data:image/png;base64,AA=="}]}]})
        self.assertEqual(r["output"][0]["content"][0]["text"], "dpmock reply to: look here")
        self.assertEqual(r["usage"]["input_tokens"], 7 + dpmock.MEDIA_TOKENS)

    def test_stream_events_in_order_numbered_from_zero(self):
        raw = post_raw(dict(self.BODY, stream=True), "/responses", OA)
        self.assertIn(b"content-type: text/event-stream; charset=utf-8", raw.partition(b"\r\n\r\n")[0].lower())
        events = responses_events(raw)
        self.assertEqual([n for n, _ in events], [
            "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"] +
            ["response.output_text.delta"] * 5 + [
            "response.output_text.done", "response.content_part.done", "response.output_item.done",
            "response.completed"])
        self.assertEqual([d["sequence_number"] for _, d in events], list(range(len(events))))
        for name, data in events:
            self.assertEqual(data["type"], name)
        created = events[0][1]["response"]
        self.assertEqual((created["status"], created["output"], created["usage"]), ("in_progress", [], None))
        final = events[-1][1]["response"]
        self.assertEqual((final["id"], final["status"]), (created["id"], "completed"))
        item = events[2][1]["item"]
        self.assertEqual((item["status"], item["content"], events[2][1]["output_index"]), ("in_progress", [], 0))
        deltas = [d for n, d in events if n == "response.output_text.delta"]
        self.assertEqual({(d["item_id"], d["output_index"], d["content_index"]) for d in deltas}, {(item["id"], 0, 0)})
        self.assertEqual(deltas[0]["logprobs"], [])
        self.assertEqual("".join(d["delta"] for d in deltas), "dpmock reply to: Hi there")
        self.assertEqual(events[9][1]["text"], "dpmock reply to: Hi there")
        self.assertEqual(events[10][1]["part"], final["output"][0]["content"][0])
        self.assertEqual(events[11][1]["item"], final["output"][0])

    def test_function_call_flat_tools_streamed_too(self):
        r = self.create(dict(self.BODY, tools=self.TOOLS))
        [call] = r["output"]
        self.assertTrue(call["id"].startswith("fc_") and call["call_id"].startswith("call_"))
        self.assertEqual((call["type"], call["name"], call["status"]), ("function_call", "get_weather", "completed"))
        self.assertEqual(json.loads(call["arguments"]), {"city": "example", "unit": "C"})
        self.assertEqual(r["tools"], [dict(self.TOOLS[0], strict=True)])
        events = responses_events(post_raw(dict(self.BODY, tools=self.TOOLS, stream=True), "/v1/responses", OA))
        names = [n for n, _ in events]
        frags = [d["delta"] for n, d in events if n == "response.function_call_arguments.delta"]
        self.assertEqual(names, ["response.created", "response.in_progress", "response.output_item.added"] +
                         ["response.function_call_arguments.delta"] * len(frags) +
                         ["response.function_call_arguments.done", "response.output_item.done", "response.completed"])
        self.assertEqual(events[2][1]["item"]["arguments"], "")
        self.assertTrue(len(frags) > 2 and all(len(f) <= 8 for f in frags))
        self.assertEqual(json.loads("".join(frags)), {"city": "example", "unit": "C"})
        done = events[-3][1]
        self.assertEqual((done["arguments"], done["name"]), ("".join(frags), "get_weather"))
        self.assertEqual(events[-1][1]["response"]["output"][0]["arguments"], done["arguments"])

    def test_tool_results_and_tool_choice(self):
        first = self.create(dict(self.BODY, tools=self.TOOLS))
        call = first["output"][0]
        result = {"type": "function_call_output", "call_id": call["call_id"], "output": "22 and sunny"}
        by_id = self.create({"model": "gpt-4o", "tools": self.TOOLS, "previous_response_id": first["id"],
                             "input": [result]})
        self.assertEqual(by_id["output"][0]["content"][0]["text"], "The get_weather tool returned: 22 and sunny")
        self.assertEqual(by_id["previous_response_id"], first["id"])
        explicit = self.create({"model": "gpt-4o", "tools": self.TOOLS, "store": False, "input": [
            {"role": "user", "content": "Hi there"}, call, dict(result, output=[{"type": "input_text", "text": "9"}])]})
        self.assertEqual(explicit["output"][0]["content"][0]["text"], "The get_weather tool returned: 9")
        again = self.create({"model": "gpt-4o", "tools": self.TOOLS, "tool_choice": "required",
                             "previous_response_id": first["id"], "input": [result]})
        self.assertEqual(again["output"][0]["type"], "function_call")
        off = self.create(dict(self.BODY, tools=self.TOOLS, tool_choice="none"))
        self.assertEqual(off["output"][0]["type"], "message")
        tools = self.TOOLS + [{"type": "function", "name": "other", "parameters": {"type": "object"}}]
        forced = self.create(dict(self.BODY, tools=tools, tool_choice={"type": "function", "name": "other"}))
        self.assertEqual(forced["output"][0]["name"], "other")
        r = self.create(dict(self.BODY, tools=tools, tool_choice={"type": "function", "name": "nope"}), status=400)
        self.assertEqual(r["error"]["param"], "tool_choice")

    def test_reasoning_item_and_max_output_tokens(self):
        r = self.create(dict(self.BODY, reasoning={"effort": "high", "summary": "auto"}))
        self.assertEqual([o["type"] for o in r["output"]], ["reasoning", "message"])
        self.assertTrue(r["output"][0]["id"].startswith("rs_"))
        self.assertEqual(r["output"][0]["summary"], [{"type": "summary_text", "text": "Thinking about: Hi there"}])
        self.assertEqual((r["usage"]["output_tokens_details"]["reasoning_tokens"], r["usage"]["output_tokens"]), (4, 9))
        self.assertEqual(r["reasoning"], {"effort": "high", "summary": "auto"})
        r = self.create(dict(self.BODY, reasoning={"effort": "low"}))
        self.assertEqual(r["output"][0]["summary"], [])  # no summary unless asked for
        events = responses_events(post_raw(dict(self.BODY, stream=True, reasoning={"summary": "detailed"}),
                                           "/v1/responses", OA))
        names = [n for n, _ in events]
        self.assertEqual(names[2:5], ["response.output_item.added", "response.reasoning_summary_part.added",
                                      "response.reasoning_summary_text.delta"])
        summary = "".join(d["delta"] for n, d in events if n == "response.reasoning_summary_text.delta")
        self.assertEqual(summary, "Thinking about: Hi there")
        self.assertEqual({d["summary_index"] for n, d in events if "reasoning_summary" in n}, {0})
        self.assertEqual(events[names.index("response.content_part.added")][1]["output_index"], 1)
        r = self.create(dict(self.BODY, input=self.LONG, max_output_tokens=16))
        self.assertEqual((r["status"], r["incomplete_details"], r["output"][0]["status"], r["usage"]["output_tokens"],
                          r["max_output_tokens"], r["completed_at"]),
                         ("incomplete", {"reason": "max_output_tokens"}, "incomplete", 16, 16, None))
        events = responses_events(post_raw(dict(self.BODY, input=self.LONG, max_output_tokens=16, stream=True),
                                           "/v1/responses", OA))
        self.assertEqual((events[-1][0], events[-1][1]["response"]["status"]), ("response.incomplete", "incomplete"))
        r = self.create(dict(self.BODY, max_output_tokens=15), status=400)
        self.assertEqual((r["error"]["param"], r["error"]["code"]), ("max_output_tokens", "integer_below_min_value"))

    def test_structured_output_flat_json_schema(self):
        schema = {"type": "object", "properties": {"title": {"type": "string"}, "n": {"type": "integer"}},
                  "required": ["title", "n"], "additionalProperties": False}
        fmt = {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}
        r = self.create(dict(self.BODY, text={"format": fmt}))
        self.assertEqual(json.loads(r["output"][0]["content"][0]["text"]), {"title": "dpmock reply to: Hi there", "n": 1})
        self.assertEqual(r["text"]["format"], fmt)
        events = responses_events(post_raw(dict(self.BODY, text={"format": fmt}, stream=True), "/v1/responses", OA))
        text = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
        self.assertEqual(json.loads(text), {"title": "dpmock reply to: Hi there", "n": 1})
        r = self.create(dict(self.BODY, text={"format": {"type": "json_object"}}))
        self.assertEqual(json.loads(r["output"][0]["content"][0]["text"]), {"response": "dpmock reply to: Hi there"})
        r = self.create(dict(self.BODY, text={"format": {"type": "json_schema", "schema": schema}}), status=400)
        self.assertEqual((r["error"]["param"], r["error"]["code"]), ("text.format.name", "missing_required_parameter"))

    def test_previous_response_id_and_store(self):
        first = self.create({"model": "gpt-4o", "input": "one two", "instructions": "not carried over"})
        second = self.create({"model": "gpt-4o", "input": "three", "previous_response_id": first["id"]})
        # first's input (2) and output (6: "dpmock reply to: one two"), then "three"
        self.assertEqual(second["usage"]["input_tokens"], 2 + 5 + 1)
        self.assertEqual(second["output"][0]["content"][0]["text"], "dpmock reply to: three")
        third = self.create({"model": "gpt-4o", "input": [{"role": "assistant", "content": "ok"}],
                             "previous_response_id": second["id"]})
        self.assertEqual(third["output"][0]["content"][0]["text"], "dpmock reply to: three")  # the last user text
        self.assertEqual(third["usage"]["input_tokens"], 8 + 4 + 1)
        r = self.create(dict(self.BODY, previous_response_id="resp_nope"), status=400)
        self.assertEqual(r["error"], {"message": "Previous response with id 'resp_nope' not found.",
                                      "type": "invalid_request_error", "param": "previous_response_id",
                                      "code": "previous_response_not_found"})
        unstored = self.create(dict(self.BODY, store=False))
        self.assertIs(unstored["store"], False)
        r = self.create(dict(self.BODY, previous_response_id=unstored["id"]), status=400)
        self.assertEqual(r["error"]["code"], "previous_response_not_found")

    def test_stored_response_routes(self):
        items = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                 {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "three"}]}]
        r = self.create({"model": "gpt-4o", "input": items})
        path = "/v1/responses/" + r["id"]
        st, _, data = SERVER.request("GET", path, None, OA)
        self.assertEqual((st, json.loads(data)), (200, r))
        st, _, data = SERVER.request("GET", path + "/input_items", None, OA)
        page = json.loads(data)
        self.assertEqual((st, page["object"], page["has_more"]), (200, "list", False))
        self.assertEqual([(i["type"], i["role"], i["content"][0]["text"]) for i in page["data"]],
                         [("message", "user", "three"), ("message", "assistant", "two"), ("message", "user", "one")])
        self.assertEqual(page["data"][1]["content"][0]["type"], "output_text")
        ids = [i["id"] for i in page["data"]]
        self.assertEqual((page["first_id"], page["last_id"]), (ids[0], ids[-1]))
        self.assertTrue(all(i.startswith("msg_") for i in ids) and len(set(ids)) == 3)
        page = json.loads(SERVER.request("GET", path + "/input_items?order=asc&limit=2", None, OA)[2])
        self.assertEqual(([i["id"] for i in page["data"]], page["has_more"]), (ids[::-1][:2], True))
        page = json.loads(SERVER.request("GET", path + "/input_items?order=asc&after=" + page["last_id"], None, OA)[2])
        self.assertEqual(([i["id"] for i in page["data"]], page["has_more"]), ([ids[0]], False))
        for query in ("?order=sideways", "?after=msg_nope", "?limit=0"):
            self.assertEqual(SERVER.request("GET", path + "/input_items" + query, None, OA)[0], 400, query)
        # input_tokens counts as the answer did, previous responses included
        st, _, data = SERVER.request("POST", "/v1/responses/input_tokens", {"model": "gpt-4o", "input": items}, OA)
        self.assertEqual((st, json.loads(data)), (200, {"object": "response.input_tokens",
                                                        "input_tokens": r["usage"]["input_tokens"]}))
        nxt = self.create({"model": "gpt-4o", "input": "four", "previous_response_id": r["id"]})
        count = json.loads(SERVER.request("POST", "/v1/responses/input_tokens", {
            "model": "gpt-4o", "input": "four", "previous_response_id": r["id"]}, OA)[2])
        self.assertEqual(count["input_tokens"], nxt["usage"]["input_tokens"])
        # delete, then every route says 404
        st, _, data = SERVER.request("DELETE", path, None, OA)
        self.assertEqual((st, json.loads(data)), (200, {"id": r["id"], "object": "response.deleted", "deleted": True}))
        for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/input_items"), ("POST", "/cancel")):
            st, _, data = SERVER.request(method, path + suffix, b"" if method == "POST" else None, OA)
            err = json.loads(data)["error"]
            self.assertEqual((st, err["message"], err["type"]),
                             (404, "Response with id '%s' not found." % r["id"], "invalid_request_error"), suffix)
        unstored = self.create(dict(self.BODY, store=False))
        self.assertEqual(SERVER.request("GET", "/v1/responses/" + unstored["id"], None, OA)[0], 404)

    def test_background_and_cancel(self):
        done = self.create(self.BODY)
        st, _, data = SERVER.request("POST", "/v1/responses/%s/cancel" % done["id"], b"", OA)
        self.assertEqual((st, json.loads(data)["error"]["param"]), (400, "response_id"))
        queued = self.create(dict(self.BODY, background=True))
        self.assertEqual((queued["status"], queued["output"], queued["usage"], queued["background"]),
                         ("queued", [], None, True))
        st, _, data = SERVER.request("GET", "/v1/responses/" + queued["id"], None, OA)
        later = json.loads(data)
        self.assertEqual((later["status"], later["output"][0]["content"][0]["text"]),
                         ("completed", "dpmock reply to: Hi there"))
        st, _, data = SERVER.request("POST", "/v1/responses/%s/cancel" % queued["id"], b"", OA)
        self.assertEqual((st, json.loads(data)), (200, later))  # already finished: answered as it is
        r = self.create(dict(self.BODY, background=True, store=False), status=400)
        self.assertEqual(r["error"]["param"], "background")

    def test_paths_beside_the_stored_responses(self):
        # the exact path does not hide the pattern's methods, nor the other way round
        st, _, data = SERVER.request("GET", "/v1/responses/input_tokens", None, OA)
        self.assertEqual((st, json.loads(data)["error"]["message"]), (404, "Response with id 'input_tokens' not found."))
        st, hdrs, _ = SERVER.request("POST", "/v1/responses/resp_x", b"{}", OA)
        self.assertEqual((st, hdrs["allow"]), (405, "DELETE, GET, HEAD"))
        st, hdrs, _ = SERVER.request("PUT", "/responses/input_tokens", b"{}", OA)
        self.assertEqual((st, hdrs["allow"]), (405, "DELETE, GET, POST, HEAD"))
        r = self.create(self.BODY)
        st, hdrs, data = SERVER.request("HEAD", "/responses/" + r["id"], None, OA)
        self.assertEqual((st, data), (200, b""))
        for path in ("/responses", "/v1beta/responses"):
            self.assertEqual(jpost(path, self.BODY, OA)[0], 200, path)

    def test_faults_on_the_responses_stream(self):
        stream = dict(self.BODY, stream=True)

        def post(spec, body=stream):
            return post_raw(body, "/v1/responses", dict(OA, **{"X-DP-Scenario": spec}))
        raw = post("STREAM_CUT; events=3")
        parts = decode_chunks(raw.partition(b"\r\n\r\n")[2], strict=False)[0]
        self.assertEqual([sse_events(p)[0][0] for p in parts],
                         ["response.created", "response.in_progress", "response.output_item.added"])
        self.assertFalse(raw.endswith(b"0\r\n\r\n"))
        for after in (4, 1000):  # inside the stream, and beyond its end (then at its end)
            with self.subTest(after=after):
                raw = post("STREAM_ERROR; after=%d" % after)
                hdrs, chunks = sse_chunks(raw)
                name, data = sse_events(chunks[-1])[0]
                err = json.loads(data)
                self.assertEqual((name, err["type"], err["code"], err["param"], hdrs["connection"]),
                                 ("error", "error", "server_error", None, "close"))
                self.assertEqual(err["sequence_number"], len(chunks) - 1)
                self.assertEqual(len(chunks), 5 if after == 4 else 13)  # beyond the end: before response.completed
        events = responses_events(post("STREAM_NO_END"))
        self.assertEqual(events[-1][0], "response.output_item.done")
        self.assertNotIn("response.completed", [n for n, _ in events])
        events = responses_events(post("STREAM_NO_END", dict(stream, input=self.LONG, max_output_tokens=16)))
        self.assertEqual(events[-1][0], "response.output_item.done")
        r = json.loads(split_response(post("STREAM_CUT; events=1", self.BODY))[2])  # not a stream: left alone
        self.assertEqual(r["status"], "completed")
        events = responses_events(post("SSE_MANY_EVENTS; n=50"))
        self.assertEqual(len([n for n, _ in events if n == "response.output_text.delta"]), 50)
        self.assertEqual([d["sequence_number"] for _, d in events], list(range(len(events))))

    def test_rate_limited_on_every_route(self):
        r = self.create(self.BODY)
        routes = [("POST", "/v1/responses", self.BODY), ("POST", "/v1/responses", dict(self.BODY, stream=True)),
                  ("POST", "/v1/responses/input_tokens", self.BODY), ("GET", "/v1/responses/" + r["id"], None),
                  ("DELETE", "/v1/responses/" + r["id"], None), ("POST", "/v1/responses/%s/cancel" % r["id"], b""),
                  ("GET", "/v1/responses/%s/input_items" % r["id"], None)]
        for method, path, body in routes:
            with self.subTest(method=method, path=path):
                st, hdrs, data = SERVER.request(method, path, body, scen("RATE_LIMITED; retry_after=2"))
                self.assertEqual((st, json.loads(data)["error"]["code"], hdrs["retry-after"]),
                                 (429, "rate_limit_exceeded", "2"))
        self.assertEqual(SERVER.request("GET", "/v1/responses/" + r["id"], None, OA)[0], 200)  # never deleted

    def test_errors_in_openai_shape(self):
        cases = [
            ({"input": "x"}, OA, 400, "model", None),
            ({"model": "gpt-4o"}, OA, 400, "input", "missing_required_parameter"),
            ({"model": "gpt-4o", "input": 5}, OA, 400, "input", "invalid_type"),
            ({"model": "gpt-4o", "input": [{"role": "user", "content": 5}]}, OA, 400, "input[0].content",
             "invalid_type"),
            ({"model": "gpt-4o", "input": [{"role": "robot", "content": "x"}]}, OA, 400, "input[0].role",
             "invalid_value"),
            ({"model": "gpt-4o", "input": [{"type": "function_call_output", "output": "x"}]}, OA, 400,
             "input[0].call_id", "missing_required_parameter"),
            ({"model": "gpt-4o", "input": "x", "tools": [{"type": "function", "parameters": {}}]}, OA, 400,
             "tools[0].name", "missing_required_parameter"),
            ({"model": "gpt-4o", "input": "x", "tool_choice": "sometimes"}, OA, 400, "tool_choice", "invalid_value"),
            ({"model": "gpt-4o", "input": "x", "max_output_tokens": "9"}, OA, 400, "max_output_tokens",
             "invalid_type"),
            ({"model": "gpt-4o", "input": "x"}, {"Authorization": "Bearer invalid-abc"}, 401, None, "invalid_api_key"),
            ({"model": "gpt-4o", "input": "x"}, {}, 401, None, None),
            ({"model": "gpt-does-not-exist", "input": "x"}, OA, 404, None, "model_not_found"),
        ]
        for body, headers, status, param, code in cases:
            with self.subTest(body=body, headers=headers):
                st, hdrs, r = jpost("/v1/responses", body, headers)
                self.assertEqual(st, status)
                self.assertEqual(set(r["error"]), {"message", "type", "param", "code"})
                self.assertEqual((r["error"]["param"], r["error"]["code"]), (param, code))
                self.assertTrue(hdrs["x-request-id"].startswith("req_"))


class AnthropicRoutesTest(unittest.TestCase):
    BODY = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi there"}]}

    def test_message_text(self):
        st, hdrs, r = jpost("/v1/messages", self.BODY, AN)
        self.assertEqual(st, 200)
        self.assertTrue(hdrs["request-id"].startswith("req_"))
        self.assertTrue(r["id"].startswith("msg_"))
        self.assertEqual((r["type"], r["role"], r["content"], r["stop_reason"], r["stop_sequence"]),
                         ("message", "assistant", [{"type": "text", "text": "dpmock reply to: Hi there"}],
                          "end_turn", None))
        self.assertEqual((r["usage"]["input_tokens"], r["usage"]["output_tokens"]), (2, 5))

    def test_bearer_key_as_current_sdks_send_it(self):
        st, _, _ = jpost("/v1/messages", self.BODY, {"Authorization": "Bearer sk-ant", "anthropic-version": "x"})
        self.assertEqual(st, 200)

    def test_stream_event_order(self):
        raw = post_raw(dict(self.BODY, stream=True), "/v1/messages", AN)
        hdrs, chunks = sse_chunks(raw)
        events = [sse_events(c)[0] for c in chunks]
        names = [n for n, _ in events]
        self.assertEqual(names, ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * 5 +
                         ["content_block_stop", "message_delta", "message_stop"])
        for name, data in events:
            self.assertEqual(json.loads(data)["type"], name)
        start = json.loads(events[0][1])["message"]
        self.assertEqual((start["content"], start["stop_reason"]), ([], None))
        text = "".join(json.loads(d)["delta"]["text"] for n, d in events if n == "content_block_delta")
        self.assertEqual(text, "dpmock reply to: Hi there")
        delta = json.loads(events[-2][1])
        self.assertEqual((delta["delta"]["stop_reason"], delta["usage"]["output_tokens"]), ("end_turn", 5))

    def test_thinking_then_text_streamed(self):
        body = dict(self.BODY, thinking={"type": "enabled", "budget_tokens": 1024}, stream=True)
        events = [sse_events(c)[0] for c in sse_chunks(post_raw(body, "/v1/messages", AN))[1]]
        blocks = [(n, json.loads(d)) for n, d in events if n.startswith("content_block")]
        self.assertEqual(blocks[0][1]["content_block"], {"type": "thinking", "thinking": "", "signature": ""})
        kinds = [d["delta"]["type"] for n, d in blocks if n == "content_block_delta"]
        self.assertEqual(kinds, ["thinking_delta"] * 4 + ["signature_delta"] + ["text_delta"] * 5)
        stop_index = [n for n, _ in blocks].index("content_block_stop")
        self.assertEqual(blocks[stop_index - 1][1]["delta"]["type"], "signature_delta")
        self.assertEqual(blocks[stop_index + 1][1]["index"], 1)
        _, _, r = jpost("/v1/messages", dict(body, stream=False), AN)
        self.assertEqual([b["type"] for b in r["content"]], ["thinking", "text"])
        self.assertEqual(r["content"][0]["thinking"], "Thinking about: Hi there")

    def test_tool_use_streamed_as_input_json_delta(self):
        body = dict(self.BODY, tools=[{"name": "get_weather", "input_schema": WEATHER_SCHEMA}])
        _, _, r = jpost("/v1/messages", body, AN)
        block = r["content"][-1]
        self.assertEqual((r["stop_reason"], block["type"], block["name"], block["input"]),
                         ("tool_use", "tool_use", "get_weather", {"city": "example", "unit": "C"}))
        self.assertTrue(block["id"].startswith("toolu_"))
        events = [sse_events(c)[0] for c in sse_chunks(post_raw(dict(body, stream=True), "/v1/messages", AN))[1]]
        start = [json.loads(d) for n, d in events if n == "content_block_start"][-1]["content_block"]
        self.assertEqual((start["type"], start["input"]), ("tool_use", {}))
        partial = "".join(json.loads(d)["delta"].get("partial_json", "") for n, d in events
                          if n == "content_block_delta")
        self.assertEqual(json.loads(partial), {"city": "example", "unit": "C"})
        self.assertEqual(json.loads(events[-2][1])["delta"]["stop_reason"], "tool_use")

    def test_max_tokens_and_count_tokens(self):
        _, _, r = jpost("/v1/messages", dict(self.BODY, max_tokens=3), AN)
        self.assertEqual((r["content"][0]["text"], r["stop_reason"]), ("dpmock reply to: ", "max_tokens"))
        st, _, r = jpost("/v1/messages/count_tokens", {"model": "claude-x", "system": "be brief",
                                                       "messages": [{"role": "user", "content": "one two"}]}, AN)
        self.assertEqual((st, r), (200, {"input_tokens": 4}))

    def test_errors_in_anthropic_shape(self):
        msgs = [{"role": "user", "content": "x"}]
        cases = [
            ({"model": "c", "messages": msgs}, AN, 400, "invalid_request_error", "max_tokens: Field required"),
            ({"max_tokens": 5, "messages": msgs}, AN, 400, "invalid_request_error", "model: Field required"),
            ({"model": "c", "max_tokens": 5, "messages": []}, AN, 400, "invalid_request_error", "messages"),
            ({"model": "c", "max_tokens": 5, "messages": msgs, "tools": [{"name": "t"}]}, AN, 400,
             "invalid_request_error", "input_schema"),
            ({"model": "c", "max_tokens": 5, "messages": msgs}, {"x-api-key": "invalid-1"}, 401,
             "authentication_error", "invalid x-api-key"),
            ({"model": "c", "max_tokens": 5, "messages": msgs}, {"anthropic-version": "2023-06-01"}, 401,
             "authentication_error", "x-api-key"),
            ({"model": "claude-does-not-exist", "max_tokens": 5, "messages": msgs}, AN, 404, "not_found_error",
             "claude-does-not-exist"),
        ]
        for body, headers, status, etype, needle in cases:
            with self.subTest(body=body, headers=headers):
                st, hdrs, r = jpost("/v1/messages", body, headers)
                self.assertEqual((st, r["type"], r["error"]["type"]), (status, "error", etype))
                self.assertIn(needle, r["error"]["message"])
                self.assertEqual(r["request_id"], hdrs["request-id"])

    def test_server_held_threads(self):
        """thread: create holds the conversation under the answer's id; continue sends only the new turn."""
        tools = [{"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}]
        st, _, r = jpost("/v1/messages", dict(self.BODY, tools=tools, thread={"type": "create"}), AN)
        use = r["content"][0]
        self.assertEqual((st, use["type"]), (200, "tool_use"))
        turn = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"], "content": "42"}]}
        st, _, r2 = jpost("/v1/messages", dict(self.BODY, tools=tools, messages=[turn],
                                               thread={"type": "continue", "previous_message_id": r["id"]}), AN)
        self.assertEqual((st, r2["content"][0]["text"]), (200, "The lookup tool returned: 42"))
        st, _, r3 = jpost("/v1/messages", dict(self.BODY, messages=[{"role": "user", "content": "and then?"}],
                                               thread={"type": "continue", "previous_message_id": r2["id"]}), AN)
        self.assertGreater(r3["usage"]["input_tokens"], r2["usage"]["input_tokens"])  # the whole thread counts
        st, _, r = jpost("/v1/messages", dict(self.BODY, thread={"type": "continue", "previous_message_id": "msg_x"}),
                         AN)
        self.assertEqual((st, r["error"]["type"]), (404, "not_found_error"))

    def test_models_paging(self):
        ids = [m[0] for m in scenarios.ANTHROPIC_MODELS]
        get = lambda q: json.loads(SERVER.request("GET", "/v1/models" + q, None, AN)[2])  # noqa: E731
        r = get("?limit=2")
        self.assertEqual(([m["id"] for m in r["data"]], r["has_more"], r["first_id"], r["last_id"]),
                         (ids[:2], True, ids[0], ids[1]))
        r = get("?limit=4&after_id=" + ids[6])
        self.assertEqual(([m["id"] for m in r["data"]], r["has_more"]), (ids[7:], False))
        r = get("?limit=2&before_id=" + ids[3])
        self.assertEqual([m["id"] for m in r["data"]], ids[1:3])
        st, _, data = SERVER.request("GET", "/v1/models?limit=0", None, AN)
        self.assertEqual(st, 400)
        r = json.loads(SERVER.request("GET", "/v1/models/" + ids[0], None, AN)[2])
        self.assertEqual((r["type"], r["id"], r["display_name"]), ("model", ids[0], "Claude Opus 4.5"))


class GeminiRoutesTest(unittest.TestCase):
    BODY = {"contents": [{"role": "user", "parts": [{"text": "Hi there"}]}], "generationConfig": {}}
    GEN = "/v1beta/models/gemini-2.5-flash:generateContent"
    STREAM = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"

    def test_generate_text(self):
        st, hdrs, r = jpost(self.GEN + "?key=g", self.BODY, {})
        self.assertEqual(st, 200)
        cand = r["candidates"][0]
        self.assertEqual((cand["content"], cand["finishReason"]),
                         ({"parts": [{"text": "dpmock reply to: Hi there"}], "role": "model"}, "STOP"))
        self.assertEqual((r["usageMetadata"]["promptTokenCount"], r["usageMetadata"]["candidatesTokenCount"],
                          r["usageMetadata"]["totalTokenCount"], r["modelVersion"]), (2, 5, 7, "gemini-2.5-flash"))

    def test_stream_sse_framing(self):
        raw = post_raw(self.BODY, self.STREAM + "?alt=sse&key=g", {})
        hdrs, chunks = sse_chunks(raw)
        self.assertEqual(hdrs["content-type"], "text/event-stream")
        for c in chunks:
            self.assertTrue(c.startswith(b"data: ") and c.endswith(b"\r\n\r\n") and c.count(b"\n") == 2, c)
        events = [json.loads(c[6:]) for c in chunks]
        self.assertEqual("".join(e["candidates"][0]["content"]["parts"][0]["text"] for e in events),
                         "dpmock reply to: Hi there")
        self.assertEqual(["finishReason" in e["candidates"][0] for e in events], [False] * 4 + [True])
        self.assertEqual([e["usageMetadata"]["candidatesTokenCount"] for e in events], [1, 2, 3, 4, 5])

    def test_stream_json_array_written_incrementally(self):
        raw = post_raw(self.BODY, self.STREAM + "?key=g", {})
        status, hdrs, body, _ = split_response(raw)
        self.assertEqual(hdrs["content-type"], "application/json; charset=UTF-8")
        parts = decode_chunks(raw.partition(b"\r\n\r\n")[2])[0]
        self.assertEqual((parts[0][:1], parts[1][:3], parts[-1]), (b"[", b",\r\n", b"]"))
        items = json.loads(body)
        self.assertEqual(len(items), 5)
        self.assertEqual(items[-1]["candidates"][0]["finishReason"], "STOP")

    def test_function_call_snake_and_camel(self):
        for tools in ([{"functionDeclarations": [{"name": "get_weather", "parameters": {
                "type": "OBJECT", "properties": {"city": {"type": "STRING"}}, "required": ["city"]}}]}],
                      [{"function_declarations": [{"name": "get_weather",
                                                   "parameters_json_schema": WEATHER_SCHEMA}]}]):
            with self.subTest(tools=tools):
                _, _, r = jpost(self.GEN + "?key=g", dict(self.BODY, tools=tools), {})
                part = r["candidates"][0]["content"]["parts"][0]
                self.assertEqual(part["functionCall"]["name"], "get_weather")
                self.assertEqual(part["functionCall"]["args"]["city"], "example")
        result = {"contents": self.BODY["contents"] + [
            {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
            {"role": "function", "parts": [{"functionResponse": {"name": "get_weather", "response": {
                "content": "15 and cloudy in Paris"}}}]}], "tools": tools}
        _, _, r = jpost(self.GEN + "?key=g", result, {})
        self.assertEqual(r["candidates"][0]["content"]["parts"][0]["text"],
                         "The get_weather tool returned: 15 and cloudy in Paris")

    def test_thoughts_both_spellings(self):
        for config in ({"thinkingConfig": {"includeThoughts": True}},
                       {"thinkingConfig": {"include_thoughts": True, "thinking_budget": 1024}}):
            with self.subTest(config=config):
                _, _, r = jpost(self.GEN + "?key=g", dict(self.BODY, generationConfig=config), {})
                parts = r["candidates"][0]["content"]["parts"]
                self.assertEqual(parts, [{"text": "Thinking about: Hi there", "thought": True},
                                         {"text": "dpmock reply to: Hi there"}])
                self.assertEqual(r["usageMetadata"]["thoughtsTokenCount"], 4)
                self.assertEqual(r["usageMetadata"]["totalTokenCount"], 2 + 5 + 4)

    def test_max_output_tokens(self):
        _, _, r = jpost(self.GEN + "?key=g", dict(self.BODY, generationConfig={"maxOutputTokens": 2}), {})
        self.assertEqual((r["candidates"][0]["content"]["parts"][0]["text"], r["candidates"][0]["finishReason"]),
                         ("dpmock reply ", "MAX_TOKENS"))

    def test_count_tokens_forms(self):
        path = "/v1beta/models/gemini-2.5-flash:countTokens?key=g"
        for body in (self.BODY, {"generateContentRequest": dict(self.BODY, model="models/gemini-2.5-flash")},
                     dict(self.BODY, system_instruction={"parts": [{"text": "counted"}]})):
            with self.subTest(body=body):
                st, _, r = jpost(path, body, {})
                self.assertEqual((st, r["totalTokens"]), (200, 3 if "system_instruction" in body else 2))

    def test_errors_in_gemini_shape(self):
        st, _, r = jpost(self.GEN + "?key=invalid-1", self.BODY, {})
        self.assertEqual((st, r["error"]["status"], r["error"]["details"][0]["reason"]),
                         (400, "INVALID_ARGUMENT", "API_KEY_INVALID"))
        st, _, r = jpost(self.GEN, self.BODY, {})
        self.assertEqual((st, r["error"]["code"], r["error"]["status"]), (403, 403, "PERMISSION_DENIED"))
        st, _, r = jpost("/v1beta/models/gemini-does-not-exist:generateContent?key=g", self.BODY, {})
        self.assertEqual((st, r["error"]["status"]), (404, "NOT_FOUND"))
        st, _, r = jpost(self.GEN + "?key=g", {"contents": []}, {})
        self.assertEqual((st, r["error"]["status"]), (400, "INVALID_ARGUMENT"))
        self.assertIn("contents", r["error"]["message"])

    def test_models_paging(self):
        names = ["models/" + m[0] for m in scenarios.GEMINI_MODELS]
        r = json.loads(SERVER.request("GET", "/v1beta/models?pageSize=3&key=g")[2])
        self.assertEqual(([m["name"] for m in r["models"]], r["nextPageToken"]), (names[:3], "3"))
        r = json.loads(SERVER.request("GET", "/v1beta/models?pageSize=3&pageToken=6&key=g")[2])
        self.assertEqual([m["name"] for m in r["models"]], names[6:])
        self.assertNotIn("nextPageToken", r)
        r = json.loads(SERVER.request("GET", "/v1/models/gemini-2.5-pro", None, GE)[2])
        self.assertEqual((r["name"], r["displayName"], r["inputTokenLimit"]), ("models/gemini-2.5-pro",
                                                                            "Gemini 2.5 Pro", 1048576))

    def test_resumable_upload(self):
        c = SERVER.conn()
        self.addCleanup(c.close)
        c.request("POST", "/upload/v1beta/files", body=json.dumps({"file": {"display_name": "n.txt"}}), headers=dict(
            GE, **{"X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
                   "X-Goog-Upload-Header-Content-Length": "10", "X-Goog-Upload-Header-Content-Type": "text/plain",
                   "Content-Type": "application/json"}))
        r = c.getresponse()
        r.read()
        self.assertEqual((r.status, r.getheader("X-Goog-Upload-Status")), (200, "active"))
        url = r.getheader("X-Goog-Upload-URL")
        self.assertTrue(url.startswith("http://%s:%d/upload/" % (SERVER.host, SERVER.port)), url)
        path = url.split(str(SERVER.port), 1)[1]
        c.request("POST", path, body=b"hello", headers={"X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "0"})
        r = c.getresponse()
        r.read()
        self.assertEqual((r.status, r.getheader("X-Goog-Upload-Status")), (200, "active"))
        c.request("POST", path, body=b"world", headers={"X-Goog-Upload-Command": "upload, finalize",
                                                        "X-Goog-Upload-Offset": "5"})  # no key: as the SDK does
        r = c.getresponse()
        f = json.loads(r.read())["file"]
        self.assertEqual((r.status, r.getheader("X-Goog-Upload-Status")), (200, "final"))
        self.assertEqual((f["displayName"], f["mimeType"], f["sizeBytes"], f["state"]), ("n.txt", "text/plain",
                                                                                          "10", "ACTIVE"))
        import base64
        import hashlib
        self.assertEqual(base64.b64decode(f["sha256Hash"]), hashlib.sha256(b"helloworld").digest())
        fid = f["name"].split("/")[1]
        self.assertEqual(json.loads(SERVER.request("GET", "/v1beta/files/" + fid, None, GE)[2])["name"], f["name"])
        st, _, r = jpost(path, b"x", {"X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "0"})
        self.assertEqual(st, 404)  # the session is over

    def test_raw_media_and_multipart_uploads(self):
        st, _, r = jpost("/v1/files:upload?key=g", b"abc" * 100, {"Content-Type": "text/csv"})
        self.assertEqual((st, r["file"]["sizeBytes"], r["file"]["mimeType"]), (200, "300", "text/csv"))
        st, _, r = jpost("/v1beta/v1/files:upload?key=g", b"abc", {"Content-Type": "text/csv"})
        self.assertEqual(st, 200)  # as the C library sends it with its default base URL
        st, _, r = jpost("/upload/v1beta/files?uploadType=media&key=g", b"\0" * 70000,
                         {"Content-Type": "application/pdf"})
        self.assertEqual((st, r["file"]["sizeBytes"], r["file"]["mimeType"]), (200, "70000", "application/pdf"))
        body = (b'--xx\r\nContent-Type: application/json\r\n\r\n{"file": {"displayName": "pic"}}\r\n'
                b"--xx\r\nContent-Type: image/png\r\n\r\n" + b"\x89PNG" * 10 + b"\r\n--xx--\r\n")
        st, _, r = jpost("/upload/v1beta/files?uploadType=multipart&key=g", body,
                         {"Content-Type": "multipart/related; boundary=xx"})
        self.assertEqual((st, r["file"]["displayName"], r["file"]["mimeType"], r["file"]["sizeBytes"]),
                         (200, "pic", "image/png", "40"))

    def test_predict_paths(self):
        body = {"instances": [{"prompt": "a fox"}], "parameters": {"sampleCount": 2}}
        for path in ("/v1beta/models/imagen-4.0-generate-001:predict?key=g",
                     "/v1beta/v1/projects/PROJECT_ID/locations/us-central1/publishers/google/models/imagen-3:predict",
                     "/v1beta1/publishers/google/models/imagen-4.0-generate-001:predict"):
            with self.subTest(path=path):
                st, _, r = jpost(path, body, {"Authorization": "Bearer k"} if "key=" not in path else {})
                self.assertEqual((st, len(r["predictions"]), r["predictions"][0]["mimeType"]), (200, 2, "image/png"))
                png = __import__("base64").b64decode(r["predictions"][0]["bytesBase64Encoded"])
                self.assertEqual(png[:4], b"\x89PNG")


# ----------------------------------------------------------------------------- rules: a team's own answers

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
        self.assertEqual(self.srv.request("GET", "/_t/bad%20name/v1/models", None, OA)[0], 400)

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
        r = run([PY, DPMOCKCTL, "rules", "list", "--test", "ctl"], env=env)
        self.assertEqual(sorted(x["id"] for x in json.loads(r.stdout)["rules"]),
                         ["after-weather", "ask-weather", "c", "greeting"])
        r = run([PY, DPMOCKCTL, "rules", "clear", "--test", "ctl"], env=env)
        self.assertEqual(json.loads(r.stdout), {"cleared": 1})
        r = run([PY, DPMOCKCTL, "rules", "add", os.path.join(self.dir, "missing.json")], env=env)
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


# ----------------------------------------------------------------------------- faults: every way a provider fails

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
                st, hdrs, data = SERVER.request("POST", "/v1/messages", json.dumps(AnthropicRoutesTest.BODY).encode(),
                                                dict(AN, **{"X-DP-Scenario": name}))
                body = json.loads(data)
                self.assertEqual((st, body["type"]), (s_an, "error"))
                self.assertEqual(body["request_id"], hdrs["request-id"])
                st, _, data = SERVER.request("POST", GeminiRoutesTest.GEN + "?key=g",
                                             json.dumps(GeminiRoutesTest.BODY).encode(), {"X-DP-Scenario": name})
                self.assertEqual((st, json.loads(data)["error"]["code"]), (s_ge, s_ge))
        st, _, data = SERVER.request("POST", "/v1/messages", json.dumps(AnthropicRoutesTest.BODY).encode(),
                                     dict(AN, **{"X-DP-Scenario": "OVERLOADED"}))
        self.assertEqual(json.loads(data)["error"]["type"], "overloaded_error")

    def test_rate_limit_headers_per_provider(self):
        _, hdrs, _ = SERVER.request("POST", "/v1/messages", json.dumps(AnthropicRoutesTest.BODY).encode(),
                                    dict(AN, **{"X-DP-Scenario": "RATE_LIMITED; retry_after=5"}))
        self.assertEqual((hdrs["retry-after"], hdrs["anthropic-ratelimit-requests-remaining"]), ("5", "0"))
        _, _, data = SERVER.request("POST", GeminiRoutesTest.GEN + "?key=g", json.dumps(GeminiRoutesTest.BODY).encode(),
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
        raw = self.stream("STREAM_ERROR; after=3", "/v1/messages", dict(AnthropicRoutesTest.BODY, stream=True), AN)
        events = [sse_events(c)[0] for c in sse_chunks(raw)[1]]
        self.assertEqual([n for n, _ in events], ["message_start", "content_block_start", "ping", "error"])
        self.assertEqual(json.loads(events[-1][1])["error"]["type"], "overloaded_error")

    def test_gemini_in_stream_error_sse_and_array(self):
        path = GeminiRoutesTest.STREAM + "?alt=sse&key=g"
        chunks = sse_chunks(self.stream("STREAM_ERROR; after=1", path, GeminiRoutesTest.BODY, {}))[1]
        self.assertEqual(list(json.loads(chunks[-1][6:])), ["error"])
        raw = self.stream("STREAM_ERROR; after=1", GeminiRoutesTest.STREAM + "?key=g", GeminiRoutesTest.BODY, {})
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
                                                   dict(AnthropicRoutesTest.BODY, stream=True), AN))
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
            "STREAM_NO_END", "/v1/messages", dict(AnthropicRoutesTest.BODY, stream=True), AN))[1]]
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
            got = b""
            with self.assertRaises(ConnectionResetError):
                while True:
                    piece = s.recv(65536)
                    if not piece:
                        break
                    got += piece
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


# ----------------------------------------------------------------------------- request journal

class JournalTest(unittest.TestCase):

    def setUp(self):
        self.srv = Server("--journal-size", "50")
        self.addCleanup(self.srv.stop)

    def requests(self, query=""):
        return json.loads(self.srv.request("GET", "/_control/requests" + query)[2])

    def test_entry_fields_and_masking(self):
        c = self.srv.conn()
        self.addCleanup(c.close)
        for _ in range(2):
            c.request("POST", "/v1/chat/completions?key=sk-query-secret", body=chat_body(),
                      headers={"Authorization": "Bearer sk-very-secret-key", "User-Agent": "disasterparty/0.6.0"})
            c.getresponse().read()
        entries = self.requests()["requests"]
        self.assertEqual(len(entries), 2)
        e = entries[-1]
        for k in ("seq", "time", "client", "method", "path", "query", "headers", "body", "route", "scenario",
                  "status", "bytes_sent", "duration_ms", "reused", "ended"):
            self.assertIn(k, e)
        self.assertEqual((e["method"], e["path"], e["route"], e["status"], e["reused"], e["ended"]),
                         ("POST", "/v1/chat/completions", "chat", 200, True, "ok"))
        self.assertFalse(entries[0]["reused"])
        headers = dict(e["headers"])
        self.assertEqual(headers["User-Agent"], "disasterparty/0.6.0")
        self.assertEqual(headers["Authorization"], "Bearer " + dpmock.mask_key("sk-very-secret-key"))
        self.assertNotIn("secret", json.dumps(e))
        self.assertEqual(json.loads(e["body"]), json.loads(chat_body()))
        self.assertEqual(list(h for h, _ in e["headers"])[:1], ["Host"])  # headers in order

    def test_body_truncated_and_how_it_ended(self):
        self.srv.request("POST", "/v1/files:upload?key=k", b"x" * 100000, {"Content-Type": "text/plain"})
        self.srv.raw(raw_request("/v1/chat/completions", scen("EMPTY_REPLY"), chat_body()))
        e1, e2 = self.requests()["requests"]
        self.assertEqual((e1["body_bytes"], len(e1["body"]), e1["body_truncated"]), (100000, dpmock.JOURNAL_BODY, True))
        self.assertEqual((e2["ended"], e2["scenario"], e2["status"]), ("empty", "EMPTY_REPLY", None))

    def test_filters(self):
        self.srv.request("GET", "/v1/models", None, OA)
        self.srv.request("POST", "/v1/chat/completions", chat_body(), {"Authorization": "Bearer sk-a"})
        self.srv.request("POST", "/v1/chat/completions", chat_body(), scen("SERVER_ERROR"))
        self.assertEqual(self.requests("?path=chat")["matched"], 2)
        self.assertEqual(self.requests("?route=models")["matched"], 1)
        self.assertEqual(self.requests("?scenario=SERVER_ERROR")["matched"], 1)
        self.assertEqual(self.requests("?key=sk-a")["matched"], 1)
        first = self.requests()["requests"][0]["seq"]
        self.assertEqual(self.requests("?since=%d" % first)["matched"], 2)
        self.assertEqual([e["seq"] for e in self.requests("?limit=1")["requests"]], [first + 2])
        self.assertEqual(self.srv.request("GET", "/_control/requests?limit=0")[0], 400)

    def test_wait_for_returns_as_soon_as_the_nth_lands(self):
        result = {}

        def poll():
            t0 = time.monotonic()
            result["r"] = self.requests("?path=/messages&wait_for=3&timeout=30")
            result["t"] = time.monotonic() - t0
        t = threading.Thread(target=poll)
        t.start()
        time.sleep(0.3)
        for _ in range(3):
            self.srv.request("POST", "/v1/messages", json.dumps(AnthropicRoutesTest.BODY).encode(), AN)
        t.join(10)
        self.assertEqual((result["r"]["matched"], result["r"]["timed_out"]), (3, False))
        self.assertLess(result["t"], 5)
        r = self.requests("?path=/nothing&wait_for=1&timeout=0.2")
        self.assertEqual((r["matched"], r["timed_out"]), (0, True))

    def test_clear_and_reset(self):
        self.srv.request("GET", "/v1/models", None, OA)
        self.assertEqual(json.loads(self.srv.request("DELETE", "/_control/requests")[2]), {"cleared": 1})
        self.assertEqual(self.requests()["matched"], 0)

    def test_bounded_under_10000_requests(self):
        def rss_kb():
            with open("/proc/%d/status" % self.srv.proc.pid) as f:
                return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
        c = self.srv.conn()
        self.addCleanup(c.close)
        body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 2000}]}).encode()
        for i in range(10000):
            c.request("POST", "/v1/chat/completions", body=body, headers=OA)
            c.getresponse().read()
            if i == 1999:
                early = rss_kb()
        self.assertEqual(len(self.requests("?limit=1000")["requests"]), 50)
        self.assertEqual(self.requests()["last_seq"], 10000)
        self.assertLess(rss_kb() - early, 2048)  # flat: no growth with the request count

    def test_answered_requests_are_already_in_the_journal(self):
        srv = Server()
        self.addCleanup(srv.stop)
        a, b = srv.conn(), srv.conn()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        for i in range(200):
            a.request("GET", "/v1/models?n=%d" % i, headers=OA)
            a.getresponse().read()
            b.request("GET", "/_control/requests?limit=1")
            last = json.loads(b.getresponse().read())["requests"][-1]
            self.assertEqual(last["query"], "n=%d" % i)


# ----------------------------------------------------------------------------- harness options

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
        self.assertEqual(run([PY, DPMOCKCTL, "shutdown", "--url", "http://127.0.0.1:%d" % port]).returncode, 0)
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


# ----------------------------------------------------------------------------- TLS, listeners, sandbox

class TlsTest(unittest.TestCase):

    def setUp(self):
        self.log = tempfile.NamedTemporaryFile(suffix=".log", delete=False)
        self.log.close()
        self.addCleanup(os.unlink, self.log.name)
        self.srv = Server("--listen", "tls:0", "-v", logfile=self.log.name)
        self.addCleanup(self.srv.stop)
        self.port = tls_port(self.srv)

    def tls_get(self, path, host="api.openai.com"):
        import ssl
        ctx = ssl.create_default_context(cafile=CA)  # full verification, against the test CA only
        ctx.set_alpn_protocols(["http/1.1"])
        c = http.client.HTTPSConnection(host, self.port, context=ctx, timeout=5)
        # Connected to 127.0.0.1, verified as the provider's host name (as the sandbox's hosts file does).
        c.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", self.port), timeout=5), server_hostname=host)
        self.assertEqual(c.sock.selected_alpn_protocol(), "http/1.1")
        c.request("GET", path, headers={"Authorization": "Bearer sk-test"})
        r = c.getresponse()
        body = r.read()
        c.close()
        return r.status, body

    def test_https_with_the_test_ca_for_every_provider_host(self):
        for host in ("api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com", "localhost"):
            with self.subTest(host=host):
                st, body = self.tls_get("/v1/models", host)
                self.assertEqual((st, json.loads(body)["object"]), (200, "list"))

    def test_listeners_share_state(self):
        self.tls_get("/v1/models")
        self.srv.request("GET", "/v1/models", None, OA)
        entries = json.loads(self.srv.request("GET", "/_control/requests?route=models")[2])["requests"]
        self.assertEqual(len(entries), 2)

    def test_failed_handshakes_are_one_line_and_block_no_one(self):
        import ssl
        stalled = socket.create_connection(("127.0.0.1", self.port), timeout=5)  # never says hello
        self.addCleanup(stalled.close)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP to the TLS port
            status, _, body, _ = split_response(recv_all(s))  # a readable answer, as nginx and Go give
            self.assertEqual((status, json.loads(body)["error"]["code"]), (400, "plain_http"))
        with self.assertRaises(ssl.SSLError):  # a client that does not trust the test CA
            ssl.create_default_context().wrap_socket(socket.create_connection(("127.0.0.1", self.port), timeout=5),
                                                     server_hostname="api.openai.com")
        self.assertEqual(self.tls_get("/v1/models")[0], 200)  # while a handshake is still pending
        stalled.close()
        self.assertEqual(self.srv.stop(), 0)
        with open(self.log.name) as f:
            log = f.read()
        self.assertNotIn("Traceback", log)
        self.assertEqual(log.count("TLS handshake failed"), 2, log)  # distrust, no hello
        self.assertEqual(log.count("plain HTTP on a TLS port"), 1, log)

    def test_bad_listen_and_tls_options(self):
        for args in (["--listen", "tls:"], ["--listen", "x:y:z"], ["--tls-cert", CA]):
            r = run([PY, DPMOCK, "--foreground"] + args)
            self.assertEqual(r.returncode, 2, args)
            self.assertEqual(len(r.stderr.decode().strip().splitlines()), 1)
        r = run([PY, DPMOCK, "--foreground", "--port", "0", "--listen", "tls:0", "--tls-cert", CA, "--tls-key", CA])
        self.assertEqual(r.returncode, 1)
        self.assertIn("cannot load TLS certificate", r.stderr.decode())

    def test_stop_ends_a_pending_tls_handshake(self):
        srv = Server("--listen", "tls:0")
        self.addCleanup(srv.stop)
        s = socket.create_connection(("127.0.0.1", tls_port(srv)), timeout=10)  # never says hello
        self.addCleanup(s.close)
        time.sleep(1.3)  # past the fresh-connection grace
        t0 = time.monotonic()
        self.assertEqual(srv.stop(), 0)
        self.assertLess(time.monotonic() - t0, 3)


@unittest.skipUnless(_sandbox_available(), "user/mount/network namespaces are not available here")
class SandboxTest(unittest.TestCase):

    def sandbox(self, *command, options=()):
        return run([PY, DPMOCK, "sandbox"] + list(options) + ["--"] + list(command), timeout=60)

    @unittest.skipUnless(CURL, "curl is not installed")
    def test_real_host_answered_by_dpmock_with_full_verification(self):
        with open("/etc/hosts", "rb") as f:
            hosts_before = f.read()
        r = self.sandbox(CURL, "-sS", "https://api.openai.com/v1/models", "-H", "Authorization: Bearer sk-test")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout)["data"][0]["id"], scenarios.OPENAI_MODELS[0][0])
        with open("/etc/hosts", "rb") as f:
            self.assertEqual(f.read(), hosts_before)  # nothing changed outside

    @unittest.skipUnless(CURL, "curl is not installed")
    def test_nothing_else_is_reachable(self):
        r = self.sandbox(CURL, "-sS", "-m", "5", "https://example.com/")
        self.assertEqual(r.returncode, 6, r.stderr)  # could not resolve: no DNS, no route, no network

    def test_only_loopback_exists_inside(self):
        r = self.sandbox(PY, "-c", "import socket; print([n for _, n in socket.if_nameindex()])")
        self.assertEqual(r.stdout.decode().strip(), "['lo']")

    def test_environment_ports_and_exit_status(self):
        r = self.sandbox("sh", "-c", 'echo "$DP_MOCK_SERVER"; exit 7')
        self.assertEqual((r.returncode, r.stdout.decode().strip()), (7, "http://127.0.0.1:8080"))
        script = ("import http.client, json\n"
                  "for port in (80, 8080, 9999):\n"
                  "    c = http.client.HTTPConnection('localhost', port, timeout=5)\n"
                  "    c.request('GET', '/_control/status')\n"
                  "    print(json.loads(c.getresponse().read())['status'])\n")
        r = self.sandbox(PY, "-c", script, options=["--listen", "9999"])
        self.assertEqual((r.returncode, r.stdout.decode().split()), (0, ["running"] * 3), r.stderr)

    def test_unavailable_is_one_line(self):
        r = run([PY, DPMOCK, "sandbox", "--", "true"], env=dict(os.environ, PATH="/nonexistent"))
        self.assertEqual(r.returncode, 125)
        self.assertEqual(len(r.stderr.decode().strip().splitlines()), 1)
        self.assertIn("unshare", r.stderr.decode())
        r = run([PY, DPMOCK, "sandbox", "true"])
        self.assertEqual(r.returncode, 2)




# ----------------------------------------------------------------------------- HTTP behaviour

class HTTPBehaviourTest(unittest.TestCase):

    def test_keep_alive_many_requests_one_connection(self):
        c = SERVER.conn()
        try:
            for i in range(20):
                c.request("POST", "/v1/chat/completions", body=b"{}",
                          headers={"Authorization": "Bearer RATE_LIMIT_COMPLETION"})
                r = c.getresponse()
                self.assertEqual(r.status, 429)
                r.read()
                self.assertFalse(r.will_close)
            sock_before = c.sock
            c.request("GET", "/_control/status")
            r = c.getresponse()
            self.assertEqual(json.loads(r.read())["status"], "running")
            self.assertIs(c.sock, sock_before)  # never reconnected
        finally:
            c.close()

    def test_pipelined_requests_answer_in_order(self):
        one = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer EMPTY_LIST\r\n\r\n"
        two = b"GET /models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer RATE_LIMIT_LIST_MODELS\r\n" \
              b"Connection: close\r\n\r\n"
        raw = SERVER.raw(one + two)
        s1, _, _, rest = split_response(raw)
        s2, h2, _, rest = split_response(rest)
        self.assertEqual((s1, s2, h2["connection"], rest), (200, 429, "close", b""))

    def test_unknown_path_404_json(self):
        st, hdrs, data = SERVER.request("GET", "/v1/nowhere")
        self.assertEqual(st, 404)
        self.assertEqual(hdrs["content-type"], "application/json")
        self.assertIn("/v1/nowhere", json.loads(data)["error"]["message"])
        st, _, _ = SERVER.request("GET", "/v1/_control/status")  # control routes take no prefix
        self.assertEqual(st, 404)

    def test_wrong_method_405_with_allow(self):
        st, hdrs, data = SERVER.request("GET", "/v1/chat/completions")
        self.assertEqual(st, 405)
        self.assertEqual(hdrs["allow"], "POST")
        self.assertIn("GET", json.loads(data)["error"]["message"])
        st, hdrs, _ = SERVER.request("DELETE", "/models")
        self.assertEqual((st, hdrs["allow"]), (405, "GET, HEAD"))

    def test_exact_path_wins_only_for_its_own_methods(self):
        routes = [dpmock.Route("POST", "/things/count", "count", None, dpmock.OPENAI),
                  dpmock.Route("GET", "/things/{thing_id}", "get", None, dpmock.OPENAI),
                  dpmock.Route("DELETE", "/things/{thing_id}", "delete", None, dpmock.OPENAI)]
        router = dpmock.Router(routes)
        self.assertEqual(router.match("POST", "/v1/things/count"), (routes[0], {}))
        self.assertEqual(router.match("GET", "/things/count"), (routes[1], {"thing_id": "count"}))
        self.assertEqual(router.match("DELETE", "/v1/things/t1"), (routes[2], {"thing_id": "t1"}))
        with self.assertRaises(dpmock.HTTPError) as cm:
            router.match("PUT", "/things/count")
        self.assertEqual((cm.exception.status, dict(cm.exception.headers)["Allow"]), (405, "DELETE, GET, POST, HEAD"))
        with self.assertRaises(dpmock.HTTPError) as cm:
            router.match("POST", "/things/t1")
        self.assertEqual((cm.exception.status, dict(cm.exception.headers)["Allow"]), (405, "DELETE, GET, HEAD"))

    def test_head_answers_like_get_without_body(self):
        st, hdrs, data = SERVER.request("HEAD", "/_control/status")
        self.assertEqual(st, 200)
        self.assertGreater(int(hdrs["content-length"]), 0)
        self.assertEqual(data, b"")

    def test_malformed_json_names_the_error(self):
        for body, needle in ((b'{"model": ', "not valid JSON"), (b"", "empty"), (b"[1, 2]", "JSON object"),
                             (b"\xff\xfe{", "JSON")):
            with self.subTest(body=body):
                st, _, data = SERVER.request("POST", "/v1/chat/completions", body,
                                             {"Authorization": "Bearer RATE_LIMIT_COMPLETION"})
                self.assertEqual(st, 400)
                self.assertIn(needle, json.loads(data)["error"]["message"])

    def test_bad_content_length_400_and_close(self):
        for value in (b"abc", b"-5", b"1, 2", b"\xb2", b"+3"):
            with self.subTest(value=value):
                raw = SERVER.raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + value +
                                 b"\r\n\r\n{}")
                st, hdrs, body, _ = split_response(raw)
                self.assertEqual((st, hdrs["connection"]), (400, "close"))
                self.assertIn("Content-Length", json.loads(body)["error"]["message"])

    def test_missing_length_on_body_route_411(self):
        raw = SERVER.raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        st, _, body, _ = split_response(raw)
        self.assertEqual(st, 411)
        self.assertIn("Content-Length", json.loads(body)["error"]["message"])

    def test_oversized_header_section_431(self):
        big = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 1000) for i in range(80))
        raw = SERVER.raw(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
        st, hdrs, body, _ = split_response(raw)
        self.assertEqual((st, hdrs["connection"]), (431, "close"))
        self.assertIn("header", json.loads(body)["error"]["message"])

    def test_garbage_request_line_400_and_close(self):
        for line in (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", b"HELLO\r\n\r\n", b"GET / HTTP/x.y\r\n\r\n"):
            with self.subTest(line=line):
                raw = SERVER.raw(line)
                st, hdrs, body, rest = split_response(raw)
                self.assertEqual((st, hdrs["connection"], rest), (400, "close", b""))
                json.loads(body)

    def test_http2_version_505_and_long_line_414(self):
        st, _, _, _ = split_response(SERVER.raw(b"GET / HTTP/2.0\r\n\r\n"))
        self.assertEqual(st, 505)
        st, _, _, _ = split_response(SERVER.raw(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n"))
        self.assertEqual(st, 414)

    def test_chunked_request_body_then_keep_alive(self):
        body = b"7\r\n{\"a\": 1\r\n1\r\n}\r\n0\r\n\r\n"
        req = b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer RATE_LIMIT_COMPLETION\r\n" \
              b"Transfer-Encoding: chunked\r\n\r\n" + body
        raw = SERVER.raw(req + b"GET /models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer EMPTY_LIST\r\n"
                                b"Connection: close\r\n\r\n")
        s1, _, _, rest = split_response(raw)
        s2, _, b2, _ = split_response(rest)
        self.assertEqual((s1, s2, json.loads(b2)), (429, 200, {"object": "list", "data": []}))

    def test_chunked_upload_is_counted(self):
        req = b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ZERO_BYTE_FILE\r\n" \
              b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" \
              b"a;ext=1\r\n0123456789\r\n5\r\nabcde\r\n0\r\nX-Trailer: y\r\n\r\n"
        st, _, body, _ = split_response(SERVER.raw(req))
        self.assertEqual((st, json.loads(body)["bytes"]), (200, 15))

    def test_bad_chunk_size_400(self):
        req = b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ZERO_BYTE_FILE\r\n" \
              b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
        st, hdrs, body, _ = split_response(SERVER.raw(req))
        self.assertEqual((st, hdrs["connection"]), (400, "close"))
        self.assertIn("chunk", json.loads(body)["error"]["message"])

    def test_unsupported_transfer_encoding_501(self):
        req = b"POST /v1/files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"
        st, _, body, _ = split_response(SERVER.raw(req))
        self.assertEqual(st, 501)
        self.assertIn("gzip", json.loads(body)["error"]["message"])

    def test_large_upload_is_counted_not_held(self):
        n = 5 * MIB + 3
        st, _, data = SERVER.request("POST", "/v1/files", b"x" * n, {"Authorization": "Bearer LARGE_FILE_UPLOAD"})
        self.assertEqual((st, json.loads(data)["bytes"]), (200, n))

    def test_expect_100_continue_normal(self):
        with socket.create_connection((SERVER.host, SERVER.port), timeout=5) as s:
            s.sendall(b"POST /files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ZERO_BYTE_FILE\r\n"
                      b"Content-Length: 4\r\nExpect: 100-continue\r\n\r\n")
            self.assertEqual(s.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
            s.sendall(b"abcd")
            buf = b""
            while b"}" not in buf:
                buf += s.recv(4096)
            st, _, body, _ = split_response(buf)
            self.assertEqual((st, json.loads(body)["bytes"]), (200, 4))

    def test_expect_large_upload_413_at_once_unread(self):
        with socket.create_connection((SERVER.host, SERVER.port), timeout=5) as s:
            s.sendall(b"POST /v1/files:upload?key=LARGE_FILE_UPLOAD HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (101 * MIB))
            raw = recv_all(s)  # the server closes without waiting for any body byte
        self.assertFalse(raw.startswith(b"HTTP/1.1 100"))
        st, hdrs, body, rest = split_response(raw)
        self.assertEqual((st, hdrs["connection"], rest), (413, "close", b""))
        self.assertEqual(json.loads(body), scenarios.FILE_TOO_LARGE)

    def test_large_upload_without_expect_is_answered_and_drained(self):
        with socket.create_connection((SERVER.host, SERVER.port), timeout=10) as s:
            s.sendall(b"POST /files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer LARGE_FILE_UPLOAD\r\n"
                      b"Content-Length: %d\r\n\r\n" % (101 * MIB))
            piece = b"\0" * MIB
            try:
                for _ in range(101):
                    s.sendall(piece)
            except OSError:
                pass  # the server may stop reading once its linger time is over
            raw = recv_all(s)
        st, _, body, _ = split_response(raw)
        self.assertEqual(st, 413)
        self.assertEqual(json.loads(body), scenarios.FILE_TOO_LARGE)

    def test_http10_stream_is_raw_and_ends_with_the_connection(self):
        raw = SERVER.raw(b"POST /v1/chat/completions HTTP/1.0\r\nAuthorization: Bearer k\r\nContent-Length: %d\r\n"
                         b"\r\n%s" % (len(chat_body(True)), chat_body(True)))
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertNotIn(b"Transfer-Encoding", head)
        self.assertIn(b"Connection: close", head)
        self.assertTrue(body.startswith(b"data: {") and body.endswith(b"data: [DONE]\n\n"), body[-40:])

    def test_http10_closes_by_default(self):
        raw = SERVER.raw(b"GET /v1/models HTTP/1.0\r\nAuthorization: Bearer EMPTY_LIST\r\n\r\n")
        st, hdrs, _, rest = split_response(raw)
        self.assertEqual((st, hdrs["connection"], rest), (200, "close", b""))

    def test_error_before_an_unread_upload_does_not_desync_the_connection(self):
        body = b'--XX\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--XX--\r\n'
        raw = SERVER.raw(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=XX\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body) +  # no key: 401 before the body
                         b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nConnection: close\r\n\r\n")
        s1, _, _, rest = split_response(raw)
        s2, _, b2, _ = split_response(rest)
        self.assertEqual((s1, s2, json.loads(b2)["object"]), (401, 200, "list"))

    def test_big_unread_body_gets_its_answer_not_a_reset(self):
        big = b"{" + b" " * (40 * MIB) + b"}"
        c = SERVER.conn(timeout=20)
        self.addCleanup(c.close)
        c.request("POST", "/v1/chat/completions", body=big, headers=OA)
        r = c.getresponse()
        self.assertEqual((r.status, r.getheader("Connection")), (413, "close"))

    def test_wrongly_typed_fields_are_400_not_500(self):
        bodies = [{"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": [1]}]},
                                              {"role": "user", "content": "x"}]},
                  {"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": {"function": {
                      "name": [1]}}, "tools": [{"type": "function", "function": {"name": "f"}}]}]
        for body in bodies:
            st, _, r = jpost("/v1/chat/completions", body, OA)
            self.assertEqual(st, 400, r)
        for raw in (b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}',
                    b'{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":NaN}'):
            st, _, r = jpost("/v1/chat/completions", raw, OA)
            self.assertEqual((st, r["error"]["code"]), (400, "invalid_json"))
        st, _, r = jpost("/v1/images/generations", {"model": 5, "prompt": "x"}, OA)
        self.assertEqual(st, 400)
        for path in ("/v1/models?limit=%C2%B2", "/_control/requests?limit=%C2%B2"):
            self.assertEqual(SERVER.request("GET", path, None, AN)[0], 400, path)

    def test_stray_crlf_head_chunk_faults_and_bare_finalize(self):
        raw = SERVER.raw(b"\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                         b"Connection: close\r\n\r\n")
        self.assertEqual(split_response(raw)[0], 200)
        raw = SERVER.raw(b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                         b"X-DP-Scenario: BAD_CHUNK_SIZE\r\nConnection: close\r\n\r\n")
        self.assertTrue(raw.endswith(b"\r\n\r\n") and b"zz" not in raw)
        st, hdrs, _ = SERVER.request("POST", "/upload/v1beta/files", b"{}", dict(
            GE, **{"X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start"}))
        path = hdrs["x-goog-upload-url"].split(str(SERVER.port), 1)[1]
        SERVER.request("POST", path, b"abc", {"X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "0"})
        st, hdrs, data = SERVER.request("POST", path, b"", {"X-Goog-Upload-Command": "finalize"})
        self.assertEqual((st, hdrs["x-goog-upload-status"], json.loads(data)["file"]["sizeBytes"]), (200, "final", "3"))


class DisconnectTest(unittest.TestCase):
    """Clients that hang up at any point: the server keeps serving and logs no traceback."""

    def test_disconnects_leave_no_traceback(self):
        log = tempfile.NamedTemporaryFile(suffix=".log", delete=False)
        log.close()
        self.addCleanup(os.unlink, log.name)
        srv = Server("-v", logfile=log.name)
        self.addCleanup(srv.stop)
        addr = (srv.host, srv.port)
        sends = [
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\"",  # mid-body
            b"GET /v1/mod",  # mid request line
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthor",  # mid headers
            b"POST /files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc",  # mid chunk
            b"POST /messages HTTP/1.1\r\nHost: x\r\nx-api-key: STREAM_PING_ANTHROPIC\r\nContent-Length: 2\r\n\r\n{}",
        ]
        for data in sends:
            s = socket.create_connection(addr)
            s.sendall(data)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # reset on close
            s.close()
        # Mid-stream: read the headers of an abrupt stream, then reset.
        s = socket.create_connection(addr)
        s.sendall(b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ABRUPT_STREAM\r\n"
                  b"Content-Length: 2\r\n\r\n{}")
        s.recv(10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        s.close()
        time.sleep(0.3)
        st, _, _ = srv.request("GET", "/_control/status")
        self.assertEqual(st, 200)
        self.assertEqual(srv.stop(), 0)
        with open(log.name) as f:
            text = f.read()
        self.assertNotIn("Traceback", text)
        self.assertIn("stopped", text)


# ----------------------------------------------------------------------------- hostile input, leaving clients, load

class ParallelJournalTest(unittest.TestCase):
    """Many long-polls and tails on one journal, as parallel suites use it."""

    def setUp(self):
        self.srv = Server("-q")
        self.addCleanup(self.srv.stop)

    def test_waiters_each_get_their_own_matches_and_idle_ones_cost_nothing(self):
        results = {}

        def poll(i):
            results[i] = json.loads(self.srv.request("GET", "/_control/requests?path=/t%d/&wait_for=2&timeout=10" % i,
                                                     timeout=15)[2])
        threads = [threading.Thread(target=poll, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        status = json.loads(self.srv.request("GET", "/_control/status")[2])
        cpu0 = os.times()
        time.sleep(0.5)  # eight idle long-polls: the server sleeps
        pid_cpu = self._cpu_seconds()
        time.sleep(0.5)
        self.assertLess(self._cpu_seconds() - pid_cpu, 0.1, "idle waiters burn CPU")
        for round_ in range(2):
            for i in range(8):
                self.srv.request("GET", "/v1/t%d/models?r=%d" % (i, round_), None, OA)
        for t in threads:
            t.join(15)
        for i in range(8):
            self.assertEqual(results[i]["matched"], 2, results[i])
            self.assertFalse(results[i]["timed_out"])
            self.assertTrue(all("/t%d/" % i in e["path"] for e in results[i]["requests"]))
        self.assertGreaterEqual(status["active_requests"], 8)
        del cpu0

    def _cpu_seconds(self):
        with open("/proc/%d/stat" % self.srv.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def test_tailing_with_since_last_seq_misses_nothing_under_load(self):
        stop = threading.Event()
        sent = []

        def load(n):
            c = self.srv.conn()
            i = 0
            while not stop.is_set():
                c.request("GET", "/v1/models?c=%d&i=%d" % (n, i), headers=OA)
                c.getresponse().read()
                sent.append((n, i))
                i += 1
            c.close()
        workers = [threading.Thread(target=load, args=(n,)) for n in range(4)]
        for t in workers:
            t.start()
        seen, since, deadline = set(), 0, time.monotonic() + 1.5
        while time.monotonic() < deadline:
            r = json.loads(self.srv.request("GET", "/_control/requests?limit=1000000&since=%d" % since)[2])
            seen.update(e["seq"] for e in r["requests"])
            self.assertTrue(all(e["seq"] <= r["last_seq"] for e in r["requests"]))
            since = r["last_seq"]
        stop.set()
        for t in workers:
            t.join(10)
        r = json.loads(self.srv.request("GET", "/_control/requests?limit=1000000&since=%d" % since)[2])
        seen.update(e["seq"] for e in r["requests"])
        self.assertEqual(seen, set(range(1, r["last_seq"] + 1)), "a tail with since=last_seq missed entries")
        self.assertGreater(len(sent), 100)

    def test_a_held_request_is_in_the_journal_while_it_is_held(self):
        with socket.create_connection((self.srv.host, self.srv.port), timeout=5) as s:
            s.sendall(raw_request("/v1/chat/completions", scen("HANG; ms=5000"), chat_body()))
            r = json.loads(self.srv.request("GET", "/_control/requests?route=chat&wait_for=1&timeout=3")[2])
            self.assertEqual(r["matched"], 1)
            e = r["requests"][0]
            self.assertEqual((e["status"], e["ended"], json.loads(e["body"])["model"]), (None, "pending", "gpt-4o"))
        deadline = time.monotonic() + 3  # the client left: the entry says so at once, not after the hang
        while time.monotonic() < deadline:
            e = json.loads(self.srv.request("GET", "/_control/requests?route=chat")[2])["requests"][0]
            if e["ended"] != "pending":
                break
            time.sleep(0.05)
        self.assertEqual(e["ended"], "client_gone")


class ClientsThatLeaveTest(unittest.TestCase):
    """A client that disconnects during a deliberate wait frees its thread at once."""

    def test_every_pause_ends_when_the_client_leaves(self):
        srv = Server("-q")
        self.addCleanup(srv.stop)
        for spec, stream in (("HANG; ms=60000", False), ("HEADERS_STALL; ms=60000", False),
                             ("STREAM_STALL; after=1; ms=60000", True), ("STREAM_SLOW; ttft_ms=60000", True),
                             ("SLOW_BODY; bytes=1; interval_ms=10000", False)):
            with self.subTest(spec=spec):
                s = socket.create_connection((srv.host, srv.port), timeout=5)
                s.sendall(raw_request("/v1/chat/completions", scen(spec), chat_body(stream)))
                time.sleep(0.2)
                status = json.loads(srv.request("GET", "/_control/status")[2])
                self.assertEqual(status["active_requests"], 2)  # the paused one and this one
                s.close()
                t0 = time.monotonic()
                while json.loads(srv.request("GET", "/_control/status")[2])["active_requests"] != 1:
                    self.assertLess(time.monotonic() - t0, 2, "%s held its thread after the client left" % spec)
                    time.sleep(0.02)

    def test_idle_exit_is_not_kept_alive_by_a_gone_client(self):
        srv = Server("--idle-exit", "0.5")
        self.addCleanup(srv.stop)
        s = socket.create_connection((srv.host, srv.port), timeout=5)
        s.sendall(raw_request("/v1/chat/completions", scen("HANG; ms=60000"), chat_body()))
        time.sleep(0.2)
        s.close()
        self.assertEqual(srv.proc.wait(5), 0)


class ExposureTest(unittest.TestCase):
    """Control routes, browsers of other origins, and keys that must never be echoed."""

    def test_cross_site_requests_cannot_change_state(self):
        srv = Server("-q")
        self.addCleanup(srv.stop)
        for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                        {"Sec-Fetch-Site": "same-site"}):
            for path in ("/_control/shutdown", "/_control/restart", "/_control/reset"):
                with self.subTest(headers=headers, path=path):
                    st, _, body = srv.request("POST", path, b"", headers)
                    self.assertEqual((st, json.loads(body)["error"]["code"]), (403, "control_forbidden"))
        same = {"Origin": "http://%s:%d" % (srv.host, srv.port), "Sec-Fetch-Site": "same-origin"}
        self.assertEqual(srv.request("POST", "/_control/reset", b"", same)[0], 200)
        self.assertEqual(srv.request("GET", "/_control/status", None, {"Origin": "https://evil.example"})[0], 200)
        self.assertEqual(srv.proc.poll(), None)

    def test_keys_are_never_echoed_logged_or_journaled_in_full(self):
        log = tempfile.NamedTemporaryFile(suffix=".log")
        self.addCleanup(log.close)
        srv = Server(logfile=log.name)
        self.addCleanup(srv.stop)
        secret = "sk-live-0123456789abcdef"
        raws = [b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization Bearer " + secret.encode() + b"\r\n\r\n",
                b"GET /v1/models?key=" + secret.encode() + b" HTTP/1.1 extra\r\nHost: x\r\n\r\n",
                b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: " + secret.encode() + b"\x01\r\n\r\n"]
        for raw in raws:
            answer = srv.raw(raw)
            self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer[:80])
            self.assertNotIn(secret.encode(), answer)
        for query in ("key=", "%6Bey=", "k%65y="):
            srv.request("GET", "/v1/models?" + query + secret, None, {})
        srv.request("GET", "/v1/models", None, {"Authorization": "Bearer " + secret})
        journal = srv.request("GET", "/_control/requests")[2]
        self.assertNotIn(secret.encode(), journal)
        srv.stop()
        with open(log.name) as f:
            text = f.read()
        self.assertIn("/v1/models", text)
        self.assertNotIn(secret, text)

    def test_no_request_byte_reaches_a_response_header_unvalidated(self):
        for host in (b"x\rInjected: 1", b"x\nInjected: 1", b"x\x00y", b"x y", b"a\"b"):
            raw = SERVER.raw(b"POST /upload/v1beta/files HTTP/1.1\r\nHost: " + host + b"\r\nx-goog-api-key: k\r\n"
                             b"X-Goog-Upload-Protocol: resumable\r\nX-Goog-Upload-Command: start\r\n"
                             b"Content-Length: 2\r\n\r\n{}")
            status, headers, _, _ = split_response(raw)
            self.assertEqual(status, 400, host)
            self.assertNotIn("injected", headers)
            self.assertNotIn(b"Injected", raw)

    @unittest.skipUnless(_sandbox_available() and shutil.which("ip"), "network namespaces or ip(8) unavailable")
    def test_control_routes_answer_loopback_unless_allowed(self):
        """Inside a network namespace of its own, a client on a non-loopback address (192.0.2.1)."""
        script = textwrap.dedent("""
            set -e
            ip link set lo up
            ip addr add 192.0.2.1/32 dev lo  # an address of this namespace that is not a loopback one
            ask() { %(py)s -c "import http.client as h, sys; c = h.HTTPConnection(sys.argv[1], sys.argv[2],
            timeout=5); c.request('POST', '/_control/reset', b''); print(c.getresponse().status)" "$@"; }
            for extra in "" "--control-from 192.0.2.0/24"; do
                %(py)s %(dpmock)s --foreground -q --host 0.0.0.0 --port 0 --port-file /tmp/dp-ns-port $extra > /dev/null &
                for i in $(seq 50); do [ -s /tmp/dp-ns-port ] && break; sleep 0.1; done
                port=$(cat /tmp/dp-ns-port)
                echo "$extra: $(ask 192.0.2.1 $port) $(ask 127.0.0.1 $port)"
                kill %%1; wait; rm -f /tmp/dp-ns-port
            done
            """) % {"py": PY, "dpmock": DPMOCK}
        flags = ["--net", "--mount", "--fork"] + ([] if os.geteuid() == 0 else ["--user", "--map-root-user"])
        r = run(["unshare"] + flags + ["bash", "-c", script], timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.decode().split("\n")[:2], [": 403 200", "--control-from 192.0.2.0/24: 200 200"])


class StrictFramingTest(unittest.TestCase):
    """RFC 9112 / 9110 framing, and the memory a body may cost."""

    def test_host_header_exactly_once_on_http11(self):
        for head in (b"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer k\r\n\r\n",
                     b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\nAuthorization: Bearer k\r\n\r\n"):
            status, _, body, _ = split_response(SERVER.raw(head))
            self.assertEqual((status, json.loads(body)["error"]["code"]), (400, "bad_host"))
        raw = SERVER.raw(b"GET /v1/models HTTP/1.0\r\nAuthorization: Bearer k\r\n\r\n")  # 1.0 needs none
        self.assertEqual(split_response(raw)[0], 200)

    def test_control_characters_in_header_values_are_refused(self):
        for value in (b"a\rb", b"a\x00b", b"a\x07b", b"a\x7fb"):
            raw = SERVER.raw(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Thing: " + value + b"\r\nAuthorization: "
                             b"Bearer k\r\n\r\n")
            status, headers, _, _ = split_response(raw)
            self.assertEqual((status, headers.get("connection")), (400, "close"), value)
        raw = SERVER.raw(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Thing: a\tb\r\nAuthorization: Bearer k\r\n"
                         b"Connection: close\r\n\r\n")
        self.assertEqual(split_response(raw)[0], 200)  # HTAB is allowed

    def test_transfer_encoding_on_http10_closes_after_answering(self):
        body = chat_body()
        raw = SERVER.raw(b"POST /v1/chat/completions HTTP/1.0\r\nConnection: keep-alive\r\nAuthorization: Bearer k\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) +
                         b"GET /v1/models HTTP/1.0\r\nAuthorization: Bearer k\r\n\r\n")
        status, headers, _, rest = split_response(raw)
        self.assertEqual((status, headers.get("connection"), rest), (200, "close", b""))

    def test_huge_chunk_size_is_413_at_once(self):
        with socket.create_connection((SERVER.host, SERVER.port), timeout=5) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffff\r\n{")
            t0 = time.monotonic()
            status, headers, body, _ = split_response(recv_all(s))
            self.assertLess(time.monotonic() - t0, 4)
        self.assertEqual((status, headers.get("connection"), json.loads(body)["error"]["code"]),
                         (413, "close", "request_too_large"))

    def test_json_cost_is_bounded(self):
        deep = b'{"model":"m","messages":' + b"[" * 100000 + b"]" * 100000 + b"}"
        status, _, r = jpost("/v1/chat/completions", deep, OA)
        self.assertEqual((status, r["error"]["code"]), (400, "invalid_json"))
        wide = b'{"model":"m","x":[' + b"[]," * 2100000 + b'[]],"messages":[]}'
        status, _, r = jpost("/v1/chat/completions", wide, OA)
        self.assertEqual((status, r["error"]["code"]), (413, "request_too_large"))
        self.assertEqual(SERVER.request("GET", "/_control/status")[0], 200)

    def test_multipart_form_fields_are_capped(self):
        parts = b"".join(b'--B\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nv\r\n' % i for i in range(2000))
        body = parts + b'--B\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nx\r\n--B--\r\n'
        st, _, r = jpost("/v1/files", body, dict(OA, **{"Content-Type": "multipart/form-data; boundary=B"}))
        self.assertEqual((st, r["error"]["code"]), (413, "request_too_large"))
        big = b'--B\r\nContent-Disposition: form-data; name="f%d"\r\n\r\n' + b"v" * 60000 + b"\r\n"
        body = b"".join(big.replace(b"%d", b"%d" % i) for i in range(20)) + b"--B--\r\n"
        st, _, r = jpost("/v1/files", body, dict(OA, **{"Content-Type": "multipart/form-data; boundary=B"}))
        self.assertEqual((st, r["error"]["code"]), (413, "request_too_large"))

    def test_wrongly_typed_fields_name_the_field_in_each_providers_words(self):
        st, _, r = jpost("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": 5}]},
                         AN)
        self.assertEqual((st, r["error"]["type"]), (400, "invalid_request_error"))
        self.assertIn("messages.0.content", r["error"]["message"])
        st, _, r = jpost("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": 5}]}, OA)
        self.assertEqual((st, r["error"]["param"]), (400, "messages[0].content"))
        st, _, r = jpost("/v1beta/models/gemini-2.5-flash:generateContent",
                         {"contents": [{"parts": [{"text": ["x"]}]}]}, GE)
        self.assertEqual((st, r["error"]["status"]), (400, "INVALID_ARGUMENT"))
        self.assertIn("contents[0].parts[0].text", r["error"]["message"])
        for body in ({"model": "m", "max_tokens": "5", "messages": [{"role": "user", "content": "x"}]},
                     {"model": "m", "max_tokens": 5, "stream": "yes", "messages": [{"role": "user", "content": "x"}]},
                     {"model": "m", "max_tokens": 5, "system": 3, "messages": [{"role": "user", "content": "x"}]},
                     {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text",
                                                                                                 "text": 1}]}]}):
            self.assertEqual(jpost("/v1/messages", body, AN)[0], 400, body)


class ReviewFindingsTest(unittest.TestCase):
    """What an independent review of this round found, each as a client sees it."""

    def test_a_pattern_never_backtracks_on_the_prompt(self):
        schema = {"type": "object", "properties": {"name": {"type": "string", "pattern": "(\\w+\\s?)+$"}},
                  "required": ["name"]}
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "a" * 40 + "!"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
        t0 = time.monotonic()
        st, _, r = jpost("/v1/chat/completions", body, OA)
        self.assertEqual(st, 200)
        self.assertLess(time.monotonic() - t0, 3)

    def test_bad_rules_and_parts_are_400_not_500(self):
        for body in (b'{"respond": {"finish": ["stop"]}}', b"[" * 100000 + b"]" * 100000):
            st, _, out = SERVER.request("POST", "/_control/rules", body)
            self.assertEqual(st, 400, out[:200])
        st, _, r = jpost("/v1/moderations", {"input": [{"type": "text", "text": 1}]}, OA)
        self.assertEqual(st, 400)
        st, _, out = SERVER.request("POST", "/v1/chat/completions", chat_body(), scen("SEQUENCE"))
        self.assertEqual(st, 500)  # SEQUENCE's first step: SERVER_ERROR, in OpenAI's shape
        self.assertEqual(json.loads(out)["error"]["type"], "server_error")

    def test_an_empty_bearer_is_no_key(self):
        st, _, r = jpost("/v1/chat/completions", json.loads(chat_body()), {"Authorization": "Bearer "})
        self.assertEqual((st, r["error"]["code"]), (401, None))
        self.assertIn("didn't provide an API key", r["error"]["message"])

    def test_control_routes_in_a_test_prefix_and_rebinding(self):
        srv = Server("-q")
        self.addCleanup(srv.stop)
        srv.request("GET", "/_t/a/v1/models", None, OA)
        srv.request("GET", "/_t/b/v1/models", None, OA)
        reset = json.loads(srv.request("POST", "/_t/a/_control/reset", b"")[2])
        self.assertEqual((reset["test"], reset["cleared_requests"]), ("a", 1))
        doc = {"test": "t1", "rules": [{"match": {"text": "z"}, "respond": {"text": "t1 only"}}]}
        self.assertEqual(json.loads(srv.request("POST", "/_control/rules", json.dumps(doc).encode())[2])["test"], "t1")
        raw = srv.raw(b"POST /_control/reset HTTP/1.1\r\nHost: evil.example:%d\r\nOrigin: http://evil.example:%d\r\n"
                      b"Content-Length: 0\r\nConnection: close\r\n\r\n" % (srv.port, srv.port))
        self.assertEqual(split_response(raw)[0], 403)
        self.assertEqual(srv.request("POST", "/_control/reset", b"", {"Host": "localhost:%d" % srv.port})[0], 200)

    def test_strict_diagnostics_mask_the_key_and_rule_polls_fire(self):
        srv = Server("-q")
        self.addCleanup(srv.stop)
        srv.request("POST", "/_control/rules", json.dumps({"id": "k", "match": {"key": "sk-other"},
                                                           "respond": {"text": "x"}}).encode())
        secret = "sk-proj-SUPERSECRET-123456"
        st, _, out = srv.request("POST", "/v1/chat/completions", chat_body(), {"Authorization": "Bearer " + secret,
                                                                               "X-DP-Strict": "1"})
        self.assertEqual(st, 400)
        self.assertNotIn(secret.encode(), out)
        self.assertNotIn(secret.encode(), srv.request("GET", "/_control/requests")[2])
        result = {}
        poll = threading.Thread(target=lambda: result.update(json.loads(srv.request(
            "GET", "/_control/requests?rule=k&wait_for=1&timeout=5")[2])))
        poll.start()
        time.sleep(0.2)
        srv.request("POST", "/v1/chat/completions", chat_body(), {"Authorization": "Bearer sk-other"})
        poll.join(10)
        self.assertEqual((result["matched"], result["timed_out"]), (1, False))

    def test_stream_error_comes_before_the_end_marker(self):
        for path, headers, body, end in (
                ("/v1/chat/completions", OA, json.loads(chat_body(True)), b"[DONE]"),
                ("/v1/messages", AN, {"model": "m", "max_tokens": 5, "stream": True,
                                      "messages": [{"role": "user", "content": "hi"}]}, b"message_stop")):
            raw = post_raw(body, path, dict(headers, **{"X-DP-Scenario": "STREAM_ERROR; after=1000"}))
            self.assertNotIn(end, raw)
            self.assertIn(b"error", raw.rsplit(b"\r\n0\r\n", 1)[0][-300:])
        raw = post_raw({"contents": [{"parts": [{"text": "hi"}]}]}, "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
                       dict(GE, **{"X-DP-Scenario": "STREAM_ERROR; after=1000"}))
        body = b"".join(decode_chunks(raw.partition(b"\r\n\r\n")[2])[0])
        self.assertEqual(json.loads(body)[-1]["error"]["status"], "INTERNAL")  # a valid array, the error last


# ----------------------------------------------------------------------------- curl, the C library's client

@unittest.skipUnless(CURL, "curl is not installed")
class CurlTest(unittest.TestCase):

    def curl(self, *args):
        r = run([CURL, "-sS", "-o", "-", "-w", "\n%{http_code} %{time_total}"] + list(args), timeout=60)
        out, _, tail = r.stdout.rpartition(b"\n")
        code, total = tail.decode().split()
        return r.returncode, int(code), out, float(total)

    def test_expect_100_continue_upload(self):
        with tempfile.NamedTemporaryFile() as f:
            f.write(b"z" * (2 * MIB))  # curl sends Expect: 100-continue for bodies over 1 MiB
            f.flush()
            rc, code, out, _ = self.curl("-H", "Authorization: Bearer LARGE_FILE_UPLOAD",
                                         "-H", "Expect: 100-continue",
                                         "--data-binary", "@" + f.name, SERVER.url + "/v1/files")
        self.assertEqual((rc, code, json.loads(out)["bytes"]), (0, 200, 2 * MIB))

    def test_101_mib_upload_413_without_sending_it(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "big.bin")
            with open(path, "wb") as f:
                f.truncate(101 * MIB)  # sparse: no disk used
            rc, code, out, _ = self.curl("-H", "Content-Type: application/octet-stream",
                                         "--data-binary", "@" + path,
                                         SERVER.url + "/v1/files:upload?key=LARGE_FILE_UPLOAD")
        self.assertEqual((rc, code), (0, 413))
        self.assertEqual(json.loads(out), scenarios.FILE_TOO_LARGE)

    def test_abrupt_stream_transfer_ends_cleanly(self):
        rc, code, out, _ = self.curl("-N", "-H", "Authorization: Bearer ABRUPT_STREAM", "-d", "{}",
                                     SERVER.url + "/chat/completions")
        self.assertEqual((rc, code), (0, 200))
        self.assertTrue(out.endswith(b'"content":"partial'))

    def test_keep_alive_reuses_the_connection(self):
        r = run([CURL, "-sS", "-v", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null",
                 "-H", "Authorization: Bearer EMPTY_LIST",
                 SERVER.url + "/models", SERVER.url + "/v1/models", SERVER.url + "/v1beta/models"])
        self.assertEqual(r.returncode, 0)
        self.assertEqual(r.stderr.count(b"Re-using existing connection") +
                         r.stderr.count(b"Reusing existing connection"), 2)


# ----------------------------------------------------------------------------- lifecycle

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
        self.assertEqual(run([PY, DPMOCKCTL, "shutdown", "--url", url]).returncode, 0)

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
                r = run([PY, DPMOCKCTL, "restart", "--url", url, "--json"])
                self.assertEqual(r.returncode, 0, r.stderr)
                boots.add(json.loads(r.stdout)["boot_id"])
        finally:
            stop.set()
            for t in threads:
                t.join()
        self.assertEqual(errors, [])
        self.assertGreater(count[0], 10)
        self.assertEqual(len(boots), 3)
        st = json.loads(run([PY, DPMOCKCTL, "status", "--url", url]).stdout)
        self.assertEqual((st["pid"], st["restarts"]), (pid, 3))
        self.assertTrue(os.path.exists(os.path.join(d, "log.txt")))
        self.assertEqual(run([PY, DPMOCKCTL, "shutdown", "--url", url]).returncode, 0)
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


class CtlTest(unittest.TestCase):

    def ctl(self, *args, env=None):
        return run([PY, DPMOCKCTL] + list(args), env=env)

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


# ----------------------------------------------------------------------------- official SDKs (optional)

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
           "required": ["city"]}


@unittest.skipUnless(_have("openai"), "the openai package is not installed (optional)")
class OpenAISdkTest(unittest.TestCase):

    def setUp(self):
        openai = self.openai = importlib.import_module("openai")
        self.client = openai.OpenAI(api_key="sk-test", base_url=SERVER.url + "/v1", max_retries=0)
        self.addCleanup(self.client.close)

    def test_text_and_usage(self):
        r = self.client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi there"}])
        self.assertEqual(r.choices[0].message.content, "dpmock reply to: Hi there")
        self.assertEqual(r.choices[0].finish_reason, "stop")
        self.assertEqual((r.usage.prompt_tokens, r.usage.completion_tokens), (2, 5))
        self.assertTrue(r._request_id.startswith("req_"))

    def test_stream_with_usage_and_helper(self):
        chunks = list(self.client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi there"}], stream=True,
            stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, "dpmock reply to: Hi there")
        self.assertEqual(chunks[-1].usage.total_tokens, 7)
        with self.client.chat.completions.stream(model="gpt-4o-mini",
                                                 messages=[{"role": "user", "content": "again"}]) as s:
            final = s.get_final_completion()
        self.assertEqual(final.choices[0].message.content, "dpmock reply to: again")

    def test_tool_call_then_result(self):
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
        msgs = [{"role": "user", "content": "Weather in Paris?"}]
        r = self.client.chat.completions.create(model="gpt-4o", messages=msgs, tools=tools)
        call = r.choices[0].message.tool_calls[0]
        self.assertEqual((r.choices[0].finish_reason, call.function.name), ("tool_calls", "get_weather"))
        self.assertEqual(json.loads(call.function.arguments), {"city": "example", "days": 1})
        with self.client.chat.completions.stream(model="gpt-4o", messages=msgs, tools=tools) as s:
            streamed = s.get_final_completion().choices[0].message.tool_calls[0]
        self.assertEqual(json.loads(streamed.function.arguments), {"city": "example", "days": 1})
        msgs += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"}]
        r2 = self.client.chat.completions.create(model="gpt-4o", messages=msgs, tools=tools)
        self.assertEqual(r2.choices[0].message.content, "The get_weather tool returned: 22 degrees and sunny")

    def test_reasoning_and_max_tokens(self):
        r = self.client.chat.completions.create(model="o4-mini", reasoning_effort="high",
                                                messages=[{"role": "user", "content": "Why"}])
        self.assertEqual(r.choices[0].message.reasoning_content, "Thinking about: Why")
        self.assertEqual(r.usage.completion_tokens_details.reasoning_tokens, 3)
        r = self.client.chat.completions.create(model="gpt-4o", max_completion_tokens=2,
                                                messages=[{"role": "user", "content": "one two three"}])
        self.assertEqual((r.choices[0].message.content, r.choices[0].finish_reason), ("dpmock reply ", "length"))

    def test_models_files_images(self):
        ids = [m.id for m in self.client.models.list()]
        self.assertIn("gpt-4o-mini", ids)
        self.assertEqual(self.client.models.retrieve("gpt-4o").id, "gpt-4o")
        f = self.client.files.create(file=("notes.jsonl", b'{"a": 1}\n' * 1000, "application/jsonl"),
                                     purpose="batch")
        self.assertEqual((f.filename, f.bytes, f.purpose), ("notes.jsonl", 9000, "batch"))
        self.assertEqual(self.client.files.retrieve(f.id).bytes, 9000)
        img = self.client.images.generate(model="dall-e-3", prompt="a fox", response_format="b64_json")
        self.assertTrue(__import__("base64").b64decode(img.data[0].b64_json).startswith(b"\x89PNG\r\n"))
        img = self.client.images.generate(model="dall-e-3", prompt="a fox", response_format="url")
        with __import__("urllib.request").request.urlopen(img.data[0].url) as resp:
            self.assertTrue(resp.read().startswith(b"\x89PNG\r\n"))

    def test_typed_errors(self):
        o = self.openai
        msgs = [{"role": "user", "content": "x"}]
        bad = o.OpenAI(api_key="invalid-key", base_url=SERVER.url + "/v1", max_retries=0)
        self.addCleanup(bad.close)
        with self.assertRaises(o.AuthenticationError):
            bad.chat.completions.create(model="gpt-4o", messages=msgs)
        with self.assertRaises(o.NotFoundError) as cm:
            self.client.chat.completions.create(model="gpt-does-not-exist", messages=msgs)
        self.assertEqual(cm.exception.code, "model_not_found")
        with self.assertRaises(o.BadRequestError) as cm:
            self.client.chat.completions.create(model="gpt-4o", messages=[])
        self.assertEqual(cm.exception.param, "messages")
        with self.assertRaises(o.RateLimitError):
            self.client.chat.completions.create(model="gpt-4o", messages=msgs,
                                                extra_headers={"X-DP-Scenario": "RATE_LIMITED"})


@unittest.skipUnless(_have("openai"), "the openai package is not installed (optional)")
class OpenAIResponsesSdkTest(unittest.TestCase):
    TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city", "strict": True,
              "parameters": dict(WEATHER, required=["city", "days"], additionalProperties=False)}]

    def setUp(self):
        openai = self.openai = importlib.import_module("openai")
        self.client = openai.OpenAI(api_key="sk-test", base_url=SERVER.url + "/v1", max_retries=0)
        self.addCleanup(self.client.close)

    def test_create_and_stream(self):
        r = self.client.responses.create(model="gpt-4o-mini", input="Hi there", instructions="Be brief")
        self.assertEqual((r.output_text, r.status, r.object), ("dpmock reply to: Hi there", "completed", "response"))
        self.assertEqual((r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens), (4, 5, 9))
        self.assertTrue(r._request_id.startswith("req_"))
        with self.client.responses.stream(model="gpt-4o-mini", input="Hi stream",
                                          reasoning={"effort": "low", "summary": "auto"}) as s:
            events = list(s)
            final = s.get_final_response()
        self.assertEqual([e.sequence_number for e in events], list(range(len(events))))
        deltas = [e for e in events if e.type == "response.output_text.delta"]
        self.assertEqual(deltas[-1].snapshot, "dpmock reply to: Hi stream")  # the helper's accumulated text
        self.assertEqual((final.output_text, [o.type for o in final.output]), ("dpmock reply to: Hi stream",
                                                                                ["reasoning", "message"]))
        self.assertEqual(final.output[0].summary[0].text, "Thinking about: Hi stream")
        self.assertEqual(final.id, events[0].response.id)
        raw = list(self.client.responses.create(model="gpt-4o-mini", input="raw", stream=True))
        self.assertEqual((raw[0].type, raw[-1].type, raw[-1].response.output_text),
                         ("response.created", "response.completed", "dpmock reply to: raw"))

    def test_function_call_round_trips(self):
        r = self.client.responses.create(model="gpt-4o", input="Weather in Paris?", tools=self.TOOLS)
        [call] = r.output
        self.assertEqual((call.type, call.name, call.status), ("function_call", "get_weather", "completed"))
        self.assertEqual(json.loads(call.arguments), {"city": "example", "days": 1})
        with self.client.responses.stream(model="gpt-4o", input="Weather in Paris?", tools=self.TOOLS) as s:
            streamed = s.get_final_response().output[0]
        self.assertEqual((streamed.name, json.loads(streamed.arguments)), ("get_weather", {"city": "example", "days": 1}))
        result = {"type": "function_call_output", "call_id": call.call_id, "output": "22 degrees and sunny"}
        chained = self.client.responses.create(model="gpt-4o", tools=self.TOOLS, previous_response_id=r.id,
                                               input=[result])
        self.assertEqual(chained.output_text, "The get_weather tool returned: 22 degrees and sunny")
        items = [{"role": "user", "content": "Weather in Paris?"}] + [o.model_dump(exclude_none=True) for o in r.output]
        explicit = self.client.responses.create(model="gpt-4o", tools=self.TOOLS, store=False,
                                                input=items + [dict(result, output="18 degrees")])
        self.assertEqual(explicit.output_text, "The get_weather tool returned: 18 degrees")

    def test_parse_structured_output_with_nested_models(self):
        pydantic = importlib.import_module("pydantic")

        class City(pydantic.BaseModel):
            name: str
            population: int

        class Report(pydantic.BaseModel):
            city: City
            tags: typing.List[str]
            rating: float

        r = self.client.responses.parse(model="gpt-4o", input="Tell me about Paris", text_format=Report)
        self.assertIsInstance(r.output_parsed, Report)
        self.assertEqual(r.output_parsed.city, City(name="dpmock reply to: Tell me about Paris", population=1))
        self.assertEqual(r.text.format.type, "json_schema")
        with self.client.responses.stream(model="gpt-4o", input="Paris", text_format=Report) as s:
            done = [e for e in s if e.type == "response.output_text.done"]
            final = s.get_final_response()
        self.assertEqual((done[0].parsed, final.output_parsed.city.name), (final.output_parsed, "dpmock reply to: Paris"))

    def test_previous_response_id_and_stored_responses(self):
        o = self.openai
        first = self.client.responses.create(model="gpt-4o", input="one two")
        second = self.client.responses.create(model="gpt-4o", input="three", previous_response_id=first.id)
        self.assertEqual((second.output_text, second.previous_response_id, second.usage.input_tokens),
                         ("dpmock reply to: three", first.id, 8))
        count = self.client.responses.input_tokens.count(model="gpt-4o", input="three", previous_response_id=first.id)
        self.assertEqual((count.object, count.input_tokens), ("response.input_tokens", 8))
        self.assertEqual(self.client.responses.retrieve(second.id).output_text, "dpmock reply to: three")
        three = self.client.responses.create(model="gpt-4o", input=[
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])
        items = list(self.client.responses.input_items.list(three.id, limit=1))  # auto-paging, one a page
        self.assertEqual([(i.type, i.role, i.content[0].text) for i in items],
                         [("message", "user", "c"), ("message", "assistant", "b"), ("message", "user", "a")])
        with self.assertRaises(o.BadRequestError) as cm:
            self.client.responses.create(model="gpt-4o", input="x", previous_response_id="resp_missing")
        self.assertEqual((cm.exception.code, cm.exception.param), ("previous_response_not_found", "previous_response_id"))
        with self.assertRaises(o.BadRequestError):
            self.client.responses.cancel(second.id)  # not a background response
        background = self.client.responses.create(model="gpt-4o", input="later", background=True)
        self.assertEqual(background.status, "queued")
        self.assertEqual(self.client.responses.cancel(background.id).output_text, "dpmock reply to: later")
        self.client.responses.delete(second.id)
        with self.assertRaises(o.NotFoundError):
            self.client.responses.retrieve(second.id)

    def test_incomplete_and_stream_faults(self):
        words = " ".join("w%d" % i for i in range(30))
        r = self.client.responses.create(model="gpt-4o", input=words, max_output_tokens=16)
        self.assertEqual((r.status, r.incomplete_details.reason, len(r.output_text.split())),
                         ("incomplete", "max_output_tokens", 16))
        with self.client.responses.stream(model="gpt-4o", input="x",
                                          extra_headers={"X-DP-Scenario": "STREAM_ERROR; after=3"}) as s:
            events = list(s)
            self.assertEqual((events[-1].type, events[-1].code, events[-1].sequence_number), ("error", "server_error", 3))
            with self.assertRaises(RuntimeError):  # no response.completed
                s.get_final_response()
        with self.client.responses.stream(model="gpt-4o", input="x", extra_headers={"X-DP-Scenario": "STREAM_NO_END"}) as s:
            with self.assertRaises(RuntimeError):
                s.get_final_response()
        with self.assertRaises(self.openai.RateLimitError):
            self.client.responses.create(model="gpt-4o", input="x", extra_headers={"X-DP-Scenario": "RATE_LIMITED"})


@unittest.skipUnless(_have("anthropic"), "the anthropic package is not installed (optional)")
class AnthropicSdkTest(unittest.TestCase):

    def setUp(self):
        anthropic = self.anthropic = importlib.import_module("anthropic")
        self.client = anthropic.Anthropic(api_key="sk-ant-test", base_url=SERVER.url, max_retries=0)
        self.addCleanup(self.client.close)

    def test_text_stream_and_count(self):
        msgs = [{"role": "user", "content": "Hi there"}]
        r = self.client.messages.create(model="claude-sonnet-4-5-20250929", max_tokens=100, messages=msgs)
        self.assertEqual((r.content[0].text, r.stop_reason), ("dpmock reply to: Hi there", "end_turn"))
        self.assertEqual((r.usage.input_tokens, r.usage.output_tokens), (2, 5))
        self.assertTrue(r._request_id.startswith("req_"))
        with self.client.messages.stream(model="claude-sonnet-4-5-20250929", max_tokens=100, messages=msgs) as s:
            self.assertEqual("".join(s.text_stream), "dpmock reply to: Hi there")
            final = s.get_final_message()
        self.assertEqual((final.stop_reason, final.usage.output_tokens), ("end_turn", 5))
        n = self.client.messages.count_tokens(model="claude-sonnet-4-5-20250929", messages=msgs)
        self.assertEqual(n.input_tokens, 2)

    def test_tools_and_thinking(self):
        tools = [{"name": "get_weather", "description": "Weather", "input_schema": WEATHER}]
        msgs = [{"role": "user", "content": "Weather?"}]
        r = self.client.messages.create(model="claude-sonnet-4-5-20250929", max_tokens=100, messages=msgs,
                                        tools=tools)
        block = r.content[-1]
        self.assertEqual((r.stop_reason, block.type, block.name, block.input),
                         ("tool_use", "tool_use", "get_weather", {"city": "example", "days": 1}))
        self.assertTrue(block.id.startswith("toolu_"))
        with self.client.messages.stream(model="claude-sonnet-4-5-20250929", max_tokens=100, messages=msgs,
                                         tools=tools) as s:
            self.assertEqual(s.get_final_message().content[-1].input, {"city": "example", "days": 1})
        msgs += [{"role": "assistant", "content": [b.model_dump() for b in r.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "Rainy"}]}]
        r2 = self.client.messages.create(model="claude-sonnet-4-5-20250929", max_tokens=100, messages=msgs,
                                         tools=tools)
        self.assertEqual(r2.content[0].text, "The get_weather tool returned: Rainy")
        with self.client.messages.stream(model="claude-sonnet-4-5-20250929", max_tokens=2048,
                                         thinking={"type": "enabled", "budget_tokens": 1024},
                                         messages=[{"role": "user", "content": "Why"}]) as s:
            final = s.get_final_message()
        self.assertEqual([b.type for b in final.content], ["thinking", "text"])
        self.assertEqual(final.content[0].thinking, "Thinking about: Why")
        self.assertTrue(final.content[0].signature)

    def test_models_paging(self):
        page = self.client.models.list(limit=2)
        ids = [m.id for m in page]  # auto-pages with after_id
        self.assertEqual(ids, [m[0] for m in scenarios.ANTHROPIC_MODELS])
        self.assertEqual(self.client.models.retrieve("claude-3-haiku-20240307").display_name, "Claude Haiku 3")

    def test_typed_errors(self):
        a = self.anthropic
        msgs = [{"role": "user", "content": "x"}]
        bad = a.Anthropic(api_key="invalid-key", base_url=SERVER.url, max_retries=0)
        self.addCleanup(bad.close)
        with self.assertRaises(a.AuthenticationError):
            bad.messages.create(model="claude-x", max_tokens=10, messages=msgs)
        with self.assertRaises(a.NotFoundError) as cm:
            self.client.messages.create(model="claude-does-not-exist", max_tokens=10, messages=msgs)
        self.assertEqual(cm.exception.body["error"]["type"], "not_found_error")
        with self.assertRaises(a.BadRequestError):
            self.client.messages.create(model="claude-x", max_tokens=0, messages=msgs)
        with self.assertRaises(a.RateLimitError):
            self.client.messages.create(model="claude-x", max_tokens=10, messages=msgs,
                                        extra_headers={"X-DP-Scenario": "RATE_LIMITED"})


@unittest.skipUnless(_have("google.genai"), "the google-genai package is not installed (optional)")
class GeminiSdkTest(unittest.TestCase):

    def setUp(self):
        genai, types, errors = (importlib.import_module(m) for m in (
            "google.genai", "google.genai.types", "google.genai.errors"))
        self.genai, self.types, self.errors = genai, types, errors
        self.client = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=SERVER.url))

    def test_text_stream_and_count(self):
        r = self.client.models.generate_content(model="gemini-2.5-flash", contents="Hi there")
        self.assertEqual((r.text, r.candidates[0].finish_reason.value), ("dpmock reply to: Hi there", "STOP"))
        self.assertEqual(r.usage_metadata.total_token_count, 7)
        text = "".join(c.text or "" for c in self.client.models.generate_content_stream(
            model="gemini-2.5-flash", contents="Hi there"))
        self.assertEqual(text, "dpmock reply to: Hi there")
        self.assertEqual(self.client.models.count_tokens(model="gemini-2.5-flash",
                                                         contents="one two three").total_tokens, 3)

    def test_tools_thinking_and_max_tokens(self):
        t = self.types
        decl = t.FunctionDeclaration(name="get_weather", parameters_json_schema=WEATHER)
        r = self.client.models.generate_content(
            model="gemini-2.5-flash", contents="Weather?",
            config=t.GenerateContentConfig(tools=[t.Tool(function_declarations=[decl])],
                                           automatic_function_calling=t.AutomaticFunctionCallingConfig(disable=True)))
        self.assertEqual((r.function_calls[0].name, r.function_calls[0].args), ("get_weather",
                                                                               {"city": "example", "days": 1}))

        def get_weather(city: str) -> str:
            """Weather for a city."""
            return "cloudy in " + city
        r = self.client.models.generate_content(model="gemini-2.5-flash", contents="Weather?",
                                                config=t.GenerateContentConfig(tools=[get_weather]))
        self.assertEqual(r.text, "The get_weather tool returned: cloudy in example")
        r = self.client.models.generate_content(
            model="gemini-2.5-flash", contents="Why",
            config=t.GenerateContentConfig(thinking_config=t.ThinkingConfig(include_thoughts=True)))
        parts = r.candidates[0].content.parts
        self.assertEqual([(p.thought, p.text) for p in parts], [(True, "Thinking about: Why"),
                                                               (None, "dpmock reply to: Why")])
        r = self.client.models.generate_content(model="gemini-2.5-flash", contents="a b c",
                                                config=t.GenerateContentConfig(max_output_tokens=1))
        self.assertEqual((r.text, r.candidates[0].finish_reason.value), ("dpmock ", "MAX_TOKENS"))

    def test_models_and_files(self):
        names = [m.name for m in self.client.models.list(config={"page_size": 3})]  # auto-pages
        self.assertEqual(names, ["models/" + m[0] for m in scenarios.GEMINI_MODELS])
        self.assertEqual(self.client.models.get(model="gemini-2.5-pro").display_name, "Gemini 2.5 Pro")
        import io
        f = self.client.files.upload(file=io.BytesIO(b"hello world" * 1000),
                                     config={"mime_type": "text/plain", "display_name": "hello"})
        self.assertEqual((f.display_name, f.size_bytes, f.state.value, f.mime_type),
                         ("hello", 11000, "ACTIVE", "text/plain"))
        self.assertEqual(self.client.files.get(name=f.name).size_bytes, 11000)

    def test_images_in_vertex_express_mode(self):
        client = self.genai.Client(vertexai=True, api_key="k",
                                   http_options=self.types.HttpOptions(base_url=SERVER.url))
        r = client.models.generate_images(model="imagen-4.0-generate-001", prompt="a fox")
        self.assertTrue(r.generated_images[0].image.image_bytes.startswith(b"\x89PNG\r\n"))

    def test_typed_errors(self):
        e = self.errors
        bad = self.genai.Client(api_key="invalid-key", http_options=self.types.HttpOptions(base_url=SERVER.url))
        with self.assertRaises(e.ClientError) as cm:
            bad.models.generate_content(model="gemini-2.5-flash", contents="x")
        self.assertEqual((cm.exception.code, cm.exception.details["error"]["details"][0]["reason"]),
                         (400, "API_KEY_INVALID"))
        with self.assertRaises(e.ClientError) as cm:
            self.client.models.generate_content(model="gemini-does-not-exist", contents="x")
        self.assertEqual((cm.exception.code, cm.exception.status), (404, "NOT_FOUND"))
        limited = self.genai.Client(api_key="k", http_options=self.types.HttpOptions(
            base_url=SERVER.url, headers={"X-DP-Scenario": "RATE_LIMITED"}))
        with self.assertRaises(e.ClientError) as cm:
            limited.models.generate_content(model="gemini-2.5-flash", contents="x")
        self.assertEqual((cm.exception.code, cm.exception.status), (429, "RESOURCE_EXHAUSTED"))


@unittest.skipUnless(_have("openai") and _have("pydantic"), "the openai package is not installed (optional)")
class OpenAIStructuredSdkTest(unittest.TestCase):
    """chat.completions.parse with nested pydantic models, embeddings.create, and a rule-driven tool loop."""

    def setUp(self):
        openai = importlib.import_module("openai")
        self.client = openai.OpenAI(api_key="sk-test", base_url=SERVER.url + "/v1", max_retries=0)
        self.addCleanup(self.client.close)

    def test_parse_a_nested_model(self):
        pd = importlib.import_module("pydantic")
        typing = importlib.import_module("typing")

        class Actor(pd.BaseModel):
            name: str
            role: typing.Literal["lead", "support"]  # novm
            age: typing.Optional[int] = None

        class Review(pd.BaseModel):
            title: str
            rating: int = pd.Field(ge=1, le=5)
            cast: typing.List[Actor]
            tags: typing.List[str] = pd.Field(min_length=2)

        done = self.client.chat.completions.parse(model="gpt-4o", response_format=Review,
                                                  messages=[{"role": "user", "content": "Review Alien"}])
        review = done.choices[0].message.parsed
        self.assertIsInstance(review, Review)
        self.assertEqual(review.title, "dpmock reply to: Review Alien")
        self.assertTrue(1 <= review.rating <= 5 and len(review.tags) >= 2)
        with self.client.chat.completions.stream(model="gpt-4o", response_format=Review,
                                                 messages=[{"role": "user", "content": "Review Alien"}]) as s:
            final = s.get_final_completion()
        self.assertEqual(final.choices[0].message.parsed, review)

    def test_embeddings(self):
        r = self.client.embeddings.create(model="text-embedding-3-small",
                                          input=["the cat sat on the mat", "a cat on a mat", "stock prices fell"])
        a, b, c = (d.embedding for d in r.data)
        self.assertEqual((len(a), r.usage.prompt_tokens), (1536, 14))
        self.assertGreater(cosine(a, b), cosine(a, c))
        r = self.client.embeddings.create(model="text-embedding-3-large", input="x", dimensions=256)  # SDK: base64
        self.assertEqual(len(r.data[0].embedding), 256)

    def test_tool_loop_from_rules(self):
        rules = [{"id": "sdk-ask", "match": {"text": "weather in Oslo", "tool_result": False},
                  "respond": {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}},
                 {"id": "sdk-done", "match": {"tool_result": "get_weather"}, "respond": {"text": "Cold in Oslo"}}]
        self.assertEqual(SERVER.request("POST", "/_control/rules?test=sdk-openai", json.dumps(rules).encode())[0], 200)
        client = self.client.with_options(default_headers={"X-DP-Test-Id": "sdk-openai"})
        msgs = [{"role": "user", "content": "What is the weather in Oslo?"}]
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
        r = client.chat.completions.create(model="gpt-4o", messages=msgs, tools=tools)
        call = r.choices[0].message.tool_calls[0]
        self.assertEqual((call.function.name, json.loads(call.function.arguments)), ("get_weather", {"city": "Oslo"}))
        msgs += [r.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "-5C"}]
        r = client.chat.completions.create(model="gpt-4o", messages=msgs, tools=tools)
        self.assertEqual(r.choices[0].message.content, "Cold in Oslo")


@unittest.skipUnless(_have("anthropic"), "the anthropic package is not installed (optional)")
class AnthropicStructuredSdkTest(unittest.TestCase):

    def setUp(self):
        anthropic = importlib.import_module("anthropic")
        self.client = anthropic.Anthropic(api_key="sk-ant-test", base_url=SERVER.url, max_retries=0)
        self.addCleanup(self.client.close)

    def test_structured_output_and_streamed_usage(self):
        schema = {"type": "object", "properties": {"answer": {"type": "string"}, "score": {"type": "integer"}},
                  "required": ["answer", "score"], "additionalProperties": False}
        kwargs = dict(model="claude-sonnet-4-5", max_tokens=200, messages=[{"role": "user", "content": "Rate it"}],
                      extra_body={"output_config": {"format": {"type": "json_schema", "schema": schema}}})
        m = self.client.messages.create(**kwargs)
        self.assertEqual(json.loads(m.content[0].text), {"answer": "dpmock reply to: Rate it", "score": 1})
        with self.client.messages.stream(**kwargs) as s:
            events = list(s)
            final = s.get_final_message()
        delta = [e for e in events if e.type == "message_delta"][0]
        self.assertEqual(delta.usage.input_tokens, m.usage.input_tokens)
        self.assertEqual(final.usage.input_tokens, m.usage.input_tokens)
        self.assertEqual(json.loads(final.content[0].text), json.loads(m.content[0].text))

    def test_the_sdk_tool_runner_against_rules(self):
        anthropic = importlib.import_module("anthropic")
        rules = [{"id": "a-ask", "match": {"text": "Kyoto", "tool_result": False},
                  "respond": {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Kyoto"}}]}},
                 {"id": "a-done", "match": {"tool_result": "get_weather"}, "respond": {"text": "Kyoto is mild"}}]
        self.assertEqual(SERVER.request("POST", "/_control/rules?test=sdk-anthropic", json.dumps(rules).encode())[0],
                         200)
        seen = []

        @anthropic.beta_tool
        def get_weather(city: str) -> str:
            """The weather of a city."""
            seen.append(city)
            return "mild"
        client = self.client.with_options(default_headers={"X-DP-Test-Id": "sdk-anthropic"})
        runner = client.beta.messages.tool_runner(model="claude-sonnet-4-5", max_tokens=100, tools=[get_weather],
                                                  messages=[{"role": "user", "content": "Weather in Kyoto?"}])
        last = None
        for message in runner:
            last = message
        self.assertEqual((seen, last.content[0].text), (["Kyoto"], "Kyoto is mild"))


@unittest.skipUnless(_have("google.genai") and _have("pydantic"), "the google-genai package is not installed (optional)")
class GeminiStructuredSdkTest(unittest.TestCase):

    def setUp(self):
        self.genai, self.types = (importlib.import_module(m) for m in ("google.genai", "google.genai.types"))
        self.client = self.genai.Client(api_key="k", http_options=self.types.HttpOptions(base_url=SERVER.url))

    def test_response_schema_and_embed_content(self):
        pd = importlib.import_module("pydantic")
        typing = importlib.import_module("typing")

        class Recipe(pd.BaseModel):
            name: str
            minutes: int
            steps: typing.List[str]

        r = self.client.models.generate_content(
            model="gemini-2.5-flash", contents="A pancake recipe",
            config=self.types.GenerateContentConfig(response_mime_type="application/json", response_schema=Recipe))
        self.assertIsInstance(r.parsed, Recipe)
        self.assertEqual(r.parsed.name, "dpmock reply to: A pancake recipe")
        e = self.client.models.embed_content(model="gemini-embedding-001",
                                             contents=["the cat sat", "the cat sat down", "tax law"],
                                             config=self.types.EmbedContentConfig(output_dimensionality=64))
        a, b, c = (x.values for x in e.embeddings)
        self.assertEqual(len(a), 64)
        self.assertGreater(cosine(a, b), cosine(a, c))

    def test_automatic_function_calling_against_rules(self):
        rules = {"rules": [{"id": "g-ask", "match": {"text": "Lisbon", "tool_result": False},
                            "respond": {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Lisbon"}}]}},
                           {"id": "g-done", "match": {"tool_result": "get_weather"},
                            "respond": {"text": "Lisbon: {{text}} was asked"}}]}
        self.assertEqual(SERVER.request("POST", "/_control/rules?test=sdk-gemini", json.dumps(rules).encode())[0],
                         200)
        seen = []

        def get_weather(city: str) -> dict:
            """The weather of a city."""
            seen.append(city)
            return {"forecast": "sunny"}
        client = self.genai.Client(api_key="k", http_options=self.types.HttpOptions(
            base_url=SERVER.url, headers={"X-DP-Test-Id": "sdk-gemini"}))
        r = client.models.generate_content(model="gemini-2.5-flash", contents="Weather in Lisbon?",
                                           config=self.types.GenerateContentConfig(tools=[get_weather]))
        self.assertEqual(seen, ["Lisbon"])
        self.assertEqual(r.text, "Lisbon: Weather in Lisbon? was asked")


# ----------------------------------------------------------------------------- schema instances and embeddings

SCHEMA_TEXT = "hello"


def validate_instance(test, schema, instance):
    """Validate with the validator the schema declares (Draft 2020-12 by default), formats checked."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    errors = sorted(cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(instance), key=str)
    test.assertEqual([], [e.message for e in errors], "instance %s" % json.dumps(instance)[:500])


_SNAKE = {"min_items": "minItems", "max_items": "maxItems", "property_ordering": "propertyOrdering",
          "any_of": "anyOf", "min_length": "minLength", "max_length": "maxLength",
          "min_properties": "minProperties", "max_properties": "maxProperties"}
_COUNTS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")


def gemini_to_json_schema(s):
    """Gemini's OpenAPI subset -> JSON Schema: lower-case types, nullable -> type list, camelCase keys,
    int64 counts given as strings -> ints, propertyOrdering dropped."""
    if isinstance(s, list):
        return [gemini_to_json_schema(x) for x in s]
    if not isinstance(s, dict):
        return s
    out = {}
    for key, value in s.items():
        key = _SNAKE.get(key, key)
        if key == "properties":
            out[key] = {n: gemini_to_json_schema(v) for n, v in value.items()}
        elif key in ("items", "anyOf"):
            out[key] = gemini_to_json_schema(value)
        elif key == "type":
            out[key] = value.lower()
        elif key in _COUNTS:
            out[key] = int(value)
        elif key in ("propertyOrdering", "nullable") or key == "format" and value == "enum":
            continue
        else:
            out[key] = value
    if s.get("nullable") is True:
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = out["enum"] + [None]
    return out


################################################################################
# Corpus
################################################################################

OPENAI_STRICT = [
    {"type": "object", "additionalProperties": False, "required": ["steps", "final_answer"],
     "properties": {"steps": {"type": "array", "items": {
         "type": "object", "additionalProperties": False, "required": ["explanation", "output"],
         "properties": {"explanation": {"type": "string"}, "output": {"type": "string"}}}},
         "final_answer": {"type": "string"}}},
    {"type": "object", "additionalProperties": False, "required": ["type", "label", "children", "attributes"],
     "properties": {
         "type": {"type": "string", "enum": ["div", "button", "header", "section", "field", "form"]},
         "label": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#"}},
         "attributes": {"type": "array", "items": {
             "type": "object", "additionalProperties": False, "required": ["name", "value"],
             "properties": {"name": {"type": "string"}, "value": {"type": "string"}}}}}},
    {"type": "object", "additionalProperties": False, "required": ["linked_list"],
     "properties": {"linked_list": {"$ref": "#/$defs/linked_list_node"}},
     "$defs": {"linked_list_node": {
         "type": "object", "additionalProperties": False, "required": ["value", "next"],
         "properties": {"value": {"type": "number"},
                        "next": {"anyOf": [{"$ref": "#/$defs/linked_list_node"}, {"type": "null"}]}}}}},
    {"type": "object", "additionalProperties": False, "required": ["name", "date", "participants", "location"],
     "properties": {"name": {"type": "string"}, "date": {"type": "string", "format": "date"},
                    "participants": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    "location": {"type": ["string", "null"]}}},
    {"type": "object", "additionalProperties": False, "required": ["item"],
     "properties": {"item": {"anyOf": [
         {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
         {"type": "object", "additionalProperties": False, "required": ["number", "street", "city"],
          "properties": {"number": {"type": "string"}, "street": {"type": "string"},
                         "city": {"type": "string"}}}]}}},
    {"type": "object", "additionalProperties": False, "required": ["username", "email", "price", "rating"],
     "properties": {"username": {"type": "string", "pattern": "^@[a-zA-Z0-9_]+$"},
                    "email": {"type": "string", "format": "email"},
                    "price": {"type": "number", "multipleOf": 0.01, "exclusiveMinimum": 0, "maximum": 1000},
                    "rating": {"type": "integer", "minimum": 1, "maximum": 5}}},
    {"type": "object", "additionalProperties": False, "required": ["event", "when", "id", "site", "ip"],
     "properties": {"event": {"type": "string", "enum": ["created", "deleted"]},
                    "when": {"type": "string", "format": "date-time"},
                    "id": {"type": "string", "format": "uuid"},
                    "site": {"type": "string", "format": "hostname"},
                    "ip": {"anyOf": [{"type": "string", "format": "ipv4"}, {"type": "string", "format": "ipv6"}]}}},
]

ZOD = [
    {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
     "properties": {"user": {"$ref": "#/definitions/User"},
                    "friends": {"type": "array", "items": {"$ref": "#/definitions/User"}},
                    "best": {"$ref": "#/properties/user"}},
     "required": ["user", "friends"], "additionalProperties": False,
     "definitions": {"User": {"type": "object", "additionalProperties": False, "required": ["id", "email", "role"],
                              "properties": {"id": {"type": "string", "format": "uuid"},
                                             "email": {"type": "string", "format": "email"},
                                             "age": {"type": "integer", "exclusiveMinimum": 0},
                                             "role": {"type": "string", "enum": ["admin", "user"]},
                                             "website": {"type": "string", "format": "uri"},
                                             "createdAt": {"type": "string", "format": "date-time"}}}}},
    {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "additionalProperties": False,
     "properties": {"pair": {"type": "array", "minItems": 2, "maxItems": 2,
                             "items": [{"type": "string"}, {"type": "number"}]},
                    "scores": {"type": "object", "additionalProperties": {"type": "number"}, "minProperties": 2},
                    "nick": {"type": ["string", "null"], "minLength": 3},
                    "maybe": {"anyOf": [{"not": {}}, {"type": "number", "minimum": 5}]},
                    "kind": {"type": "string", "const": "thing"},
                    "flags": {"type": "array", "items": {"type": "boolean"}, "uniqueItems": True, "minItems": 2},
                    "count": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 13}},
     "required": ["pair", "scores", "nick", "maybe", "kind", "flags", "count"]},
    {"$schema": "http://json-schema.org/draft-07/schema#",
     "$ref": "#/definitions/Menu",
     "definitions": {"Menu": {"type": "object", "additionalProperties": False, "required": ["title", "items"],
                              "properties": {"title": {"type": "string", "maxLength": 3},
                                             "items": {"type": "array", "items": {"$ref": "#/definitions/Menu"}}}}}},
    {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
     "properties": {"shape": {"oneOf": [
         {"type": "object", "properties": {"kind": {"type": "string", "enum": ["circle"]}, "r": {"type": "number"}},
          "required": ["kind", "r"], "additionalProperties": False},
         {"type": "object", "properties": {"kind": {"type": "string", "enum": ["square"]}, "s": {"type": "number"}},
          "required": ["kind", "s"], "additionalProperties": False}]}},
     "required": ["shape"], "additionalProperties": False},
]

DRAFT4 = [
    {"$schema": "http://json-schema.org/draft-04/schema#", "type": "object", "required": ["ratio", "n"],
     "properties": {"ratio": {"type": "number", "minimum": 0, "exclusiveMinimum": True,
                              "maximum": 1, "exclusiveMaximum": True},
                    "n": {"type": "integer", "minimum": 5, "exclusiveMinimum": True, "multipleOf": 3},
                    "tuple": {"type": "array", "items": [{"type": "integer"}, {"type": "string"}],
                              "additionalItems": False},
                    "node": {"$ref": "#/definitions/a~1b"}},
     "definitions": {"a/b": {"type": "object", "properties": {"x": {"type": "string", "pattern": "^[xyz]{2}$"}},
                             "required": ["x"]}}},
]

MISC = [
    {"$defs": {"tilde~name": {"type": "integer", "minimum": 3}, "pct name": {"type": "string", "maxLength": 2}},
     "type": "object", "required": ["a", "b"],
     "properties": {"a": {"$ref": "#/$defs/tilde~0name"}, "b": {"$ref": "#/$defs/pct%20name"}}},
    {"type": "object", "properties": {"a": {"$anchor": "thing", "type": "integer", "maximum": -5},
                                      "b": {"$ref": "#thing"}}, "required": ["b"]},
    {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
               {"properties": {"a": {"minimum": 7}, "b": {"type": "string"}}, "required": ["b"]},
               {"properties": {"b": {"pattern": "^[a-z]+$"}}}]},
    {"allOf": [{"type": "string", "pattern": "^[a-z]+$"}, {"pattern": "q"}, {"minLength": 4}]},
    {"type": "object", "patternProperties": {"^x-[a-z]+$": {"type": "integer"}}, "additionalProperties": False,
     "minProperties": 2},
    {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a", "zz"],
     "additionalProperties": {"type": "integer", "minimum": 100}},
    {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
    {"type": "array", "items": {"type": "integer"}, "contains": {"type": "integer", "minimum": 50},
     "minContains": 2, "minItems": 1},
    {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "uniqueItems": True, "minItems": 3},
    {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "uniqueItems": True, "minItems": 5},
    {"type": "array", "items": {"type": "string", "format": "date"}, "uniqueItems": True, "minItems": 4},
    {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"},
                                                                "tag": {"type": "string"}}},
     "uniqueItems": True, "minItems": 3, "maxItems": 3},
    {"type": "array", "items": {"type": "integer"}, "minItems": 7},
    {"type": "array", "items": {"type": "integer"}, "maxItems": 0},
    {"type": "integer", "minimum": 10, "maximum": 20, "multipleOf": 7},
    {"type": "integer", "multipleOf": 2.5, "minimum": 1},
    {"type": "number", "minimum": 0.5, "maximum": 0.7},
    {"type": "number", "exclusiveMaximum": -3},
    {"type": "number", "multipleOf": 0.1, "minimum": 0.25},
    {"type": "string", "minLength": 12},
    {"type": "string", "maxLength": 0},
    {"type": ["integer", "string"]},
    {"enum": [None, 3, "x"]},
    {"const": {"a": [1, 2]}},
    {"type": "string", "default": "fallback"},
    {"type": "object", "properties": {"mode": {"type": "string", "default": "fast"}, "n": {"type": "integer",
                                                                                         "default": 4}}},
    {"type": "integer", "default": "not an int"},
    {"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 5}]},
    {"oneOf": [{"type": "integer", "multipleOf": 2}, {"type": "integer", "multipleOf": 3}]},
    {"if": {"type": "string"}, "then": {"minLength": 9}, "type": "string"},
    {"type": "object", "maxProperties": 2, "required": ["c"],
     "properties": {"a": {"type": "string"}, "b": {"type": "string"}, "c": {"type": "string"}}},
    {"type": "string", "format": "duration"}, {"type": "string", "format": "time"},
    {"type": "string", "format": "ipv6"}, {"type": "string", "format": "url"},
    {"type": "string", "format": "hostname", "maxLength": 4}, {"type": "string", "format": "some-unknown"},
    {"not": {"type": "string"}, "type": ["string", "integer"]},
    True, {},
]

GEMINI = [
    {"type": "ARRAY", "items": {"type": "OBJECT", "properties": {
        "recipeName": {"type": "STRING"}, "ingredients": {"type": "ARRAY", "items": {"type": "STRING"}}},
        "propertyOrdering": ["recipeName", "ingredients"]}},
    {"type": "OBJECT", "properties": {
        "name": {"type": "STRING", "nullable": True}, "grade": {"type": "STRING", "format": "enum",
                                                             "enum": ["A", "B", "C"]},
        "age": {"type": "INTEGER", "minimum": 18, "maximum": 99}, "score": {"type": "NUMBER", "nullable": True},
        "passed": {"type": "BOOLEAN"}, "when": {"type": "STRING", "format": "date-time"},
        "mood": {"type": "STRING", "enum": ["happy", "sad"], "nullable": True}},
     "required": ["name", "grade", "age", "passed", "when"],
     "propertyOrdering": ["grade", "age", "name", "score", "passed", "when", "mood"]},
    {"type": "OBJECT", "properties": {
        "tags": {"type": "ARRAY", "items": {"type": "STRING", "min_length": 2}, "min_items": 2, "max_items": "3"},
        "thing": {"any_of": [{"type": "INTEGER"}, {"type": "STRING"}]},
        "title": {"type": "STRING", "max_length": "4"}},
     "property_ordering": ["title", "thing", "tags"], "required": ["tags", "thing", "title"]},
    {"type": "OBJECT", "properties": {"items": {"type": "ARRAY", "minItems": "2", "items": {
        "type": "OBJECT", "properties": {"sku": {"type": "STRING", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                                         "qty": {"type": "INTEGER", "minimum": 1}},
        "required": ["sku", "qty"]}}, "note": {"type": "NULL"}}, "required": ["items"]},
]

PATTERNS = [
    r"^\+?[1-9]\d{1,14}$", r"^\d{4}-\d{2}-\d{2}$", r"^[A-Z]{3}-\d{4}$",
    r"^[a-zA-Z0-9._%+-]+@[a-zA-Z0-9.-]+\.[a-zA-Z]{2,}$", r"^#[0-9a-fA-F]{6}$", r"^[a-z0-9]+(?:-[a-z0-9]+)*$",
    r"^(cat|dog)$", r"^(?P<area>\d{3})-(?P<num>\d{4})$", r"^(?<year>\d{4})-(?<month>0[1-9]|1[0-2])$",
    r"^[^@\s]+@[^@\s]+$", r"^\w+\s\w+$", r"^[A-Z][a-z]+(?: [A-Z][a-z]+)*$", r"^v\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?$",
    r"^(?:[01]\d|2[0-3]):[0-5]\d$", r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$",
    r"^.{3,5}$", r"\d", r"^[^0-9]+$", r"^\$\d+(\.\d{2})?$", r"^[A-Z]{2}\d{2}[A-Z0-9]{1,30}$",
    r"^(\([0-9]{3}\))?[0-9]{3}-[0-9]{4}$", r"^a*?b+?c{2,}?$", "^[\\u0041-\\u005A]{2}\\x2D$", r"^[\]\[-]{2}$",
    r"(?i)^[a-f]{3}$", r"^\S+\.(?:png|jpe?g)$", r"^[^\W\d_]{2}\b$", r"^\p{Lu}", r"^(?=.*\d)(?=.*[a-z]).{8,}$",
    r"^https?://[^\s/$.?#].[^\s]*$", r"^[a-z]{2}(_[A-Z]{2})?$", r"^\d{3}\.\d{3}\.\d{3}-\d{2}$", r"\.json$",
]

# (pattern, length constraint) pairs no string satisfies: the only ones allowed to come out invalid
UNSATISFIABLE = {
    (r"^(cat|dog)$", (("minLength", 6),)), (r"^(?:[01]\d|2[0-3]):[0-5]\d$", (("minLength", 6),)),
    (r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$", (("maxLength", 12),)),
    (r"^.{3,5}$", (("minLength", 6),)), ("^[\\u0041-\\u005A]{2}\\x2D$", (("minLength", 6),)),
    (r"^[\]\[-]{2}$", (("minLength", 6),)), (r"^[^\W\d_]{2}\b$", (("minLength", 6),)),
    (r"^[a-z]{2}(_[A-Z]{2})?$", (("minLength", 6),)), (r"^\d{3}\.\d{3}\.\d{3}-\d{2}$", (("maxLength", 12),)),
    (r"(?i)^[a-f]{3}$", (("minLength", 6),)),
}


def pydantic_models():
    from datetime import date, datetime, time as dtime
    from decimal import Decimal
    from enum import Enum
    from typing import Dict, List, Literal, Optional, Set, Tuple, Union  # novm
    from uuid import UUID
    pd = importlib.import_module("pydantic")  # optional: by name, the project imports no package
    BaseModel, ConfigDict, Field = pd.BaseModel, pd.ConfigDict, pd.Field
    conint, confloat, conlist, constr = pd.conint, pd.confloat, pd.conlist, pd.constr

    class Colour(str, Enum):
        RED = "red"
        GREEN = "green"

    class Priority(int, Enum):
        LOW = 1
        HIGH = 3

    class Address(BaseModel):
        street: str
        city: str = Field(min_length=2, max_length=30)
        postcode: constr(pattern=r"^\d{5}(-\d{4})?$")
        country: Literal["US", "CA"] = "US"  # novm

    class Person(BaseModel):
        name: str
        age: conint(ge=0, le=130)
        email: Optional[str] = None
        score: confloat(gt=0, lt=1)
        colour: Colour
        priority: Priority = Priority.LOW
        addresses: List[Address]
        nicknames: conlist(str, min_length=2, max_length=4)
        tags: Set[str] = set()
        coords: Tuple[float, float]
        born: date
        updated: datetime
        alarm: Optional[dtime] = None
        id: UUID
        balance: Decimal
        extra: Dict[str, int] = {}
        manager: Optional["Person"] = None

    class Tree(BaseModel):
        value: int
        children: List["Tree"] = []

    class Cat(BaseModel):
        pet_type: Literal["cat"]  # novm
        meows: int

    class Dog(BaseModel):
        pet_type: Literal["dog"]  # novm
        barks: float

    class Lizard(BaseModel):
        pet_type: Literal["reptile", "lizard"]  # novm
        scales: bool

    class Owner(BaseModel):
        pet: Union[Cat, Dog, Lizard] = Field(discriminator="pet_type")
        pets: List[Union[Cat, Dog]] = Field(min_length=2)
        n: int

    class Circle(BaseModel):
        radius: float = Field(gt=0)

    class Square(BaseModel):
        side: int = Field(multiple_of=5, gt=12)

    class Drawing(BaseModel):
        model_config = ConfigDict(extra="forbid")
        shapes: List[Union[Circle, Square]]
        main: Union[Circle, Square, None] = None
        code: str = Field(pattern=r"^[A-Z]{2}-\d{3}$")
        slug: str = Field(pattern=r"^[a-z0-9]+(?:-[a-z0-9]+)*$", max_length=20)
        colour: str = Field(pattern=r"^#[0-9a-fA-F]{6}$")
        version: Literal[1, 2] = 2  # novm

    class Comment(BaseModel):
        author: str = Field(alias="authorName", min_length=1)
        text: str
        replies: Optional[List["Comment"]] = None
        parent: Optional["Comment"] = None

    return [Person, Tree, Owner, Drawing, Comment, Address]


################################################################################
# Tests
################################################################################

@unittest.skipIf(jsonschema is None, "jsonschema not installed")
class SchemaCorpusTest(unittest.TestCase):
    def check(self, schema, text=SCHEMA_TEXT, as_json_schema=None):
        before = copy.deepcopy(schema)
        value = schema_instance(schema, text)
        self.assertEqual(before, schema, "schema_instance must not mutate its input")
        json.dumps(value)
        validate_instance(self, schema if as_json_schema is None else as_json_schema, value)
        return value

    def test_openai_strict(self):
        for schema in OPENAI_STRICT:
            with self.subTest(schema=json.dumps(schema)[:80]):
                self.check(schema)

    def test_zod_exports(self):
        for schema in ZOD:
            with self.subTest(schema=json.dumps(schema)[:80]):
                self.check(schema)

    def test_draft4_boolean_exclusives(self):
        value = self.check(DRAFT4[0])
        self.assertTrue(0 < value["ratio"] < 1)
        self.assertEqual(6, value["n"])
        self.assertEqual("hello", value["tuple"][1])

    def test_misc_keywords(self):
        for schema in MISC:
            with self.subTest(schema=json.dumps(schema)[:100]):
                self.check(schema)

    def test_gemini_response_schemas(self):
        for schema in GEMINI:
            with self.subTest(schema=json.dumps(schema)[:80]):
                self.check(schema, as_json_schema=gemini_to_json_schema(schema))

    def test_patterns(self):
        out, invalid = {}, set()
        for pattern in PATTERNS:
            for extra in ({}, {"minLength": 6}, {"maxLength": 12}):
                schema = dict({"type": "string", "pattern": pattern}, **extra)
                value = schema_instance(schema, SCHEMA_TEXT)
                self.assertIsInstance(value, str)
                if pattern.startswith("^\\p"):  # Python's re has no \p{..}: out of reach, only must not raise
                    continue
                python_pattern = pattern.replace("(?<year>", "(?P<year>").replace("(?<month>", "(?P<month>")
                cls = jsonschema.Draft202012Validator
                if cls(dict(schema, pattern=python_pattern), format_checker=cls.FORMAT_CHECKER).is_valid(value):
                    out[(pattern, tuple(extra))] = value
                else:
                    invalid.add((pattern, tuple(extra.items())))
        self.assertEqual(UNSATISFIABLE, invalid)
        self.assertEqual("dog", schema_instance({"type": "array", "uniqueItems": True, "minItems": 2,
                                                 "items": {"type": "string", "pattern": "^(cat|dog)$"}})[1])
        self.assertEqual("10", out[(r"^\+?[1-9]\d{1,14}$", ())])
        self.assertEqual("AAA-0000", out[(r"^[A-Z]{3}-\d{4}$", ())])
        self.assertEqual("cat", out[(r"^(cat|dog)$", ())])
        # a quantified group with a quantifier inside: the prompt is never matched against it (ReDoS)
        self.assertEqual("example", out[(r"^[a-z0-9]+(?:-[a-z0-9]+)*$", ())])
        self.assertEqual("example", out[(r"^[a-z0-9]+(?:-[a-z0-9]+)*$", ("minLength",))])
        self.assertEqual("Example123!", out[(r"^(?=.*\d)(?=.*[a-z]).{8,}$", ())])

    @unittest.skipIf(pydantic is None, "pydantic not installed")
    def test_pydantic_models(self):
        for model in pydantic_models():
            schema = model.model_json_schema()
            with self.subTest(model=model.__name__):
                value = self.check(schema)
                model.model_validate(value)  # pydantic itself accepts it
                value = self.check(model.model_json_schema(mode="serialization"), text="x" * 50)

    @unittest.skipIf(pydantic is None, "pydantic not installed")
    def test_pydantic_recursion_is_bounded(self):
        tree = [m for m in pydantic_models() if m.__name__ == "Tree"][0]
        value = schema_instance(tree.model_json_schema())
        depth = 0
        while value.get("children"):
            value = value["children"][0]
            depth += 1
        self.assertLessEqual(depth, 3)

    def test_garbage_that_happens_to_be_a_schema(self):
        for schema in ({"type": "integer", "minimum": 10, "maximum": 1}, {"type": "string", "pattern": "("},
                       {"$ref": "#/nope"}, {"$ref": "https://example.com/remote.json"}):
            json.dumps(schema_instance(schema))


class SchemaTextRuleTest(unittest.TestCase):
    def test_first_string_in_document_order(self):
        schema = {"type": "object", "properties": {"n": {"type": "integer"}, "meta": {
            "type": "object", "properties": {"id": {"type": "string"}}}, "name": {"type": "string"}}}
        self.assertEqual({"n": 1, "meta": {"id": "hi"}, "name": "example"}, schema_instance(schema, "hi"))

    def test_gemini_property_ordering(self):
        schema = {"type": "OBJECT", "properties": {"a": {"type": "STRING"}, "b": {"type": "STRING"}},
                  "propertyOrdering": ["b", "a"]}
        self.assertEqual(["b", "a"], list(schema_instance(schema, "hi")))
        self.assertEqual("hi", schema_instance(schema, "hi")["b"])
        schema["property_ordering"] = schema.pop("propertyOrdering")
        self.assertEqual("hi", schema_instance(schema, "hi")["b"])

    def test_adjusted_to_constraints(self):
        self.assertEqual("hel", schema_instance({"type": "string", "maxLength": 3}, "hello"))
        self.assertEqual("hixxx", schema_instance({"type": "string", "minLength": 5}, "hi"))
        self.assertEqual("hello", schema_instance({"type": "string", "pattern": "^h"}, "hello"))
        self.assertEqual("AAA", schema_instance({"type": "string", "pattern": "^[A-Z]{3}$"}, "hello"))
        self.assertEqual("user@example.com", schema_instance({"type": "string", "format": "email"}, "hello"))
        self.assertEqual("me@x.org", schema_instance({"type": "string", "format": "email"}, "me@x.org"))
        self.assertEqual("b", schema_instance({"enum": ["a", "b"]}, "b"))
        self.assertEqual("a", schema_instance({"enum": ["a", "b"]}, "zzz"))

    def test_text_is_consumed_once_even_when_it_does_not_fit(self):
        schema = {"type": "object", "properties": {"e": {"type": "string", "format": "email"},
                                                   "s": {"type": "string"}}}
        self.assertEqual({"e": "user@example.com", "s": "example"}, schema_instance(schema, "hello"))

    def test_const_is_not_a_string_field(self):
        schema = {"type": "object", "properties": {"kind": {"const": "cat"}, "name": {"type": "string"}}}
        self.assertEqual({"kind": "cat", "name": "hi"}, schema_instance(schema, "hi"))

    def test_arrays_unions_and_defaults(self):
        self.assertEqual(["hi"], schema_instance({"type": "array", "items": {"type": "string"}}, "hi"))
        self.assertEqual("hi", schema_instance({"anyOf": [{"type": "null"}, {"type": "string"}]}, "hi"))
        self.assertEqual("hi", schema_instance({"type": ["null", "string"]}, "hi"))
        self.assertEqual("hi", schema_instance({"type": "string", "default": "d"}, "hi"))
        two = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string", "default": "d"}}}
        self.assertEqual({"a": "hi", "b": "d"}, schema_instance(two, "hi"))
        self.assertEqual({"a": "example"}, schema_instance({"properties": {"a": {}}}))

    def test_no_string_anywhere(self):
        self.assertEqual({"n": 1, "f": True}, schema_instance(
            {"type": "object", "properties": {"n": {"type": "integer"}, "f": {"type": "boolean"}}}, "hi"))

    def test_determinism(self):
        schemas = OPENAI_STRICT + ZOD + MISC + GEMINI
        first = [schema_instance(s, "x") for s in schemas]
        self.assertEqual(first, [schema_instance(s, "x") for s in schemas])

    def test_determinism_across_processes(self):
        code = ("import json, sys; sys.path.insert(0, %r); import dpmock as g, test_dpmock as t; "
                "print(json.dumps([[g.schema_instance(s, 'q') for s in t.OPENAI_STRICT + t.MISC], "
                "g.embedding('the cat sat', 16)]))" % HERE)
        outs = set()
        for seed in ("0", "1", "12345"):
            env = dict(os.environ, PYTHONHASHSEED=seed)
            outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True).stdout)
        self.assertEqual(1, len(outs))


class SchemaGarbageTest(unittest.TestCase):
    def run_all(self, schemas):
        for schema in schemas:
            start = time.perf_counter()
            value = schema_instance(schema, SCHEMA_TEXT)
            json.dumps(value, default=str)
            self.assertLess(time.perf_counter() - start, 3.0, str(type(schema)))

    def test_never_raises(self):
        cyclic = {"type": "object", "properties": {}, "required": ["me"]}
        cyclic["properties"]["me"] = cyclic
        loop = {"allOf": []}
        loop["allOf"].append(loop)
        deep = {}
        node = deep
        for _ in range(3000):
            node["items"] = {}
            node = node["items"]
        self.run_all([
            None, 5, "string", [], [1, {}], False, True, {"type": 5}, {"type": "OBJECT", "properties": [1, 2]},
            {"$ref": 5}, {"$ref": "#/nope"}, {"$ref": "#"}, {"allOf": [{"$ref": "#"}, {"$ref": "#"}]},
            {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
            {"anyOf": []}, {"anyOf": 3}, {"oneOf": [False, False]}, {"type": "array", "minItems": 10 ** 9},
            {"type": "array", "minItems": "abc"}, {"type": "string", "minLength": 10 ** 12},
            {"type": "string", "pattern": "("}, {"pattern": "[z-a]"}, {"pattern": "a{5,2}"}, {"pattern": 5},
            {"type": "integer", "minimum": "x"}, {"type": "number", "multipleOf": 0}, {"multipleOf": -1},
            {"type": "number", "minimum": float("nan")}, {"minimum": float("inf")}, {"type": "integer",
                                                                                    "minimum": 10 ** 400},
            {"type": "number", "minimum": 1e308, "multipleOf": 1e-308}, {"enum": []}, {"enum": 5},
            {"type": "array", "items": 5}, {"type": "object", "required": "abc"},
            {"properties": {"a": False}, "required": ["a"]}, {"type": ["null"]}, {"not": {}},
            cyclic, loop, deep, {"type": "string", "pattern": "(a{1000}){1000}"}, {"pattern": "\\"},
            {"type": "string", "pattern": "((((((((((((((((((((((((((((((a))))))))))))))))))))))))))))))"},
            {"type": "array", "minItems": 1000, "items": {"type": "array", "minItems": 1000,
                                                           "items": {"type": "array", "minItems": 1000}}},
            {"type": "object", "minProperties": 10 ** 9}, {"type": "object", "minProperties": 5,
                                                          "additionalProperties": False},
            {"type": "object", "patternProperties": {"^a$": {}}, "minProperties": 5, "additionalProperties": False},
            {"$ref": "#/$defs/x", "$defs": {"x": {"type": "array", "minItems": 3, "items": {"$ref": "#/$defs/x"}}}},
            {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
            {"type": "integer", "enum": ["a"]}, {"items": [], "additionalItems": False, "minItems": 2},
        ])

    def test_huge_min_items_is_clamped(self):
        self.assertEqual(dpmock.MAX_ITEMS, len(schema_instance({"type": "array", "minItems": 10 ** 9})))

    def test_odd_texts(self):
        self.assertEqual("example", schema_instance({"type": "string"}, None))
        self.assertEqual("12", schema_instance({"type": "string"}, 12))


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


# ----------------------------------------------------------------------------- record and replay (issue 13)

REC_KEYS = {"openai": "sk-rec-OPENAI-0123456789", "anthropic": "sk-ant-rec-ANTHROPIC-0123456789",
            "gemini": "g-rec-GEMINI-0123456789"}
REC_OA = {"Authorization": "Bearer " + REC_KEYS["openai"]}
REC_AN = {"x-api-key": REC_KEYS["anthropic"], "anthropic-version": "2023-06-01"}
REC_GE = {"x-goog-api-key": REC_KEYS["gemini"]}
GEMINI_PATH = "/v1beta/models/gemini-2.5-flash:"


def rec_chat(text, stream=False, model="gpt-4o"):
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return dict(body, stream=True) if stream else body


def rec_messages(text, stream=False):
    body = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": text}]}
    return dict(body, stream=True) if stream else body


def rec_gemini(text):
    return {"contents": [{"role": "user", "parts": [{"text": text}]}]}


#: (name, path, headers, body): every provider, streamed and not, as the SDKs and the C library send them.
REC_REQUESTS = [
    ("chat", "/v1/chat/completions", dict(REC_OA, **{"X-DP-Strict": "0"}), rec_chat("Record chat")),
    ("chat_stream", "/v1/chat/completions", REC_OA, rec_chat("Record chat stream", True)),
    ("chat_bare", "/chat/completions", REC_OA, rec_chat("Record the C library's bare path")),
    ("messages", "/v1/messages", REC_AN, rec_messages("Record messages")),
    ("messages_stream", "/messages", REC_AN, rec_messages("Record messages stream", True)),
    ("gemini", GEMINI_PATH + "generateContent", REC_GE, rec_gemini("Record gemini")),
    ("gemini_sse", GEMINI_PATH + "streamGenerateContent?alt=sse&key=" + REC_KEYS["gemini"], {},
     rec_gemini("Record gemini sse")),
    ("gemini_array", GEMINI_PATH + "streamGenerateContent", REC_GE, rec_gemini("Record gemini array")),
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

    def test_record_command_prints_each_recording_one_file_per_test(self):
        up = self.server("-q")
        ups = ["%s=%s" % (p, up.url) for p in ("openai", "anthropic", "gemini")]
        rec = self.server("-q", "--upstream", *ups, sub=("record", self.dir))
        lines = LineReader(rec.proc.stdout)
        for test, path in (("t1", "/v1/chat/completions"), (None, "/_t/t2/v1/chat/completions"), (None, "/v1/chat/completions")):
            headers = dict(REC_OA, **({"X-DP-Test-Id": test} if test else {}))
            self.assertEqual(rec.request("POST", path, rec_chat("Per test"), headers)[0], 200)
            line = lines.next()
            self.assertRegex(line, r"^recorded POST /v1/chat/completions -> (.*) \(rule rec-[0-9a-f]{12}\)$")
            name = test or ("t2" if "/_t/" in path else "default")
            self.assertIn(" -> %s (" % os.path.join(self.dir, name + ".json"), line)
        self.assertEqual(sorted(os.listdir(self.dir)), ["default.json", "t1.json", "t2.json"])
        self.assertEqual((self.recordings("t1")["test"], self.recordings("t2")["test"]), ("t1", "t2"))
        self.assertNotIn("test", self.recordings())
        first = self.recordings("t1")
        self.assertEqual(rec.request("POST", "/v1/chat/completions", rec_chat("Per test"),
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
        replay.request("POST", "/v1/chat/completions", rec_chat("Per test"), dict(REC_OA, **{"X-DP-Test-Id": "t1"}))
        replay.request("POST", "/_t/t3/v1/chat/completions", rec_chat("Per test"), REC_OA)
        self.assertEqual([(e["test"], e["source"]) for e in self.journal(replay)], [("t1", "replayed"),
                                                                                    ("t3", "replayed")])
        self.assertEqual(self.journal(replay)[1]["rule"], self.recordings()["rules"][0]["id"])  # the global one

    def test_faults_apply_to_replayed_answers(self):
        up = self.server("-q")
        rec = self.recorder(up.url)
        for body in (rec_chat("Fault me", True), rec_chat("Fault me")):
            self.assertEqual(rec.request("POST", "/v1/chat/completions", body, REC_OA)[0], 200)
        up.stop()
        rec.stop()
        events = [e["data"].encode() for e in self.recordings()["rules"][0]["respond"]["raw"]["events"]]
        replay = self.server("-q", "--rules", self.dir)
        cut = replay.raw(raw_request("/v1/chat/completions", scen("STREAM_CUT; events=2", **REC_OA),
                                     rec_chat("Fault me", True), close=True))
        chunks, _ = decode_chunks(cut.partition(b"\r\n\r\n")[2], strict=False)
        self.assertEqual(chunks, events[:2])  # two recorded events, then the cut
        self.assertFalse(cut.endswith(b"0\r\n\r\n"))
        noend = replay.request("POST", "/v1/chat/completions", rec_chat("Fault me", True),
                               scen("STREAM_NO_END", **REC_OA))[2]
        self.assertEqual(noend, b"".join(events[:-1]))  # data: [DONE] dropped
        errored = replay.request("POST", "/v1/chat/completions", rec_chat("Fault me", True),
                                 scen("STREAM_ERROR; after=1", **REC_OA))[2]
        self.assertTrue(errored.startswith(events[0]) and b"server_error" in errored)
        st, _, half = replay.request("POST", "/v1/chat/completions", rec_chat("Fault me"),
                                     scen("INVALID_JSON_200", **REC_OA))
        whole = self.recordings()["rules"][1]["respond"]["raw"]["body"].encode()
        self.assertEqual((st, half), (200, whole[:len(whole) // 2]))
        with socket.create_connection((replay.host, replay.port), timeout=5) as s:
            s.sendall(raw_request("/v1/chat/completions", scen("RESET; after_bytes=40", **REC_OA),
                                  rec_chat("Fault me"), close=True))
            got = b""
            with self.assertRaises(ConnectionResetError):
                while True:
                    piece = s.recv(65536)
                    if not piece:
                        break
                    got += piece
        self.assertEqual(len(got), 40)
        self.assertEqual(replay.request("POST", "/v1/chat/completions", rec_chat("Fault me"),
                                        scen("RATE_LIMITED", **REC_OA))[0], 429)
        self.assertEqual([e["source"] for e in self.journal(replay)], ["replayed"] * 5 + ["dpmock"])

    def test_recorded_pace_when_asked(self):
        up = self.slow_upstream(tps=20)
        rec = self.recorder(up.url)
        self.assertEqual(rec.request("POST", "/v1/chat/completions", rec_chat("slow please", True), REC_OA)[0], 200)
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
                st, _, data = replay.request("POST", "/v1/chat/completions", rec_chat("slow please", True), REC_OA)
                took = time.monotonic() - t0
                self.assertEqual((st, data), (200, raw_body(raw)))
                self.assertTrue(low <= took <= high, (timing, took, span))
                replay.stop()

    def test_tls_upstream_verified_with_the_test_ca(self):
        up = self.server("-q", "--listen", "tls:0")
        url = "https://127.0.0.1:%d" % tls_port(up)
        rec = self.recorder(url, "--upstream-ca", CA)
        for path, headers, body in (("/v1/chat/completions", REC_OA, rec_chat("Over TLS", True)),
                                    ("/v1/messages", REC_AN, rec_messages("Over TLS")),
                                    (GEMINI_PATH + "streamGenerateContent?alt=sse", REC_GE, rec_gemini("Over TLS"))):
            st, _, data = rec.request("POST", path, body, headers)
            self.assertEqual(st, 200, data[:300])
        rules = self.recordings()["rules"]
        self.assertEqual([r["recorded"]["upstream"] for r in rules], [url] * 3)
        untrusted = self.server("-q", "--record", os.path.join(self.dir, "other"), "--upstream", "openai=" + url)
        st, _, data = untrusted.request("POST", "/v1/chat/completions", rec_chat("Over TLS"), REC_OA)
        err = json.loads(data)["error"]
        self.assertEqual((st, err["code"], err["type"]), (502, "upstream_unreachable", "server_error"))
        self.assertIn(url, err["message"])
        self.assertIn("certificate verify failed", err["message"])
        self.assertEqual(os.listdir(os.path.join(self.dir, "other")), [])

    def test_unreachable_upstream_is_a_502_in_each_providers_shape(self):
        url = "http://127.0.0.1:%d" % free_port()  # nothing listens there
        rec = self.recorder(url)
        st, _, data = rec.request("POST", "/v1/chat/completions", rec_chat("Anyone?"), REC_OA)
        err = json.loads(data)["error"]
        self.assertEqual((st, err["type"], err["code"]), (502, "server_error", "upstream_unreachable"))
        self.assertIn("the openai upstream %s cannot be reached" % url, err["message"])
        st, _, data = rec.request("POST", "/v1/messages", rec_messages("Anyone?"), REC_AN)
        body = json.loads(data)
        self.assertEqual((st, body["type"], body["error"]["type"]), (502, "error", "api_error"))
        self.assertIn(url, body["error"]["message"])
        st, _, data = rec.request("POST", GEMINI_PATH + "generateContent", rec_gemini("Anyone?"), REC_GE)
        err = json.loads(data)["error"]
        self.assertEqual((st, err["code"], err["status"]), (502, 502, "UNAVAILABLE"))
        self.assertEqual(os.listdir(self.dir), [])
        self.assertEqual({e["status"] for e in self.journal(rec)}, {502})

    def test_upstream_errors_are_relayed_and_recorded_only_when_asked(self):
        up = self.server("-q")
        body = rec_chat("No such model", model="gpt-does-not-exist")
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
        st, _, _ = rec.request("POST", "/v1/chat/completions", rec_chat("Limit me"), scen("RATE_LIMITED", **REC_OA))
        self.assertEqual(st, 429)
        cut = rec.raw(raw_request("/v1/chat/completions", scen("STREAM_CUT; events=1", **REC_OA),
                                  rec_chat("Cut me", True), close=True))
        self.assertFalse(cut.endswith(b"0\r\n\r\n"))
        self.assertEqual(self.journal(up), [])
        self.assertEqual(os.listdir(self.dir), [])

    def test_a_forwarding_loop_is_refused(self):
        port = free_port()
        rec = self.recorder("http://127.0.0.1:%d" % port, "--port", str(port))  # its own upstream
        st, _, data = rec.request("POST", "/v1/chat/completions", rec_chat("Loop"), REC_OA)
        self.assertEqual((st, json.loads(data)["error"]["code"]), (508, "forwarding_loop"))
        self.assertEqual([e["source"] for e in self.journal(rec)], ["upstream", "dpmock"])  # one hop, no more
        via = dict(self.journal(rec)[1]["headers"])["Via"]
        self.assertRegex(via, r"^1\.1 dpmock-[0-9a-f]{12}$")
        self.assertEqual(os.listdir(self.dir), [])

    def test_a_client_that_leaves_mid_stream_leaves_no_recording(self):
        up = self.slow_upstream(tps=10)
        rec = self.recorder(up.url)
        with socket.create_connection((rec.host, rec.port), timeout=5) as s:
            s.sendall(raw_request("/v1/chat/completions", REC_OA, rec_chat("slow please", True)))
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
        st, _, live = rec.request("POST", "/v1/chat/completions", rec_chat(prompt), REC_OA)
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
        st, _, data = replay.request("POST", "/v1/chat/completions", rec_chat(prompt), REC_OA)
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
        st, hdrs, data = SERVER.request("POST", "/v1/chat/completions", rec_chat("raw please"), headers)
        self.assertEqual((st, hdrs["content-type"], hdrs["x-extra"], data), (201, "text/plain", "1", b"as {{text}} is"))
        self.assertEqual(SERVER.request("POST", "/v1/chat/completions?v=1", rec_chat("raw please"), headers)[0], 200)
        self.assertEqual(SERVER.request("POST", "/v1/chat/completions", rec_chat("raw please!"), headers)[0], 200)
        events = ["data: {\"n\": %d}\n\n" % i for i in range(3)]
        cut = {"match": {"text_exact": "raw cut"}, "respond": {"scenario": "STREAM_CUT; events=1", "raw": {
            "status": 200, "headers": {"content-type": "text/event-stream"}, "events": [
                {"t": 0.001 * i, "data": e} for i, e in enumerate(events)]}}}
        self.assertEqual(SERVER.request("POST", "/_control/rules?test=rawtest", cut)[0], 200)
        got = SERVER.raw(raw_request("/v1/chat/completions", headers, rec_chat("raw cut", True), close=True))
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
            st, _, data = srv.request("POST", "/v1/chat/completions", rec_chat("paced", True),
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


# ----------------------------------------------------------------------------- packaging

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


# ----------------------------------------------------------------------------- vendoring, CLI and keys (issue 9)

SHIPPED = ("dpmock.py", "dpmockctl.py", "scenarios.py", "Makefile", "dpmocklib")  #: the README's required copy list


def vendored_copy(test, names=SHIPPED):
    """A temporary tests/mock-server/ holding those files; returns its path. Any daemon its Makefile
    started (its pid file) is killed at cleanup."""
    d = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, d, True)
    dest = os.path.join(d, "tests", "mock-server")
    os.makedirs(dest)
    for name in names:
        src = os.path.join(HERE, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name))
        else:
            shutil.copy(src, dest)
    test.addCleanup(kill_pidfile, os.path.join(dest, "dpmock.pid"))
    return dest


def make_env(env=None):
    """The environment for a make run: none of a calling make's flags (its -w would add "Entering
    directory" lines) nor variables the Makefile reads."""
    drop = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "ARGS", "URL", "HOST", "PORT", "PIDFILE", "LOGFILE",
            "ENVFILE")
    return {k: v for k, v in (os.environ if env is None else env).items() if k not in drop}


def pid_of(pidfile):
    with open(pidfile) as f:
        return int(f.read())


def lines_of(data):
    """Output lines, without make's own 'make: ...' lines."""
    return [line for line in data.decode().splitlines() if not line.startswith(("make:", "make["))]


class CliRangeTest(unittest.TestCase):

    def test_negative_values_name_the_valid_range(self):
        for args, valid in ((["--port", "-1"], "from 0 to 65535"), (["--idle-exit", "-5"], "from 0 to"),
                            (["--journal-size", "-1"], "from 0 to 1000000"), (["--parent-pid", "-3"], "from 0"),
                            (["--port=-1"], "from 0 to 65535")):
            r = run([PY, DPMOCK] + args)
            err = r.stderr.decode()
            self.assertEqual(r.returncode, 2, args)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertIn(valid, err)
            self.assertIn(repr(args[-1].split("=")[-1]), err)
            self.assertNotIn("needs a value", err)
        r = run([PY, DPMOCK, "--port", "--foreground"])  # an option is still not a value
        self.assertEqual(r.returncode, 2)
        self.assertIn("--port needs a value", r.stderr.decode())

    def test_old_python_gets_one_line_and_exit_2(self):
        # No 3.7 here: run the script as __main__ with sys.version_info patched as 3.7 would have it.
        wrapper = ("import runpy, sys\n"
                   "sys.version_info = (3, 7, 17, 'final', 0)\n"
                   "sys.argv = [%r, '--port', '0']\n"
                   "runpy.run_path(%r, run_name='__main__')\n" % (DPMOCK, DPMOCK))
        r = run([PY, "-c", wrapper])
        self.assertEqual((r.returncode, r.stdout), (2, b""))
        self.assertEqual(r.stderr.decode(), "dpmock needs Python 3.8 or newer (this is 3.7)\n")
        import ast
        import glob
        for path in [DPMOCK] + glob.glob(os.path.join(HERE, "dpmocklib", "*.py")):  # 3.7 compiles them: gets that far
            with open(path, encoding="utf-8") as f:
                ast.parse(f.read(), path, feature_version=(3, 7))

    def test_scripts_are_executable(self):
        for name in ("dpmock.py", "dpmockctl.py"):
            self.assertTrue(os.access(os.path.join(HERE, name), os.X_OK), name)
        r = run(["git", "-C", HERE, "ls-files", "-s", "dpmock.py", "dpmockctl.py"]) if shutil.which("git") else None
        if r is not None and r.returncode == 0 and r.stdout:
            self.assertEqual([line.split()[0] for line in r.stdout.decode().splitlines()], ["100755"] * 2)
        r = run([os.path.join(HERE, "dpmockctl.py"), "--version"])
        self.assertEqual(r.returncode, 0, r.stderr)


class RefuseKeyTest(unittest.TestCase):

    def status_for(self, srv, key):
        return srv.request("POST", "/v1/chat/completions", chat_body(), {"Authorization": "Bearer " + key})[0]

    def test_default_refuses_only_dummy_key_and_invalid(self):
        for key, status in (("dummy_key", 401), ("invalid-key", 401), ("invalid", 401), ("dummy", 200),
                            ("dummy-key", 200), ("dummy_key2", 200), ("sk-dummy", 200), ("sk-test", 200)):
            self.assertEqual(self.status_for(SERVER, key), status, key)
        st, _, data = SERVER.request("POST", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 8,
                                                              "messages": [{"role": "user", "content": "hi"}]},
                                     {"x-api-key": "dummy", "anthropic-version": "2023-06-01"})
        self.assertEqual(st, 200, data)

    def test_refuse_key_is_repeatable_and_survives_restart(self):
        srv = Server("--refuse-key", "sk-bad", "--refuse-key=placeholder")
        self.addCleanup(srv.stop)
        for _ in range(2):
            for key, status in (("sk-bad-1", 401), ("placeholder", 401), ("dummy_key", 401), ("invalid-x", 401),
                                ("sk-good", 200)):
                self.assertEqual(self.status_for(srv, key), status, key)
            r = run([PY, DPMOCKCTL, "restart", "--url", srv.url])
            self.assertEqual(r.returncode, 0, r.stderr)
        config = dpmock.parse_args(["--refuse-key", "a", "--refuse-key", "b"])
        self.assertEqual(dpmock.parse_args(config.to_argv()).refuse_keys, ("a", "b"))
        for args in (["--refuse-key"], ["--refuse-key="]):
            r = run([PY, DPMOCK] + args)
            self.assertEqual(r.returncode, 2, args)
            self.assertEqual(len(r.stderr.decode().strip().splitlines()), 1)


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
        r = run([PY, DPMOCKCTL, "restart", "--url", url, "--timeout", "10"])
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
        self.assertEqual(run([PY, DPMOCKCTL, "restart", "--url", url]).returncode, 1)
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


class CtlCommandsTest(unittest.TestCase):

    def ctl(self, *args, **kw):
        return run([PY, DPMOCKCTL] + list(args), **kw)

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


def _handshake(server_cert, server_key, cafile, name):
    """Verify ``server_cert`` as ``name`` against ``cafile`` only; None if accepted, else the verify message."""
    import ssl
    a, b = socket.socketpair()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server_cert, server_key)
    client_ctx = ssl.create_default_context(cafile=cafile)

    def serve():
        try:
            with server_ctx.wrap_socket(a, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass
    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=name):
            return None
    except ssl.SSLCertVerificationError as e:
        return e.verify_message
    finally:
        b.close()
        a.close()
        t.join(10)


class CertsTest(unittest.TestCase):

    def test_shipped_ca_is_name_constrained_and_its_key_not_shipped(self):
        import base64
        with open(CA) as f:
            der = base64.b64decode("".join(line for line in f.read().splitlines() if not line.startswith("-----")))
        self.assertIn(b"\x06\x03\x55\x1d\x1e\x01\x01\xff", der)  # id-ce-nameConstraints, critical TRUE
        for name in dpmock.SANDBOX_HOSTS + ("localhost",):
            self.assertIn(name.encode(), der)
        self.assertIn(bytes([127, 0, 0, 0, 255, 0, 0, 0]), der)  # 127.0.0.0/8
        self.assertIn(bytes(15) + b"\x01" + b"\xff" * 16, der)  # ::1/128
        if shutil.which("openssl"):
            text = run(["openssl", "x509", "-in", CA, "-noout", "-text"]).stdout.decode()
            self.assertIn("X509v3 Name Constraints: critical", text)
        if shutil.which("git") and run(["git", "-C", HERE, "rev-parse"]).returncode == 0:
            self.assertEqual(run(["git", "-C", HERE, "ls-files", "certs/ca.key"]).stdout, b"")
            self.assertEqual(run(["git", "-C", HERE, "check-ignore", "-q", "certs/ca.key"]).returncode, 0)
        self.assertIsNone(_handshake(os.path.join(HERE, "certs", "server.pem"),
                                     os.path.join(HERE, "certs", "server.key"), CA, "api.openai.com"))

    @unittest.skipUnless(shutil.which("openssl") and shutil.which("make"), "the openssl command is not installed")
    def test_make_certs_ca_refuses_to_vouch_for_other_names(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        os.makedirs(os.path.join(d, "certs"))
        shutil.copy(os.path.join(HERE, "Makefile"), d)
        shutil.copy(os.path.join(HERE, "certs", "server.ext"), os.path.join(d, "certs"))
        r = run(["make", "-s", "certs"], cwd=d, env=make_env())
        self.assertEqual(r.returncode, 0, r.stderr)
        c = os.path.join(d, "certs")
        ca, ca_key = os.path.join(c, "ca.pem"), os.path.join(c, "ca.key")
        for name in ("api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com", "localhost",
                     "127.0.0.1", "::1"):
            self.assertIsNone(_handshake(os.path.join(c, "server.pem"), os.path.join(c, "server.key"), ca, name))
        # A certificate for another name, properly signed by that same CA: refused for the constraint.
        evil_key, evil_csr, evil_pem, ext = (os.path.join(c, n) for n in ("evil.key", "evil.csr", "evil.pem",
                                                                            "evil.ext"))
        with open(ext, "w") as f:
            f.write("basicConstraints = critical, CA:FALSE\nextendedKeyUsage = serverAuth\n"
                    "subjectAltName = DNS:evil.example, IP:10.1.2.3\n")
        for cmd in (["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", evil_key, "-out", evil_csr,
                     "-subj", "/CN=evil.example"],
                    ["openssl", "x509", "-req", "-in", evil_csr, "-CA", ca, "-CAkey", ca_key, "-set_serial", "7",
                     "-days", "2", "-extfile", ext, "-out", evil_pem]):
            r = run(cmd)
            self.assertEqual(r.returncode, 0, r.stderr)
        for name in ("evil.example", "10.1.2.3"):
            why = _handshake(evil_pem, evil_key, ca, name)
            self.assertIsNotNone(why, name)
            self.assertIn("permitted subtree violation", why)


@unittest.skipUnless(_sandbox_available(), "user/mount/network namespaces are not available here")
class SandboxPortTest(unittest.TestCase):

    def test_port_0_exports_the_real_port(self):
        script = ("import http.client, json, os\n"
                  "url = os.environ['DP_MOCK_SERVER']\n"
                  "host, port = url[7:].rsplit(':', 1)\n"
                  "c = http.client.HTTPConnection(host, int(port), timeout=5)\n"
                  "c.request('GET', '/_control/status')\n"
                  "print(url, json.loads(c.getresponse().read())['url'])\n")
        r = run([PY, DPMOCK, "sandbox", "--port", "0", "--", PY, "-c", script], timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        exported, served = r.stdout.decode().split()
        self.assertEqual(exported, served)
        self.assertNotEqual(exported, "http://127.0.0.1:8080")


# ----------------------------------------------------------------------------- runner

class _Result(unittest.TextTestResult):
    """Counts tests, not subtests: a test with any failing subtest is one failure."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.failed_ids = set()

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self.failed_ids.add(test.id())

    def addError(self, test, err):
        super().addError(test, err)
        self.failed_ids.add(test.id())

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            self.failed_ids.add(test.id())

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self.failed_ids.add(test.id())


def main():
    """unittest's own command line (-v, -q, -k PATTERN, -f, test names), then one summary line."""
    runner = unittest.TextTestRunner(resultclass=_Result, verbosity=2)
    prog = unittest.main(module=sys.modules[__name__], argv=sys.argv, exit=False, testRunner=runner)
    result = prog.result
    failed = len(result.failed_ids)
    skipped = len(result.skipped)
    passed = max(0, result.testsRun - failed - skipped)
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped))
    return 1 if failed or not result.testsRun else 0


if __name__ == "__main__":
    sys.exit(main())
