"""The offline sandbox (network namespaces, the providers' hosts answered by dpmock)."""

import json
import os
import unittest

from dpmocklib.base import scenarios

from .support import CURL, DPMOCK, PY, _sandbox_available, run


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
