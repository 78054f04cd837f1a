"""HTTP/1.1 behaviour: framing, keep-alive, errors, clients that leave, exposure, curl."""

import json
import os
import shutil
import socket
import tempfile
import textwrap
import threading
import time
import unittest

from dpmocklib.base import scenarios
import dpmock

from .support import (AN, CURL, DPMOCK, GE, MIB, OA, PY, SERVER, Server, _sandbox_available, chat_body,
    decode_chunks, jpost, post_raw, raw_request, recv_all, run, scen, split_response)


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
