"""Batches: OpenAI's Batch API over a JSONL input file, its requests answered by the same engine and rules as
direct calls, its pace and end chosen by scenarios; the official SDK where it is installed."""

import importlib
import io
import json
import time
import unittest

from .support import AN, GE, OA, Server, _have


RULE = {"id": "greet", "match": {"text": "hello"}, "respond": {"text": "Hi from a rule"}}


def chat_line(custom_id, text, model="gpt-4o"):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": text}]}}


def jsonl(lines):
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


def upload(srv, data, purpose="batch", headers=OA):
    body = (b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n' + purpose.encode() +
            b'\r\n--B\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
            b'Content-Type: application/jsonl\r\n\r\n' + data + b"\r\n--B--\r\n")
    st, _, r = srv.request("POST", "/v1/files", body, dict(headers, **{"Content-Type": "multipart/form-data; "
                                                                                        "boundary=B"}))
    assert st == 200, r
    return json.loads(r)


class BatchCase(unittest.TestCase):
    """One server for the class, with RULE loaded."""

    @classmethod
    def setUpClass(cls):
        cls.srv = Server("-q")
        st, _, body = cls.srv.request("POST", "/_control/rules", json.dumps(RULE).encode())
        assert st == 200, body

    @classmethod
    def tearDownClass(cls):
        cls.srv.stop()

    def call(self, method, path, body=None, headers=OA):
        st, hdrs, data = self.srv.request(method, path, json.dumps(body).encode() if body is not None else None,
                                          dict(headers, **({"Content-Type": "application/json"} if body else {})))
        return st, json.loads(data) if data[:1] in (b"{", b"[") else data


