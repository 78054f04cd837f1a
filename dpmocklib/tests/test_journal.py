"""The journal: what was asked, filters, waiting for requests, bounded size, parallel clients."""

import json
import os
import re
import socket
import threading
import time
import unittest

import dpmock

from .support import AN, ANTHROPIC_BODY, OA, Server, chat_body, raw_request, scen


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
            self.srv.request("POST", "/v1/messages", json.dumps(ANTHROPIC_BODY).encode(), AN)
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
