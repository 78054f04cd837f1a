#!/usr/bin/env python3
"""dpmock tests: standard-library unittest, over real sockets, against real server processes.

Every server is started on port 0 and stopped by the test that started it, even on failure.
Run: python3 test_dpmock.py (ends with one line "N passed, N failed, N skipped").
"""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from http.server import BaseHTTPRequestHandler, HTTPServer

import dpmock
import scenarios
from scenarios import Reply, Stream, Upload

HERE = os.path.dirname(os.path.abspath(__file__))
DPMOCK = os.path.join(HERE, "dpmock.py")
DPMOCKCTL = os.path.join(HERE, "dpmockctl.py")
PY = sys.executable
CURL = shutil.which("curl")
MIB = 1024 * 1024


# ----------------------------------------------------------------------------- helpers

class Server:
    """A dpmock process in the foreground on a free port; stop() always reaps it."""

    def __init__(self, *args, logfile=None):
        self.logfile = logfile
        cmd = [PY, DPMOCK, "--foreground", "--port", "0"] + list(args)
        if logfile:
            cmd += ["--logfile", logfile]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=HERE)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("DP_MOCK_SERVER="):
            self.stop()
            raise RuntimeError("dpmock did not start: %r %r" % (line, self.proc.stderr.read()))
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
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()
        return self.proc.returncode

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
        body, rest = dechunk(rest)
    else:
        n = int(headers.get("content-length", "0"))
        body, rest = rest[:n], rest[n:]
    return status, headers, body, rest


def dechunk(data):
    """Strictly decode a chunked body; returns (payload, bytes after the final chunk)."""
    out = b""
    while True:
        line, sep, data = data.partition(b"\r\n")
        assert sep, "chunk size line not terminated"
        size = int(line, 16)
        if size == 0:
            assert data.startswith(b"\r\n"), "final chunk not followed by CRLF"
            return out, data[2:]
        out += data[:size]
        assert data[size:size + 2] == b"\r\n", "chunk not followed by CRLF"
        data = data[size + 2:]


def chunks_of(data):
    """The individual chunk payloads of a chunked body (each SSE event is one chunk)."""
    out = []
    while True:
        line, _, data = data.partition(b"\r\n")
        size = int(line, 16)
        if size == 0:
            return out
        out.append(data[:size])
        data = data[size + 2:]


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
    "gemini_generate": ("POST", "/models/gemini-2.5-flash:generateContent"),
    "gemini_count_tokens": ("POST", "/models/gemini-2.5-flash:countTokens"),
    "messages": ("POST", "/messages"),
    "messages_count_tokens": ("POST", "/messages/count_tokens"),
    "models": ("GET", "/models"),
    "files": ("POST", "/files"),
    "gemini_upload": ("POST", "/files:upload"),
}


def key_headers(route, key):
    """Put the key where the C library puts it for that provider."""
    if route in ("messages", "messages_count_tokens"):
        return {"x-api-key": key, "anthropic-version": "2023-06-01"}
    return {"Authorization": "Bearer " + key}


SERVER = None


def setUpModule():
    global SERVER
    SERVER = Server("-q")


def tearDownModule():
    if SERVER:
        SERVER.stop()


# ----------------------------------------------------------------------------- contract