class BatchTest(BatchCase):
    """/v1/batches over raw HTTP."""

    def create(self, file_id, scenario=None, endpoint="/v1/chat/completions", headers=OA):
        headers = dict(headers, **({"X-DP-Scenario": scenario} if scenario else {}))
        st, batch = self.call("POST", "/v1/batches", {"input_file_id": file_id, "endpoint": endpoint,
                                                      "completion_window": "24h", "metadata": {"run": "t"}}, headers)
        self.assertEqual(st, 200, batch)
        return batch

    def content(self, file_id):
        st, hdrs, data = self.srv.request("GET", "/v1/files/%s/content" % file_id, None, OA)
        self.assertEqual((st, hdrs["content-type"]), (200, "application/jsonl"), data)
        return [json.loads(line) for line in data.decode().splitlines()]

    def test_a_batch_answers_each_line_as_a_direct_call_would(self):
        f = upload(self.srv, jsonl([chat_line("a", "hello there"), chat_line("b", "what else"),
                                    chat_line("c", "x", model="gpt-does-not-exist")]))
        self.assertEqual((f["purpose"], "expires_at" in f, "status_details" in f), ("batch", False, False))
        batch = self.create(f["id"])
        self.assertEqual((batch["status"], batch["object"], batch["metadata"]), ("validating", "batch", {"run": "t"}))
        st, batch = self.call("GET", "/v1/batches/" + batch["id"])
        self.assertEqual((batch["status"], batch["request_counts"]), ("completed", {"total": 3, "completed": 2,
                                                                                    "failed": 1}))
        self.assertLessEqual(batch["created_at"], batch["completed_at"])
        out = {line["custom_id"]: line for line in self.content(batch["output_file_id"])}
        self.assertEqual(out["a"]["response"]["body"]["choices"][0]["message"]["content"], "Hi from a rule")
        st, direct = self.call("POST", "/v1/chat/completions", chat_line("b", "what else")["body"])
        self.assertEqual(out["b"]["response"]["body"]["choices"][0]["message"]["content"],
                         direct["choices"][0]["message"]["content"])
        self.assertEqual((out["b"]["response"]["status_code"], out["b"]["error"]), (200, None))
        errors = self.content(batch["error_file_id"])
        self.assertEqual([(e["custom_id"], e["response"]["status_code"], e["response"]["body"]["error"]["code"])
                          for e in errors], [("c", 404, "model_not_found")])
        st, meta = self.call("GET", "/v1/files/" + batch["output_file_id"])
        self.assertEqual((meta["purpose"], meta["expires_at"] > meta["created_at"]), ("batch_output", True))
        newer = self.create(f["id"])
        st, listing = self.call("GET", "/v1/batches?limit=1")
        self.assertEqual((listing["object"], [b["id"] for b in listing["data"]], listing["has_more"]),
                         ("list", [newer["id"]], True))
        st, listing = self.call("GET", "/v1/batches?limit=1&after=" + newer["id"])
        self.assertEqual([b["id"] for b in listing["data"]], [batch["id"]])
        st, again = self.call("POST", "/v1/batches/%s/cancel" % batch["id"])
        self.assertEqual(st, 409)

    def test_each_tests_batches_use_its_rules(self):
        f = upload(self.srv, jsonl([chat_line("a", "ping")]))
        headers = dict(OA, **{"X-DP-Test-Id": "batch-rules"})
        rule = {"match": {"text": "ping"}, "respond": {"text": "pong for this test"}}
        self.assertEqual(self.srv.request("POST", "/_control/rules", json.dumps(rule).encode(), headers)[0], 200)
        batch = self.create(f["id"], headers=headers)
        st, batch = self.call("GET", "/v1/batches/" + batch["id"], headers=headers)
        line = self.content(batch["output_file_id"])[0]
        self.assertEqual(line["response"]["body"]["choices"][0]["message"]["content"], "pong for this test")
        st, listing = self.call("GET", "/v1/batches", headers=headers)
        self.assertEqual([b["id"] for b in listing["data"]], [batch["id"]])  # the test's own batches

    def test_the_input_is_checked_as_the_real_service_checks_it(self):
        bad = jsonl(["{not json", chat_line("a", "x"), chat_line("a", "y"),
                     dict(chat_line("c", "z"), url="/v1/embeddings"), dict(chat_line("d", "w"), method="GET"),
                     {"custom_id": "e", "method": "POST", "url": "/v1/chat/completions"}])
        batch = self.create(upload(self.srv, bad)["id"])
        st, batch = self.call("GET", "/v1/batches/" + batch["id"])
        self.assertEqual((batch["status"], batch["output_file_id"]), ("failed", None))
        self.assertEqual([(e["code"], e["line"]) for e in batch["errors"]["data"]],
                         [("invalid_json_line", 1), ("duplicate_custom_id", 3), ("mismatched_endpoint", 4),
                          ("invalid_method", 5), ("missing_required_parameter", 6)])
        good = upload(self.srv, jsonl([chat_line("a", "x")]))
        other = upload(self.srv, jsonl([chat_line("a", "x")]), purpose="user_data")
        for body, status, param in (
                ({"input_file_id": good["id"], "endpoint": "/v1/images", "completion_window": "24h"}, 400, "endpoint"),
                ({"input_file_id": good["id"], "endpoint": "/v1/chat/completions", "completion_window": "1h"}, 400,
                 "completion_window"),
                ({"input_file_id": other["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}, 400,
                 "input_file_id"),
                ({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"}, 404,
                 "input_file_id"),
                ({"endpoint": "/v1/chat/completions", "completion_window": "24h"}, 400, "input_file_id")):
            st, r = self.call("POST", "/v1/batches", body)
            self.assertEqual((st, r["error"]["param"]), (status, param), body)
        st, r = self.call("GET", "/v1/files/%s/content" % other["id"])
        self.assertEqual(st, 400)  # only batch files' bytes are kept
        st, r = self.call("GET", "/v1/batches/batch_nope")
        self.assertEqual(st, 404)

    def test_hostile_lines_and_bodies_are_clear_errors(self):
        lines = ['{"custom_id": "s", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "\\ud800"}}',
                 '{"custom_id": "n", "method": "POST", "url": "/v1/chat/completions", "body": {"temperature": NaN}}',
                 {"custom_id": [1], "method": "POST", "url": "/v1/chat/completions", "body": {}},
                 {"custom_id": "u", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-4o",
                                                                                              "messages": [
                     {"role": "user", "content": "line\u2028separator"}]}}]
        batch = self.create(upload(self.srv, "".join(
            (line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
            for line in lines).encode("utf-8"))["id"])
        st, batch = self.call("GET", "/v1/batches/" + batch["id"])
        self.assertEqual([(e["code"], e["line"]) for e in batch["errors"]["data"]],
                         [("invalid_json_line", 1), ("invalid_json_line", 2), ("missing_required_parameter", 3)])
        f = upload(self.srv, jsonl([chat_line("a", "x")]))
        st, r = self.call("GET", "/v1/batches/%s" % self.create(f["id"])["id"], headers={"x-api-key": "k",
                                                                                       "anthropic-version": "x"})
        self.assertEqual(st, 404)  # Anthropic's batches are elsewhere; OpenAI's are not its
        st, r = self.call("GET", "/v1/batches/%s" % self.create(f["id"])["id"],
                          headers=dict(OA, **{"X-DP-Test-Id": "other"}))
        self.assertEqual(st, 404)  # another test's batch
        rule = {"match": {"text": "break it"}, "respond": {"scenario": "SERVER_ERROR"}}
        headers = dict(OA, **{"X-DP-Test-Id": "batch-scenario"})
        self.srv.request("POST", "/_control/rules", json.dumps(rule).encode(), headers)
        batch = self.create(upload(self.srv, jsonl([chat_line("a", "break it")]))["id"], headers=headers)
        st, batch = self.call("GET", "/v1/batches/" + batch["id"], headers=headers)
        st, hdrs, data = self.srv.request("GET", "/v1/files/%s/content" % batch["error_file_id"], None, OA)
        self.assertEqual(json.loads(data)["response"]["status_code"], 500)  # the rule's scenario, as directly

    def test_scenarios_pace_and_end_a_batch(self):
        f = upload(self.srv, jsonl([chat_line("a", "one"), chat_line("b", "two")]))
        batch = self.create(f["id"], "BATCH_SLOW; step_ms=300")
        seen = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (not seen or seen[-1] != "completed"):
            status = self.call("GET", "/v1/batches/" + batch["id"])[1]["status"]
            if not seen or seen[-1] != status:
                seen.append(status)
            time.sleep(0.05)
        self.assertEqual(seen, ["validating", "in_progress", "finalizing", "completed"])
        for scenario, status, code in (("BATCH_EXPIRED", "expired", "batch_expired"),
                                       ("BATCH_CANCELLED", "cancelled", "batch_cancelled")):
            st, batch = self.call("GET", "/v1/batches/" + self.create(f["id"], scenario)["id"])
            self.assertEqual((batch["status"], batch["request_counts"]["completed"]), (status, 1), scenario)
            self.assertEqual([e["error"]["code"] for e in self.content(batch["error_file_id"])], [code])
        st, batch = self.call("GET", "/v1/batches/" + self.create(f["id"], "BATCH_FAILED")["id"])
        self.assertEqual((batch["status"], batch["errors"]["data"][0]["code"]), ("failed", "token_limit_exceeded"))
        made = self.create(f["id"], "BATCH_FAILED; step_ms=5000")
        self.assertEqual(self.call("GET", "/v1/batches/" + made["id"])[1]["status"], "validating")
        made = self.create(f["id"], "BATCH_EXPIRED")  # the create answer is the batch as made, whatever follows
        self.assertEqual((made["status"], made["expired_at"], made["cancelled_at"], made["output_file_id"]),
                         ("validating", None, None, None))
        batch = self.create(f["id"], "BATCH_SLOW; step_ms=5000")
        st, cancelled = self.call("POST", "/v1/batches/%s/cancel" % batch["id"])
        self.assertEqual((st, cancelled["status"]), (200, "cancelling"))
        st, r = self.call("POST", "/v1/batches", {"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                                                  "completion_window": "24h"}, dict(OA, **{"X-DP-Scenario":
                                                                                           "RATE_LIMITED"}))
        self.assertEqual(st, 429)


def message_request(custom_id, text, **params):
    return {"custom_id": custom_id, "params": dict({"model": "claude-sonnet-4-5", "max_tokens": 100,
                                                    "messages": [{"role": "user", "content": text}]}, **params)}


class MessageBatchTest(BatchCase):
    """Anthropic's /v1/messages/batches over raw HTTP."""

    def create_messages(self, requests, scenario=None, headers=AN):
        st, batch = self.call("POST", "/v1/messages/batches", {"requests": requests},
                              dict(headers, **({"X-DP-Scenario": scenario} if scenario else {})))
        self.assertEqual(st, 200, batch)
        return batch

    def results(self, batch_id):
        st, hdrs, data = self.srv.request("GET", "/v1/messages/batches/%s/results" % batch_id, None, AN)
        self.assertEqual(st, 200, data)
        return {line["custom_id"]: line["result"] for line in map(json.loads, data.decode().splitlines())}

    def test_a_message_batch_answers_each_request_as_a_direct_call_would(self):
        batch = self.create_messages([message_request("a", "hello"), message_request("b", "plain"),
                                      {"custom_id": "c", "params": {"model": "claude-sonnet-4-5",
                                                                    "messages": [{"role": "user", "content": "x"}]}}])
        self.assertEqual((batch["type"], batch["processing_status"], batch["results_url"]),
                         ("message_batch", "in_progress", None))
        st, batch = self.call("GET", "/v1/messages/batches/" + batch["id"], headers=AN)
        self.assertEqual((batch["processing_status"], batch["request_counts"]),
                         ("ended", {"processing": 0, "succeeded": 2, "errored": 1, "canceled": 0, "expired": 0}))
        self.assertTrue(batch["results_url"].endswith("/v1/messages/batches/%s/results" % batch["id"]))
        results = self.results(batch["id"])
        self.assertEqual(results["a"]["message"]["content"][0]["text"], "Hi from a rule")
        self.assertEqual(results["b"]["message"]["content"][0]["text"], "dpmock reply to: plain")
        self.assertEqual((results["c"]["type"], results["c"]["error"]["error"]["type"]),
                         ("errored", "invalid_request_error"))
        st, deleted = self.call("DELETE", "/v1/messages/batches/" + batch["id"], headers=AN)
        self.assertEqual(deleted, {"id": batch["id"], "type": "message_batch_deleted"})
        st, gone = self.call("GET", "/v1/messages/batches/" + batch["id"], headers=AN)
        self.assertEqual((st, gone["error"]["type"]), (404, "not_found_error"))
        st, other = self.call("GET", "/v1/batches/" + batch["id"])  # OpenAI's batches are apart
        self.assertEqual(st, 404)

    def test_message_batch_requests_are_checked(self):
        for requests, words in (([], "requests"), ([{"custom_id": "a b", "params": {}}], "custom_id"),
                                ([message_request("a", "x"), message_request("a", "y")], "Duplicate"),
                                ([{"custom_id": "a"}], "params"), ([message_request("a", "x", stream=True)], "stream")):
            st, r = self.call("POST", "/v1/messages/batches", {"requests": requests}, AN)
            self.assertEqual((st, r["error"]["type"]), (400, "invalid_request_error"), requests)
            self.assertIn(words, r["error"]["message"])

    def test_scenarios_and_cancel_and_paging(self):
        two = [message_request("a", "one"), message_request("b", "two")]
        for scenario, counts in (("BATCH_EXPIRED", {"succeeded": 1, "expired": 1}),
                                 ("BATCH_CANCELLED", {"succeeded": 1, "canceled": 1}),
                                 ("BATCH_FAILED", {"errored": 2})):
            st, batch = self.call("GET", "/v1/messages/batches/" + self.create_messages(two, scenario)["id"],
                                  headers=AN)
            self.assertEqual({k: v for k, v in batch["request_counts"].items() if v}, counts, scenario)
        slow = self.create_messages(two, "BATCH_SLOW; step_ms=5000")
        st, r = self.call("GET", "/v1/messages/batches/%s/results" % slow["id"], headers=AN)
        self.assertEqual(st, 404)  # not ended yet
        st, r = self.call("DELETE", "/v1/messages/batches/" + slow["id"], headers=AN)
        self.assertEqual(st, 400)  # in progress
        st, r = self.call("POST", "/v1/messages/batches/%s/cancel" % slow["id"], headers=AN)
        self.assertEqual((r["processing_status"], r["cancel_initiated_at"] is not None), ("canceling", True))
        headers = dict(AN, **{"X-DP-Test-Id": "paging"})
        made = [self.create_messages(two, headers=headers)["id"] for _ in range(3)]
        st, page = self.call("GET", "/v1/messages/batches?limit=2", headers=headers)
        self.assertEqual(([b["id"] for b in page["data"]], page["has_more"]), (made[::-1][:2], True))
        st, page = self.call("GET", "/v1/messages/batches?limit=2&after_id=" + page["last_id"], headers=headers)
        self.assertEqual(([b["id"] for b in page["data"]], page["has_more"]), ([made[0]], False))


class GeminiBatchTest(BatchCase):
    """Gemini's batch mode over raw HTTP: models/{m}:batchGenerateContent and batches/{id} operations."""

    PATH = "/v1beta/models/gemini-2.5-flash:batchGenerateContent"

    def create_gemini(self, texts, scenario=None, headers=GE):
        body = {"batch": {"displayName": "run", "inputConfig": {"requests": {"requests": [
            {"request": {"contents": [{"role": "user", "parts": [{"text": t}]}]}, "metadata": {"key": "k%d" % i}}
            for i, t in enumerate(texts)]}}}}
        st, op = self.call("POST", self.PATH, body, dict(headers, **({"X-DP-Scenario": scenario} if scenario else {})))
        self.assertEqual(st, 200, op)
        return op

    def test_a_gemini_batch_answers_each_request_as_a_direct_call_would(self):
        op = self.create_gemini(["hello", "plain"])
        self.assertEqual((op["done"], op["metadata"]["state"], op["metadata"]["displayName"]),
                         (True, "BATCH_STATE_SUCCEEDED", "run"))
        st, again = self.call("GET", "/v1beta/" + op["name"], headers=GE)
        responses = again["response"]["inlinedResponses"]["inlinedResponses"]
        self.assertEqual([(r["metadata"]["key"], r["response"]["candidates"][0]["content"]["parts"][0]["text"])
                          for r in responses], [("k0", "Hi from a rule"), ("k1", "dpmock reply to: plain")])
        self.assertEqual(again["metadata"]["batchStats"]["successfulRequestCount"], "2")
        st, listing = self.call("GET", "/v1beta/batches", headers=GE)
        self.assertIn(op["name"], [o["name"] for o in listing["operations"]])
        self.assertEqual(self.call("DELETE", "/v1beta/" + op["name"], headers=GE)[0], 200)
        st, gone = self.call("GET", "/v1beta/" + op["name"], headers=GE)
        self.assertEqual((st, gone["error"]["status"]), (404, "NOT_FOUND"))

    def test_gemini_batches_are_checked_paced_and_cancelled(self):
        for body in ({}, {"batch": {"inputConfig": {"requests": {"requests": []}}}},
                     {"batch": {"inputConfig": {"requests": {"requests": [{"metadata": {}}]}}}}):
            st, r = self.call("POST", self.PATH, body, GE)
            self.assertEqual((st, r["error"]["status"]), (400, "INVALID_ARGUMENT"), body)
        st, r = self.call("POST", self.PATH, {"batch": {"inputConfig": {"fileName": "files/abc"}}}, GE)
        self.assertEqual((st, r["error"]["status"]), (404, "NOT_FOUND"))
        for path in ("/v1beta/models/a%2Fb:batchGenerateContent", "/v1beta/batches?pageToken=%C2%B2"):
            st, r = self.call("POST" if "models" in path else "GET", path, {"batch": {"inputConfig": {"requests": {
                "requests": [{"request": {"contents": [{"parts": [{"text": "x"}]}]}}]}}}} if "models" in path else
                None, GE)
            self.assertEqual((st, r["error"]["status"]), (400, "INVALID_ARGUMENT"), path)
        st, r = self.call("GET", "/v1beta/batches", headers=GE)
        self.assertEqual(st, 200)  # nothing stuck
        for config in ({"fileName": 5}, {"fileName": ""}, {"fileName": "files/x", "requests": {"requests": []}}):
            st, r = self.call("POST", self.PATH, {"batch": {"inputConfig": config}}, GE)
            self.assertEqual((st, r["error"]["status"]), (400, "INVALID_ARGUMENT"), config)
        st, r = self.call("GET", "/v1/files/file-abc:download")  # OpenAI's client: no such route of its own
        self.assertEqual((st, r["error"]["code"]), (404, "not_found"))

    def test_hostile_gemini_uploads_are_clear_errors(self):
        body = (b"--xyz\r\nContent-Type: application/json\r\n\r\nnot json\r\n--xyz\r\nContent-Type: application/jsonl"
                b"\r\n\r\nx\r\n--xyz--\r\n")
        st, _, data = self.srv.request("POST", "/upload/v1beta/files?key=k", body, {
            "X-Goog-Upload-Protocol": "multipart", "Content-Type": "multipart/related; boundary=xyz"}, timeout=5)
        self.assertEqual(st, 400, data)  # at once, not after a wait for more body
        for meta in ({"file": {"mimeType": 5}}, {"file": {"displayName": ["a.jsonl"]}}):
            st, _, data = self.srv.request("POST", "/upload/v1beta/files?key=k", json.dumps(meta).encode(), {
                "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start"})
            self.assertEqual(st, 400, (meta, data))
        op = self.create_gemini(["one"], "BATCH_SLOW; step_ms=5000")
        self.assertEqual((op.get("done"), op["metadata"]["state"]), (None, "BATCH_STATE_PENDING"))
        self.assertEqual(self.call("POST", "/v1beta/%s:cancel" % op["name"], {}, GE)[0], 200)
        op = self.create_gemini(["one", "two"], "BATCH_EXPIRED")
        errors = [r.get("error") for r in op["response"]["inlinedResponses"]["inlinedResponses"]]
        self.assertEqual((op["metadata"]["state"], errors[0], errors[1]["status"]),
                         ("BATCH_STATE_EXPIRED", None, "CANCELLED"))


@unittest.skipUnless(_have("google.genai"), "the google-genai package is not installed (optional)")
class GeminiBatchSdkTest(unittest.TestCase):
    """google-genai's client.batches with inlined requests."""

    def setUp(self):
        genai, self.types = importlib.import_module("google.genai"), importlib.import_module("google.genai.types")
        self.srv = Server("-q")
        self.addCleanup(self.srv.stop)
        self.srv.request("POST", "/_control/rules", json.dumps(RULE).encode())
        self.client = genai.Client(api_key="gk-test", http_options=self.types.HttpOptions(base_url=self.srv.url))

    def test_gemini_batches_end_to_end(self):
        c = self.client
        job = c.batches.create(model="gemini-2.5-flash", src=[
            {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]},
            {"contents": [{"role": "user", "parts": [{"text": "again"}]}], "metadata": {"key": "b"}}],
            config={"display_name": "sdk batch"})
        job = c.batches.get(name=job.name)
        self.assertEqual(job.state, self.types.JobState.JOB_STATE_SUCCEEDED)
        self.assertEqual([r.response.text for r in job.dest.inlined_responses], ["Hi from a rule",
                                                                                  "dpmock reply to: again"])
        self.assertEqual([j.name for j in c.batches.list()], [job.name])
        slow = c.batches.create(model="gemini-2.5-flash", src=[{"contents": [{"role": "user", "parts": [
            {"text": "x"}]}]}], config={"http_options": {"headers": {"X-DP-Scenario": "BATCH_SLOW; step_ms=5000"}}})
        self.assertEqual(c.batches.get(name=slow.name).state, self.types.JobState.JOB_STATE_PENDING)
        c.batches.cancel(name=slow.name)
        c.batches.delete(name=job.name)
        lines = [{"key": "one", "request": {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}},
                 {"key": "two", "request": {"contents": [{"role": "user", "parts": [{"text": "from a file"}]}]}}]
        uploaded = c.files.upload(file=io.BytesIO(jsonl(lines)), config={"mime_type": "jsonl",
                                                                         "display_name": "requests"})
        job = c.batches.get(name=c.batches.create(model="gemini-2.5-flash", src=uploaded.name).name)
        self.assertEqual(job.state, self.types.JobState.JOB_STATE_SUCCEEDED)
        out = [json.loads(line) for line in c.files.download(file=job.dest.file_name).decode().splitlines()]
        self.assertEqual([(o["key"], o["response"]["candidates"][0]["content"]["parts"][0]["text"]) for o in out],
                         [("one", "Hi from a rule"), ("two", "dpmock reply to: from a file")])


@unittest.skipUnless(_have("anthropic"), "the anthropic package is not installed (optional)")
class MessageBatchSdkTest(unittest.TestCase):
    """anthropic's client.messages.batches, results() included."""

    def setUp(self):
        anthropic = importlib.import_module("anthropic")
        self.srv = Server("-q")
        self.addCleanup(self.srv.stop)
        self.srv.request("POST", "/_control/rules", json.dumps(RULE).encode())
        self.client = anthropic.Anthropic(base_url=self.srv.url, api_key="sk-ant-test", max_retries=0)
        self.addCleanup(self.client.close)

    def test_message_batches_end_to_end(self):
        c = self.client
        batch = c.messages.batches.create(requests=[message_request("a", "hello"), message_request("b", "x")])
        self.assertEqual(batch.processing_status, "in_progress")
        batch = c.messages.batches.retrieve(batch.id)
        self.assertEqual((batch.processing_status, batch.request_counts.succeeded), ("ended", 2))
        results = {r.custom_id: r.result for r in c.messages.batches.results(batch.id)}
        self.assertEqual(results["a"].message.content[0].text, "Hi from a rule")
        self.assertEqual([b.id for b in c.messages.batches.list()], [batch.id])
        slow = c.messages.batches.create(requests=[message_request("a", "x")],
                                         extra_headers={"X-DP-Scenario": "BATCH_SLOW; step_ms=5000"})
        self.assertEqual(c.messages.batches.cancel(slow.id).processing_status, "canceling")
        self.assertEqual(c.messages.batches.delete(batch.id).type, "message_batch_deleted")


@unittest.skipUnless(_have("openai"), "the openai package is not installed (optional)")
class BatchSdkTest(unittest.TestCase):
    """openai's client.batches with a JSONL input file and its downloaded output."""

    def setUp(self):
        openai = importlib.import_module("openai")
        self.srv = Server("-q")
        self.addCleanup(self.srv.stop)
        self.srv.request("POST", "/_control/rules", json.dumps(RULE).encode())
        self.client = openai.OpenAI(base_url=self.srv.url + "/v1", api_key="sk-test", max_retries=0)
        self.addCleanup(self.client.close)

    def test_batches_end_to_end(self):
        c = self.client
        lines = [chat_line("a", "hello"), {"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                                           "body": {"model": "text-embedding-3-small", "input": "x"}}]
        f = c.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines[:1]))), purpose="batch")
        batch = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        self.assertEqual(batch.status, "validating")
        batch = c.batches.retrieve(batch.id)
        self.assertEqual((batch.status, batch.request_counts.completed), ("completed", 1))
        out = [json.loads(line) for line in c.files.content(batch.output_file_id).text.splitlines()]
        self.assertEqual(out[0]["response"]["body"]["choices"][0]["message"]["content"], "Hi from a rule")
        f = c.files.create(file=("e.jsonl", io.BytesIO(jsonl(lines[1:]))), purpose="batch")
        batch = c.batches.retrieve(c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings",
                                                    completion_window="24h").id)
        out = json.loads(c.files.content(batch.output_file_id).text)
        self.assertEqual(len(out["response"]["body"]["data"][0]["embedding"]), 1536)
        ids = [b.id for b in c.batches.list()]  # newest first
        self.assertEqual((len(ids), ids[0]), (2, batch.id))
        slow = c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h",
                                extra_headers={"X-DP-Scenario": "BATCH_SLOW; step_ms=5000"})
        self.assertEqual(c.batches.cancel(slow.id).status, "cancelling")


if __name__ == "__main__":
    unittest.main()
