"""TLS listeners and the test certificates."""

import http.client
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import unittest

import dpmock
from dpmocklib.sandbox import cert_config

from .support import (CA, DPMOCK, HERE, OA, PY, Server, make_env, recv_all, run, split_response, tls_port,
    vendored_copy)


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
        for name in dpmock.SANDBOX_HOSTS + ("localhost",):  # each permitted (Azure's resources: their domain)
            self.assertIn(("openai.azure.com" if name.endswith(".openai.azure.com") else name).encode(), der)
        self.assertIn(bytes([127, 0, 0, 0, 255, 0, 0, 0]), der)  # 127.0.0.0/8
        self.assertIn(bytes(15) + b"\x01" + b"\xff" * 16, der)  # ::1/128
        if shutil.which("openssl"):
            text = run(["openssl", "x509", "-in", CA, "-noout", "-text"]).stdout.decode()
            self.assertIn("X509v3 Name Constraints: critical", text)
        if shutil.which("git") and run(["git", "-C", HERE, "rev-parse"]).returncode == 0:
            self.assertEqual(run(["git", "-C", HERE, "ls-files", "certs/ca.key"]).stdout, b"")
            self.assertEqual(run(["git", "-C", HERE, "check-ignore", "-q", "certs/ca.key"]).returncode, 0)
        for name in dpmock.SANDBOX_HOSTS + ("my-resource.openai.azure.com", "localhost", "127.0.0.1"):
            self.assertIsNone(_handshake(os.path.join(HERE, "certs", "server.pem"),
                                         os.path.join(HERE, "certs", "server.key"), CA, name), name)
        with open(os.path.join(HERE, "certs", "server.ext")) as f:
            self.assertEqual(f.read(), cert_config("ext"), "certs/ is stale: make certs")

    @unittest.skipUnless(shutil.which("openssl") and shutil.which("make"), "the openssl command is not installed")
    def test_make_certs_ca_refuses_to_vouch_for_other_names(self):
        d = vendored_copy(self, ("Makefile", "dpmocklib", "scenarios.py"))  # the names come from dpmocklib
        os.makedirs(os.path.join(d, "certs"))
        r = run(["make", "-s", "certs"], cwd=d, env=make_env())
        self.assertEqual(r.returncode, 0, r.stderr)
        c = os.path.join(d, "certs")
        ca, ca_key = os.path.join(c, "ca.pem"), os.path.join(c, "ca.key")
        for name in ("api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com", "localhost",
                     "127.0.0.1", "::1", "bedrock-runtime.eu-west-3.amazonaws.com", "x.openai.azure.com"):
            self.assertIsNone(_handshake(os.path.join(c, "server.pem"), os.path.join(c, "server.key"), ca, name))
        # A certificate for another name, properly signed by that same CA: refused for the constraint.
        evil_key, evil_csr, evil_pem, ext = (os.path.join(c, n) for n in ("evil.key", "evil.csr", "evil.pem",
                                                                            "evil.ext"))
        with open(ext, "w") as f:  # names near the permitted ones too
            f.write("basicConstraints = critical, CA:FALSE\nextendedKeyUsage = serverAuth\n"
                    "subjectAltName = DNS:evil.example, DNS:storage.googleapis.com, DNS:s3.us-east-1.amazonaws.com, "
                    "DNS:azure.com, IP:10.1.2.3\n")
        for cmd in (["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", evil_key, "-out", evil_csr,
                     "-subj", "/CN=evil.example"],
                    ["openssl", "x509", "-req", "-in", evil_csr, "-CA", ca, "-CAkey", ca_key, "-set_serial", "7",
                     "-days", "2", "-extfile", ext, "-out", evil_pem]):
            r = run(cmd)
            self.assertEqual(r.returncode, 0, r.stderr)
        for name in ("evil.example", "storage.googleapis.com", "s3.us-east-1.amazonaws.com", "azure.com",
                     "10.1.2.3"):
            why = _handshake(evil_pem, evil_key, ca, name)
            self.assertIsNotNone(why, name)
            self.assertIn("permitted subtree violation", why)