class ContractTest(unittest.TestCase):
    """Every route x prefix x scenario answers exactly as the Flask mock did."""

    def expected(self, route, name, nbytes):
        value = scenarios.answer(name, route) if name else None
        if value is None:
            value = scenarios.NO_SCENARIO[route]
        if isinstance(value, Upload):
            value = scenarios.upload_reply(value, nbytes)
        return value

    def test_every_route_prefix_and_scenario(self):
        for route, (method, path) in ROUTE_PATHS.items():
            for prefix in dpmock.PREFIXES:
                for name in [None] + scenarios.names():
                    body = None if method == "GET" else (b"hello" if route in ("files", "gemini_upload") else b"{}")
                    headers = key_headers(route, name or "sk-ordinary")
                    with self.subTest(route=route, prefix=prefix, scenario=name):
                        status, hdrs, data = SERVER.request(method, prefix + path, body, headers)
                        want = self.expected(route, name, len(body or b""))
                        if isinstance(want, Stream):
                            self.assertEqual(status, 200)
                            self.assertEqual(hdrs["content-type"], "text/event-stream; charset=utf-8")
                            self.assertEqual(hdrs["transfer-encoding"], "chunked")
                            got = sse_events(data)
                            self.assertEqual([e for e, _ in got][:len(want.events)], [e.event for e in want.events])
                        else:
                            self.assertEqual(status, want.status)
                            self.assertEqual(hdrs["content-type"], want.content_type)
                            if isinstance(want.body, str):
                                self.assertEqual(data.decode(), want.body)
                            else:
                                self.assertEqual(json.loads(data), want.body)

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
            ("POST", "/chat/completions", {"Authorization": "Bearer sk-nothing"}, b"{}", 400,
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
        parts = chunks_of(raw.partition(b"\r\n\r\n")[2])
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
        parts = chunks_of(raw.partition(b"\r\n\r\n")[2])
        self.assertEqual(len(parts), 7)
        for p in parts:
            self.assertTrue(p.startswith(b"event: ") and p.endswith(b"\n\n"), p)


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

    def test_http10_closes_by_default(self):
        raw = SERVER.raw(b"GET /v1/models HTTP/1.0\r\nAuthorization: Bearer EMPTY_LIST\r\n\r\n")
        st, hdrs, _, rest = split_response(raw)
        self.assertEqual((st, hdrs["connection"], rest), (200, "close", b""))


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
            b"POST /files HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc",  # mid chunk
            b"POST /messages HTTP/1.1\r\nx-api-key: STREAM_PING_ANTHROPIC\r\nContent-Length: 2\r\n\r\n{}",
        ]
        for data in sends:
            s = socket.create_connection(addr)
            s.sendall(data)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # reset on close
            s.close()
        # Mid-stream: read the headers of an abrupt stream, then reset.
        s = socket.create_connection(addr)
        s.sendall(b"POST /chat/completions HTTP/1.1\r\nAuthorization: Bearer ABRUPT_STREAM\r\n"
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
        r = run([PY, DPMOCK, "--port", "99999"])
        self.assertEqual(r.returncode, 2)
        self.assertNotIn(b"Traceback", r.stderr)

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
                r = run([PY, DPMOCKCTL, "restart", "--url", url])
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

    def test_foreground_sigint_stops_cleanly(self):
        srv = Server()
        self.addCleanup(srv.stop)
        srv.proc.send_signal(signal.SIGINT)
        self.assertEqual(srv.proc.wait(10), 0)
        self.assertNotIn(b"Traceback", srv.proc.stderr.read())

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
        self.assertEqual(self.ctl("explode").returncode, 2)
        self.assertEqual(self.ctl("status", "--url", "ftp://x").returncode, 2)


# ----------------------------------------------------------------------------- packaging

class CatalogueTest(unittest.TestCase):

    def test_readme_scenario_table_is_generated(self):
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            self.assertIn(scenarios.markdown_table(), f.read())

    def test_scenario_routes_exist(self):
        names = {r.name for r in dpmock.ROUTES}
        for s in scenarios.SCENARIOS.values():
            for route, value in s.routes.items():
                self.assertIn(route, names, s.name)
                self.assertIsInstance(value, (Reply, Stream, Upload))
        for route in scenarios.NO_SCENARIO:
            self.assertIn(route, names)
        scenario_routes = {r.name for r in dpmock.ROUTES if r.handler == "handle_scenario_route"}
        self.assertEqual(scenario_routes, set(scenarios.NO_SCENARIO))
        self.assertEqual(set(ROUTE_PATHS), scenario_routes)

    def test_vendored_makefile(self):
        with tempfile.TemporaryDirectory() as d:
            dest = os.path.join(d, "tests", "mock-server")
            os.makedirs(dest)
            for name in ("dpmock.py", "dpmockctl.py", "scenarios.py", "Makefile"):
                shutil.copy(os.path.join(HERE, name), dest)
            pidfile = os.path.join(dest, "dpmock.pid")
            self.addCleanup(kill_pidfile, pidfile)
            r = run(["make", "-s", "-C", os.path.join(d, "tests"), "-f", "mock-server/Makefile", "start",
                     "PORT=0"])
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn(b"DP_MOCK_SERVER=http://127.0.0.1:", r.stdout)
            r = run(["make", "-s", "-C", dest, "status"])
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(json.loads(r.stdout)["status"], "running")
            r = run(["make", "-s", "-C", dest, "stop"])
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertFalse(os.path.exists(pidfile))


# ----------------------------------------------------------------------------- runner

def main():
    loader = unittest.TestLoader()
    names = sys.argv[1:]
    suite = loader.loadTestsFromNames(names, sys.modules[__name__]) if names else \
        loader.loadTestsFromModule(sys.modules[__name__])
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
