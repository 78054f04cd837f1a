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

    def test_the_clouds_hosts_are_answered_too(self):
        script = ("import json, ssl, http.client\n"
                  "def post(host, path, body, headers):\n"
                  "    c = http.client.HTTPSConnection(host, 443, timeout=10, context=ssl.create_default_context())\n"
                  "    c.request('POST', path, json.dumps(body), headers)\n"
                  "    return json.loads(c.getresponse().read())\n"
                  "said = {'role': 'user', 'content': [{'text': 'hi bedrock'}]}\n"
                  "r = post('bedrock-runtime.eu-west-3.amazonaws.com', '/model/anthropic.claude-x-v1%3A0/converse',\n"
                  "         {'messages': [said]}, {'Authorization': 'AWS4-HMAC-SHA256 Credential=AK/20261204/eu-west-3/'\n"
                  "                                               'bedrock/aws4_request, SignedHeaders=host, Signature=0'})\n"
                  "print(r['output']['message']['content'][0]['text'])\n"
                  "r = post('us-east5-aiplatform.googleapis.com', '/v1/projects/p/locations/us-east5/publishers/'\n"
                  "         'google/models/gemini-2.5-flash:generateContent',\n"
                  "         {'contents': [{'role': 'user', 'parts': [{'text': 'hi vertex'}]}]}, {'Authorization': 'Bearer t'})\n"
                  "print(r['candidates'][0]['content']['parts'][0]['text'])\n"
                  "r = post('my-res.openai.azure.com', '/openai/deployments/gpt/chat/completions?api-version=2024-10-21',\n"
                  "         {'messages': [{'role': 'user', 'content': 'hi azure'}]}, {'api-key': 'k'})\n"
                  "print(r['choices'][0]['message']['content'])\n")
        r = self.sandbox(PY, "-c", script, options=["--sandbox-host", "my-res.openai.azure.com"])
        self.assertEqual((r.returncode, r.stdout.decode().splitlines()), (0, [
            "dpmock reply to: hi bedrock", "dpmock reply to: hi vertex", "dpmock reply to: hi azure"]), r.stderr)

    def test_a_host_its_certificate_does_not_name_is_refused(self):
        for host in ("example.com", "evil.openai.azure.com.example.com", ""):
            r = run([PY, DPMOCK, "sandbox", "--sandbox-host", host, "--", "true"])
            self.assertEqual(r.returncode, 2, host)
            self.assertEqual(len(r.stderr.decode().strip().splitlines()), 1)
            self.assertIn("--sandbox-host", r.stderr.decode())

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
