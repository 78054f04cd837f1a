"""The providers' models on the clouds that serve them (Vertex AI, Azure OpenAI, Amazon Bedrock): their paths,
keys and error shapes, with the same engines, rules and faults; the official cloud clients where they are
installed."""

import base64
import datetime
import http.server
import importlib
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import unittest
import zlib

from .support import (AN, GE, Server, _have, anthropic_messages, decode_chunks, gemini_contents, openai_chat,
    raw_request, recv_all, split_response, sse_events)

VERTEX = "/v1/projects/proj/locations/us-east5/publishers"
VERTEX_GEMINI = VERTEX + "/google/models/gemini-2.5-flash:"
VERTEX_CLAUDE = VERTEX + "/anthropic/models/claude-sonnet-4-5@20250929:"
BEARER = {"Authorization": "Bearer ya29.test-token"}
RULES = [{"id": "weather", "match": {"text": "weather"},
          "respond": {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}},
         {"id": "sunny", "match": {"tool_result": "get_weather"}, "respond": {"text": "Sunny in {{args.city}}"}},
         {"id": "hello", "match": {"text": "hello"}, "respond": {"text": "Hello from {{model}}"}}]
TOOL = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def vertex_claude(text, stream=False):
    body = dict(anthropic_messages(text, stream), anthropic_version="vertex-2023-10-16")
    del body["model"]
    return body


class CloudCase(unittest.TestCase):
    """One server for the class, with RULES loaded; post() sends with the cloud's key by default."""

    HEADERS = {}

    @classmethod
    def setUpClass(cls):
        cls.srv = Server("-q")
        st, _, body = cls.srv.request("POST", "/_control/rules", json.dumps(RULES).encode())
        assert st == 200, body

    @classmethod
    def tearDownClass(cls):
        cls.srv.stop()

    def post(self, path, body, headers=None):
        headers = self.HEADERS if headers is None else headers
        return self.srv.request("POST", path, json.dumps(body).encode(), headers)


class VertexTest(CloudCase):
    """Vertex AI over raw HTTP: Gemini's generateContent family and Anthropic's rawPredict."""

    HEADERS = BEARER

    def test_one_rule_answers_direct_and_on_vertex(self):
        answers = []
        for path, headers in ((VERTEX_GEMINI + "generateContent", BEARER),
                              ("/v1beta1" + VERTEX_GEMINI[3:] + "generateContent", BEARER),
                              ("/v1beta/models/gemini-2.5-flash:generateContent", GE)):
            st, _, data = self.post(path, gemini_contents("hello there"), headers)
            self.assertEqual(st, 200, data)
            answers.append(json.loads(data)["candidates"][0]["content"]["parts"][0]["text"])
        for path, body, headers in ((VERTEX_CLAUDE + "rawPredict", vertex_claude("hello there"), BEARER),
                                    ("/v1/messages", anthropic_messages("hello there"), AN)):
            st, _, data = self.post(path, body, headers)
            self.assertEqual(st, 200, data)
            answers.append(json.loads(data)["content"][0]["text"])
        self.assertEqual(answers, ["Hello from gemini-2.5-flash"] * 3 + ["Hello from claude-sonnet-4-5@20250929",
                                                                          "Hello from claude-sonnet-4-5"])

    def test_streams_tool_calls_and_counts(self):
        st, hdrs, data = self.post(VERTEX_GEMINI + "streamGenerateContent?alt=sse", gemini_contents("the weather?"))
        self.assertEqual((st, hdrs["content-type"].split(";")[0]), (200, "text/event-stream"))
        calls = [p["functionCall"] for _, d in sse_events(data) if d
                 for p in json.loads(d)["candidates"][0]["content"]["parts"] if "functionCall" in p]
        self.assertEqual(calls[0]["args"], {"city": "Paris"})
        st, _, data = self.post(VERTEX_GEMINI + "streamGenerateContent", gemini_contents("hello"))
        self.assertEqual("".join(p["text"] for c in json.loads(data) for p in c["candidates"][0]["content"]["parts"]),
                         "Hello from gemini-2.5-flash")
        st, hdrs, data = self.post(VERTEX_CLAUDE + "streamRawPredict", vertex_claude("hello", True))
        events = [name for name, _ in sse_events(data)]
        self.assertEqual((events[0], events[-1]), ("message_start", "message_stop"))
        st, _, data = self.post(VERTEX_CLAUDE + "rawPredict", vertex_claude("what is the weather", True))
        self.assertIn(b"get_weather", data)
        st, _, data = self.post(VERTEX_GEMINI + "countTokens", gemini_contents("one two three"))
        self.assertEqual(json.loads(data)["totalTokens"], 3)
        st, _, data = self.post(VERTEX + "/anthropic/models/count-tokens:rawPredict",
                                dict(vertex_claude("one two three"), model="claude-sonnet-4-5@20250929"))
        self.assertEqual(json.loads(data), {"input_tokens": 3})
        st, _, data = self.post(VERTEX + "/google/models/gemini-embedding-001:embedContent",
                                {"content": {"parts": [{"text": "hi"}]}})
        self.assertEqual(len(json.loads(data)["embedding"]["values"]), 3072)
        st, _, data = self.post(VERTEX + "/google/models/text-embedding-005:predict",
                                {"instances": [{"content": "hi there"}, {"content": "bye"}],
                                 "parameters": {"outputDimensionality": 64}})
        predictions = json.loads(data)["predictions"]
        self.assertEqual([(len(p["embeddings"]["values"]), p["embeddings"]["statistics"]["token_count"])
                          for p in predictions], [(64, 2), (64, 1)])
        for path, body in ((VERTEX + "/google/models/text-embedding-005:predict", {"instances": [{"content": 5}]}),
                           (VERTEX + "/google/models/text-embedding-005:predict",
                            {"instances": [{"content": "w"}] * 251}),  # Vertex AI's limit is 250
                           (VERTEX_CLAUDE.replace("claude-sonnet-4-5@20250929", "count-tokens") + "streamRawPredict",
                            vertex_claude("x", True))):
            st, _, data = self.post(path, body)
            self.assertEqual((st, json.loads(data)["error"]["status"]), (400, "INVALID_ARGUMENT"), path)
        st, _, data = self.post("/v1beta/models/imagen-4.0-generate-001:predict", {"instances": [{"content": "x"}]},
                                GE)  # the Gemini API's :predict is Imagen's alone
        self.assertEqual(st, 400)

    def test_errors_are_googles_on_every_vertex_route(self):
        cases = [(VERTEX_GEMINI + "generateContent", gemini_contents("x")),
                 (VERTEX + "/google/models/text-embedding-005:predict", {"instances": [{"content": "x"}]}),
                 (VERTEX_CLAUDE + "rawPredict", vertex_claude("x")),
                 (VERTEX_CLAUDE + "streamRawPredict", vertex_claude("x", True))]
        for path, body in cases:
            for headers, status, code in (({}, 401, "UNAUTHENTICATED"),
                                          (dict(BEARER, **{"X-DP-Scenario": "RATE_LIMITED"}), 429,
                                           "RESOURCE_EXHAUSTED"),
                                          (dict(BEARER, **{"X-DP-Scenario": "SERVER_ERROR"}), 500, "INTERNAL"),
                                          (dict(BEARER, **{"X-DP-Scenario": "OVERLOADED"}), 503, "UNAVAILABLE")):
                st, _, data = self.post(path, body, headers)
                err = json.loads(data)["error"]
                self.assertEqual((st, err["code"], err["status"]), (status, status, code), (path, data))
        st, _, data = self.post(VERTEX_CLAUDE + "rawPredict", dict(vertex_claude("x"), anthropic_version=None))
        self.assertEqual((st, json.loads(data)["error"]["status"]), (400, "INVALID_ARGUMENT"))
        self.assertIn("anthropic_version", json.loads(data)["error"]["message"])
        st, _, data = self.post(VERTEX + "/anthropic/models/claude-does-not-exist:rawPredict", vertex_claude("x"))
        self.assertEqual((st, json.loads(data)["error"]["status"]), (404, "NOT_FOUND"))

    def test_a_cut_stream_and_the_journal(self):
        raw = self.srv.raw(raw_request(VERTEX_CLAUDE + "streamRawPredict", dict(
            BEARER, **{"X-DP-Scenario": "STREAM_CUT; events=2", "X-DP-Test-Id": "cut"}), vertex_claude("hello", True)))
        self.assertEqual(raw.count(b"event: "), 2)  # then the connection drops
        self.assertFalse(raw.endswith(b"0\r\n\r\n"))
        entry = json.loads(self.srv.request("GET", "/_control/requests?test=cut")[2])["requests"][-1]
        self.assertEqual((entry["route"], entry["platform"], entry["scenario"]), ("messages", "vertex", "STREAM_CUT; events=2"))


AZURE = "/openai/deployments/my-gpt4o/"
AZ_KEY = {"api-key": "az-test-key"}


class AzureTest(CloudCase):
    """Azure OpenAI over raw HTTP: deployments paths with api-version, the v1 paths, and Gemini's OpenAI-compatible
    endpoint."""

    HEADERS = AZ_KEY

    def post(self, path, body, headers=None):
        st, hdrs, data = super().post(path, body, headers)
        return st, hdrs, json.loads(data) if data.startswith(b"{") else data

    def test_the_deployment_is_the_model_and_filters_are_reported(self):
        st, hdrs, r = self.post(AZURE + "chat/completions?api-version=2024-10-21", openai_chat("hello"))
        self.assertEqual((st, r["model"], r["choices"][0]["message"]["content"]), (200, "my-gpt4o",
                                                                                  "Hello from my-gpt4o"))
        self.assertEqual(r["choices"][0]["content_filter_results"]["hate"], {"filtered": False, "severity": "safe"})
        self.assertEqual(r["prompt_filter_results"][0]["prompt_index"], 0)
        self.assertIn("apim-request-id", hdrs)
        st, _, raw = self.post(AZURE + "chat/completions?api-version=2025-01-01-preview", openai_chat("hello", True),
                               {"Authorization": "Bearer entra-token"})
        events = [json.loads(d) for _, d in sse_events(raw) if d and d != "[DONE]"]
        self.assertEqual((events[0]["choices"], "prompt_filter_results" in events[0]), ([], True))
        self.assertEqual("".join(e["choices"][0]["delta"].get("content") or "" for e in events[1:]),
                         "Hello from my-gpt4o")
        st, _, r = self.post(AZURE + "embeddings?api-version=2024-10-21", {"input": "hi"})
        self.assertEqual(len(r["data"][0]["embedding"]), 1536)
        for path in ("/openai/v1/chat/completions", "/v1beta/openai/chat/completions"):
            st, _, r = self.post(path, openai_chat("what is the weather"), {"Authorization": "Bearer k"})
            self.assertEqual(json.loads(r["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]),
                             {"city": "Paris"}, path)
        st, _, r = self.post("/openai/responses?api-version=2025-04-01-preview", {"model": "my-gpt4o",
                                                                                  "input": "hello"})
        self.assertEqual(r["output"][0]["content"][0]["text"], "Hello from my-gpt4o")

    def test_azures_errors(self):
        cases = [(AZURE + "chat/completions", AZ_KEY, 404, "404"),
                 (AZURE + "chat/completions?api-version=someday", AZ_KEY, 400, "BadRequest"),
                 (AZURE + "chat/completions?api-version=2024-10-21", {}, 401, "401"),
                 ("/openai/deployments/x-does-not-exist/chat/completions?api-version=2024-10-21", AZ_KEY, 404,
                  "DeploymentNotFound"),
                 (AZURE + "chat/completions?api-version=2024-10-21", dict(AZ_KEY, **{"X-DP-Scenario": "RATE_LIMITED"}),
                  429, "rate_limit_exceeded")]
        for path, headers, status, code in cases:
            st, hdrs, r = self.post(path, openai_chat("x"), headers)
            self.assertEqual((st, r["error"]["code"]), (status, code), path)
            self.assertIsInstance(r["error"]["message"], str)


BEDROCK_MODEL = "anthropic.claude-sonnet-4-5-20250929-v1:0"
BEDROCK = "/model/" + BEDROCK_MODEL.replace(":", "%3A")  #: as boto3 sends it (the anthropic SDK leaves the ':')
SIGV4 = {"Authorization": "AWS4-HMAC-SHA256 Credential=AKIDTEST/20261204/us-east-1/bedrock/aws4_request, "
                          "SignedHeaders=host;x-amz-date, Signature=0123abcd", "X-Amz-Date": "20261204T000000Z"}


def bedrock_invoke(text):
    body = dict(anthropic_messages(text), anthropic_version="bedrock-2023-05-31")
    del body["model"]
    return body


def converse(text, tools=False):
    body = {"messages": [{"role": "user", "content": [{"text": text}]}], "inferenceConfig": {"maxTokens": 100}}
    if tools:
        body["toolConfig"] = {"tools": [{"toolSpec": {"name": "get_weather", "inputSchema": {"json": TOOL}}}]}
    return body


def eventstream(data):
    """The messages of an AWS event stream as (headers, payload), checking each prelude and both CRC32s; and
    the bytes after the last whole message (a cut stream's part of one)."""
    out = []
    while len(data) >= 16:
        total, hlen = struct.unpack(">II", data[:8])
        if len(data) < total:
            break
        assert struct.unpack(">I", data[8:12])[0] == zlib.crc32(data[:8]), "prelude CRC"
        assert struct.unpack(">I", data[total - 4:total])[0] == zlib.crc32(data[:total - 4]), "message CRC"
        headers, raw = {}, data[12:12 + hlen]
        while raw:
            n = raw[0]
            name, kind = raw[1:1 + n].decode(), raw[1 + n]
            assert kind == 7, "string headers only"
            vlen = struct.unpack(">H", raw[2 + n:4 + n])[0]
            headers[name] = raw[4 + n:4 + n + vlen].decode()
            raw = raw[4 + n + vlen:]
        out.append((headers, data[12 + hlen:total - 4]))
        data = data[total:]
    return out, data


def invoke_events(data):
    """The Anthropic events inside an InvokeModelWithResponseStream answer."""
    messages, rest = eventstream(data)
    assert not rest, rest
    return [json.loads(base64.b64decode(json.loads(p)["bytes"])) if h[":message-type"] == "event" else
            ("exception", h[":exception-type"], json.loads(p)["message"]) for h, p in messages]


def summary(messages):
    """What a stream says, without what differs between two answers (ids, latencies): each message's headers
    and its payload's JSON keys, and the text."""
    out, text = [], ""
    for h, p in messages:
        if h.get(":event-type") == "chunk":
            p = base64.b64decode(json.loads(p)["bytes"])
        event = json.loads(p)
        out.append((h, sorted(event)))
        text += (event.get("delta") or {}).get("text") or ""
    return out, text


class BedrockTest(CloudCase):
    """Amazon Bedrock over raw HTTP: InvokeModel with Anthropic's body and events in AWS's event stream, the
    Converse API, CountTokens, SigV4 keys and Bedrock's errors."""

    HEADERS = SIGV4

    def test_one_rule_answers_invoke_converse_and_direct(self):
        answers = []
        st, hdrs, data = self.post(BEDROCK + "/invoke", bedrock_invoke("hello there"))
        self.assertEqual((st, hdrs["content-type"]), (200, "application/json"), data)
        self.assertIn("x-amzn-requestid", hdrs)
        answers.append(json.loads(data)["content"][0]["text"])
        st, hdrs, data = self.post(BEDROCK + "/invoke-with-response-stream", bedrock_invoke("hello there"))
        self.assertEqual((st, hdrs["content-type"], hdrs["x-amzn-bedrock-content-type"]),
                         (200, "application/vnd.amazon.eventstream", "application/json"))
        events = invoke_events(data)
        self.assertEqual((events[0]["type"], events[-1]["type"]), ("message_start", "message_stop"))
        self.assertEqual(events[-1]["amazon-bedrock-invocationMetrics"]["outputTokenCount"],
                         events[-2]["usage"]["output_tokens"])
        answers.append("".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta"))
        st, _, data = self.post("/model/" + BEDROCK_MODEL + "/converse", converse("hello there"))  # ':' unencoded
        r = json.loads(data)
        self.assertEqual((r["stopReason"], r["usage"]["totalTokens"]), ("end_turn", r["usage"]["inputTokens"] +
                                                                        r["usage"]["outputTokens"]))
        answers.append(r["output"]["message"]["content"][0]["text"])
        st, hdrs, data = self.post(BEDROCK + "/converse-stream", converse("hello there"))
        messages, rest = eventstream(data)
        names = [h[":event-type"] for h, _ in messages]
        self.assertEqual((names[0], names[-2:], rest), ("messageStart", ["messageStop", "metadata"], b""))
        self.assertEqual({h[":content-type"] for h, _ in messages}, {"application/json"})
        answers.append("".join(json.loads(p)["delta"]["text"] for h, p in messages
                               if h[":event-type"] == "contentBlockDelta"))
        st, _, data = self.post("/v1/messages", anthropic_messages("hello there"), AN)
        self.assertEqual(json.loads(data)["content"][0]["text"], "Hello from claude-sonnet-4-5")
        self.assertEqual(answers, ["Hello from " + BEDROCK_MODEL] * 4)

    def test_tool_calls_an_agent_step_and_token_counts(self):
        st, _, data = self.post(BEDROCK + "/converse", converse("what is the weather?", tools=True))
        r = json.loads(data)
        use = r["output"]["message"]["content"][0]["toolUse"]
        self.assertEqual((r["stopReason"], use["name"], use["input"]), ("tool_use", "get_weather", {"city": "Paris"}))
        body = converse("what is the weather?", tools=True)
        body["messages"] += [r["output"]["message"], {"role": "user", "content": [{"toolResult": {
            "toolUseId": use["toolUseId"], "content": [{"json": {"temp": "22 C"}}]}}]}]
        r = json.loads(self.post(BEDROCK + "/converse", body)[2])
        self.assertEqual(r["output"]["message"]["content"], [{"text": "Sunny in Paris"}])
        messages, _ = eventstream(self.post(BEDROCK + "/converse-stream", converse("the weather", tools=True))[2])
        start = [json.loads(p) for h, p in messages if h[":event-type"] == "contentBlockStart"][0]
        self.assertEqual(start["start"]["toolUse"]["name"], "get_weather")
        self.assertEqual(json.loads("".join(json.loads(p)["delta"]["toolUse"]["input"] for h, p in messages
                                            if h[":event-type"] == "contentBlockDelta")), {"city": "Paris"})
        events = invoke_events(self.post(BEDROCK + "/invoke-with-response-stream", dict(
            bedrock_invoke("what is the weather"), tools=[{"name": "get_weather", "input_schema": TOOL}]))[2])
        self.assertEqual([e["content_block"]["name"] for e in events if e["type"] == "content_block_start"],
                         ["get_weather"])
        for given in ({"converse": converse("one two three")},
                      {"invokeModel": {"body": base64.b64encode(json.dumps(bedrock_invoke("one two three"))
                                                                .encode()).decode()}}):
            st, _, data = self.post(BEDROCK + "/count-tokens", {"input": given})
            self.assertEqual((st, json.loads(data)), (200, {"inputTokens": 3}), given)
        body = dict(converse("a puzzle"), additionalModelRequestFields={"thinking": {"type": "enabled",
                                                                                      "budget_tokens": 1024}})
        content = json.loads(self.post(BEDROCK + "/converse", body)[2])["output"]["message"]["content"]
        self.assertEqual(content[0]["reasoningContent"]["reasoningText"]["text"], "Thinking about: a puzzle")
        schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
        body = dict(converse("hi"), outputConfig={"textFormat": {"type": "json_schema", "structure": {
            "jsonSchema": {"schema": json.dumps(schema), "name": "reply"}}}})
        text = json.loads(self.post(BEDROCK + "/converse", body)[2])["output"]["message"]["content"][0]["text"]
        self.assertEqual(list(json.loads(text)), ["answer"])

    def test_errors_are_bedrocks_on_every_route(self):
        routes = [(BEDROCK + "/invoke", bedrock_invoke("x")), (BEDROCK + "/invoke-with-response-stream",
                                                               bedrock_invoke("x")),
                  (BEDROCK + "/converse", converse("x")), (BEDROCK + "/converse-stream", converse("x"))]
        cases = [({}, 403, "MissingAuthenticationTokenException", "Missing Authentication Token"),
                 (dict(SIGV4, Authorization=SIGV4["Authorization"].replace("AKIDTEST", "dummy_key")), 403,
                  "UnrecognizedClientException", "The security token included in the request is invalid."),
                 (dict(SIGV4, **{"X-DP-Scenario": "RATE_LIMITED"}), 429, "ThrottlingException",
                  "Too many requests, please wait before trying again."),
                 (dict(SIGV4, **{"X-DP-Scenario": "OVERLOADED"}), 503, "ServiceUnavailableException",
                  "Bedrock is unable to process your request."),
                 (dict(SIGV4, **{"X-DP-Scenario": "SERVER_ERROR"}), 500, "InternalServerException", None),
                 ({"Authorization": "Bearer bedrock-api-key-x", "X-DP-Scenario": "REQUEST_TIMEOUT"}, 408,
                  "ModelTimeoutException", None)]
        for path, body in routes:
            for headers, status, etype, message in cases:
                st, hdrs, data = self.post(path, body, headers)
                self.assertEqual((st, hdrs["x-amzn-errortype"].split(":")[0]), (status, etype), (path, etype, data))
                self.assertEqual(list(json.loads(data)), ["message"])
                self.assertIn("x-amzn-requestid", hdrs)
                if message:
                    self.assertEqual(json.loads(data)["message"], message)
        bad = [(BEDROCK + "/invoke", dict(bedrock_invoke("x"), anthropic_version=None), "anthropic_version"),
               ("/model/meta.llama3-70b-instruct-v1%3A0/invoke", bedrock_invoke("x"), "Converse"),
               ("/model/anthropic.claude-does-not-exist/converse", converse("x"), "model identifier is invalid"),
               (BEDROCK + "/converse", {"messages": [{"role": "assistant", "content": [{"text": "x"}]}]},
                "must start with a user message"),
               (BEDROCK + "/converse", {"messages": [{"role": "user", "content": [{"text": "x"}]}] * 2},
                "must alternate"),
               (BEDROCK + "/converse", {"messages": [{"role": "user", "content": [{"toolResult": {
                   "toolUseId": "t", "content": [{"text": "x"}]}}]}]}, "toolConfig"),
               (BEDROCK + "/converse", dict(converse("x"), inferenceConfig={"maxTokens": 0}), "maxTokens"),
               (BEDROCK + "/count-tokens", {"input": {}}, "invokeModel"),
               (BEDROCK + "/count-tokens", {"input": {"invokeModel": {"body": base64.b64encode(b"[" * 100000).decode()}}},
                "nested too deeply"),
               (BEDROCK + "/converse", dict(converse("x"), outputConfig={"textFormat": {"type": "json_schema",
                                                                                         "structure": "x"}}),
                "structure"),
               (BEDROCK + "/converse", dict(converse("x"), outputConfig={"textFormat": {
                   "type": "json_schema", "structure": {"jsonSchema": {"schema": "[" * 100000}}}}), "schema"),
               (BEDROCK + "/converse", {"messages": [{"role": "user", "content": ["text"]}]}, "content"),
               (BEDROCK + "/converse", dict(converse("x"), toolConfig={"tools": "x"}), "toolConfig")]
        for path, body, words in bad:
            st, hdrs, data = self.post(path, body)
            self.assertEqual((st, hdrs["x-amzn-errortype"].split(":")[0]), (400, "ValidationException"), (path, data))
            self.assertIn(words, json.loads(data)["message"])
        arn = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc123"
        st, _, data = self.post("/model/%s/invoke" % arn.replace(":", "%3A").replace("/", "%2F"), bedrock_invoke("x"))
        self.assertEqual((st, json.loads(data)["model"]), (200, arn))
        st, hdrs, data = self.post(BEDROCK + "/converse-stream", {"messages": []},
                                   dict(SIGV4, **{"X-DP-Scenario": "NO_FINAL_CHUNK"}))
        self.assertEqual((st, hdrs["content-type"]), (400, "application/json"))  # a whole answer stays JSON
        for route in ("/invoke", "/invoke-with-response-stream"):  # the Flask contract's Anthropic bytes are not
            st, hdrs, data = self.post(BEDROCK + route, bedrock_invoke("x"),  # Bedrock's: not given there
                                       dict(SIGV4, **{"X-DP-Scenario": "AUTH_FAILURE_ANTHROPIC"}))
            self.assertEqual(st, 200, data)
        self.post(BEDROCK + "/converse", converse("x"), dict(SIGV4, **{"X-Amz-Security-Token": "tok-secret-12345",
                                                                       "X-DP-Test-Id": "token"}))
        entry = json.loads(self.srv.request("GET", "/_control/requests?test=token")[2])["requests"][0]
        self.assertNotIn("tok-secret-12345", json.dumps(entry))

    def test_hand_written_event_stream_recordings(self):
        events = [{"t": 0, "event": "messageStart", "data": '{"role":"assistant"}'},
                  {"t": 0, "event": "contentBlockDelta", "data": '{"delta":{"text":"canned"},"contentBlockIndex":0}'},
                  {"t": 0, "exception": "throttlingException", "data": '{"message":"slow down"}'}]
        rule = {"match": {"platform": "bedrock", "route": "converse", "text": "canned"}, "respond": {"raw": {
            "status": 200, "headers": {"content-type": "application/vnd.amazon.eventstream"}, "events": events}}}
        headers = {"X-DP-Test-Id": "canned"}
        st, _, data = self.srv.request("POST", "/_control/rules", json.dumps(rule).encode(), headers)
        self.assertEqual(st, 200, data)
        st, hdrs, data = self.post(BEDROCK + "/converse-stream", converse("canned"), dict(SIGV4, **headers))
        messages, rest = eventstream(data)
        self.assertEqual([h.get(":event-type", h.get(":exception-type")) for h, _ in messages],
                         ["messageStart", "contentBlockDelta", "throttlingException"])
        self.assertEqual(rest, b"")
        for bad in ({"t": 0, "event": "x" * 300, "data": "{}"}, {"t": 0, "exception": "", "data": "{}"},
                    {"t": 0, "chunk": 5}):
            broken = dict(rule, respond={"raw": dict(rule["respond"]["raw"], events=[bad])})
            st, _, data = self.srv.request("POST", "/_control/rules", json.dumps(broken).encode(), headers)
            self.assertEqual(st, 400, (bad, data))

    def stream(self, path, body, scenario, srv=None):
        raw = (srv or self.srv).raw(raw_request(path, dict(SIGV4, **{"X-DP-Scenario": scenario,
                                                                     "X-DP-Test-Id": "bedrock"}), body, close=True))
        head, _, rest = raw.partition(b"\r\n\r\n")
        chunks, _ = decode_chunks(rest, strict=False)
        return raw, b"".join(chunks)

    def test_stream_faults_act_on_the_event_stream(self):
        for path, body in ((BEDROCK + "/invoke-with-response-stream", bedrock_invoke("hello")),
                           (BEDROCK + "/converse-stream", converse("hello"))):
            whole, _ = eventstream(self.post(path, body)[2])
            raw, data = self.stream(path, body, "STREAM_ERROR; after=3")
            messages, rest = eventstream(data)
            self.assertEqual((len(messages), rest), (4, b""), path)
            self.assertEqual((messages[-1][0][":message-type"], messages[-1][0][":exception-type"]),
                             ("exception", "internalServerException"))
            self.assertTrue(raw.endswith(b"0\r\n\r\n"))
            raw, data = self.stream(path, body, "STREAM_CUT; events=2")
            messages, rest = eventstream(data)
            self.assertEqual((len(messages), rest, raw.endswith(b"0\r\n\r\n")), (2, b"", False), path)
            raw, data = self.stream(path, body, "SSE_SPLIT; every=7")  # split across chunks, the same messages
            self.assertEqual(summary(eventstream(data)[0]), summary(whole), path)
            for scenario in ("SSE_COMMENTS", "SSE_LINE_ENDINGS; eol=cr"):  # SSE's own faults leave it alone
                self.assertEqual(summary(eventstream(self.stream(path, body, scenario)[1])[0]), summary(whole),
                                 (path, scenario))
            messages, _ = eventstream(self.stream(path, body, "INVALID_JSON_200")[1])  # framed well, JSON broken
            self.assertEqual(len(messages), len(whole))
            self.assertRaises(ValueError, json.loads, messages[1][1] if "converse" in path else
                              base64.b64decode(json.loads(messages[1][1])["bytes"]))
            raw, data = self.stream(path, body, "STREAM_NO_END")
            names = [h[":event-type"] for h, _ in eventstream(data)[0]]
            self.assertNotIn("messageStop", names)
            if "invoke" in path:
                self.assertNotIn("message_stop", [e["type"] for e in invoke_events(data)])
        entries = json.loads(self.srv.request("GET", "/_control/requests?test=bedrock")[2])["requests"]
        self.assertEqual({(e["route"], e["platform"]) for e in entries}, {("messages", "bedrock"),
                                                                          ("converse", "bedrock")})


class CloudRecordTest(unittest.TestCase):
    """--record from each cloud (its upstream: a second dpmock), replayed offline; a recording answers where it
    was made only (match.platform)."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)

    def server(self, *args, **kw):
        srv = Server(*args, **kw)
        self.addCleanup(srv.stop)
        return srv

    def requests(self):
        bearer = {"Authorization": "Bearer bedrock-api-key-rec"}
        return [(VERTEX_GEMINI + "generateContent", BEARER, gemini_contents("rec vertex gemini")),
                (VERTEX_CLAUDE + "streamRawPredict", BEARER, vertex_claude("rec vertex claude", True)),
                (AZURE + "chat/completions?api-version=2024-10-21", AZ_KEY, openai_chat("rec azure")),
                ("/openai/v1/chat/completions", AZ_KEY, openai_chat("rec azure v1 stream", True)),
                ("/v1beta/openai/chat/completions", {"Authorization": "Bearer g"}, openai_chat("rec gemini compat")),
                (BEDROCK + "/converse", SIGV4, converse("rec converse")),  # the same words streamed and not:
                (BEDROCK + "/converse-stream", SIGV4, converse("rec converse")),  # two recordings
                (BEDROCK + "/invoke-with-response-stream", bearer, bedrock_invoke("rec invoke")),
                (BEDROCK + "/invoke", SIGV4, bedrock_invoke("rec invoke")),
                ("/model/anthropic.claude-does-not-exist/converse", SIGV4, converse("rec error"))]

    @staticmethod
    def said(data):
        """An answer without what differs between two answers (ids, times, latencies)."""
        return re.sub(rb'"(id|created|responseId|toolUseId|latencyMs)": ?("[^"]*"|\d+)', b"", data)

    def test_record_from_every_cloud_then_replay_offline(self):
        up = self.server("-q")
        ups = ["%s=%s" % (p, up.url) for p in ("vertex", "azure", "bedrock", "gemini")]
        env = dict(os.environ, AWS_ACCESS_KEY_ID="AKIDDPMOCK", AWS_SECRET_ACCESS_KEY="s3cret")
        rec = self.server("-q", "--record", self.dir, "--record-errors", "--upstream", *ups, env=env)
        live = []
        for path, headers, body in self.requests():
            st, _, data = rec.request("POST", path, json.dumps(body).encode(), headers)
            self.assertEqual(st, 400 if "does-not-exist" in path else 200, (path, data[:300]))
            live.append(data)
        forwarded = json.loads(up.request("GET", "/_control/requests")[2])["requests"]
        self.assertEqual([e["platform"] for e in forwarded], ["vertex"] * 2 + ["azure"] * 2 + ["gemini-openai"] +
                         ["bedrock"] * 5)
        signed = json.loads(up.request("GET", "/_control/requests?key=AKIDDPMOCK")[2])["requests"]
        self.assertEqual(len(signed), 4)  # the SigV4 ones, signed again with dpmock's AWS credentials
        self.assertEqual(len(json.loads(up.request("GET", "/_control/requests?key=bedrock-api-key-rec")[2])[
            "requests"]), 1)  # a Bedrock API key goes as it came
        self.assertEqual(up.stop(), 0)
        self.assertEqual(rec.stop(), 0)
        with open(os.path.join(self.dir, "default.json"), encoding="utf-8") as f:
            text = f.read()
        self.assertNotIn("bedrock-api-key-rec", text)
        rules = json.loads(text)["rules"]
        self.assertEqual([r["match"]["platform"] for r in rules], ["vertex"] * 2 + ["azure"] * 2 + ["gemini-openai"] +
                         ["bedrock"] * 5)
        self.assertNotIn("AKIDDPMOCK", text)
        chunks = [ev for r in rules for ev in r["respond"]["raw"].get("events", ()) if "chunk" in ev]
        self.assertIn("message_start", chunks[0]["chunk"])  # an InvokeModel chunk's bytes, readable
        replay = self.server("-q", "--rules", self.dir)
        for (path, headers, body), was in zip(self.requests(), live):
            st, hdrs, data = replay.request("POST", path, json.dumps(body).encode(), headers)
            self.assertEqual(st, 400 if "does-not-exist" in path else 200, (path, data[:300]))
            self.assertEqual(hdrs["content-type"] == "application/vnd.amazon.eventstream",
                             path.endswith("-stream"), path)
            if st == 400:
                self.assertEqual(hdrs["x-amzn-errortype"].split(":")[0], "ValidationException")
            if hdrs.get("content-type") == "application/vnd.amazon.eventstream":
                self.assertEqual(summary(eventstream(data)[0]), summary(eventstream(was)[0]), path)
            else:
                self.assertEqual(self.said(data), self.said(was), path)
        self.assertEqual({e["source"] for e in json.loads(replay.request("GET", "/_control/requests")[2])[
            "requests"]}, {"replayed"})
        body = dict(anthropic_messages("rec invoke"))  # Bedrock's recording is not Anthropic's own answer
        st, _, data = replay.request("POST", "/v1/messages", json.dumps(body).encode(), AN)
        self.assertEqual(json.loads(data)["content"][0]["text"], "dpmock reply to: rec invoke")
        raw, data = BedrockTest.stream(self, BEDROCK + "/converse-stream", converse("rec converse"),
                                       "STREAM_CUT; events=3", replay)
        self.assertEqual(len(eventstream(data)[0]), 3)  # faults act on a replayed event stream's messages

    def test_azure_needs_its_upstream_named(self):
        rec = self.server("-q", "--record", self.dir, "--upstream", "openai=http://127.0.0.1:9")
        st, _, data = rec.request("POST", AZURE + "chat/completions?api-version=2024-10-21",
                                  json.dumps(openai_chat("x")).encode(), AZ_KEY)
        self.assertEqual((st, json.loads(data)["error"]["code"]), (501, "not_forwarded"))
        self.assertIn("--upstream azure=", json.loads(data)["error"]["message"])
        self.assertEqual(os.listdir(self.dir), [])

    def test_each_cloud_request_goes_to_its_own_regions_host(self):
        from dpmocklib.config import parse_args
        from dpmocklib.record import Recorder, upstream_for
        import dpmock
        recorder = Recorder(parse_args(["--record", self.dir]), None)
        cases = [("POST", "/v1/projects/p/locations/europe-west4/publishers/google/models/g:generateContent", {},
                  "https://europe-west4-aiplatform.googleapis.com"),
                 ("POST", "/v1/projects/p/locations/global/publishers/google/models/g:generateContent", {},
                  "https://aiplatform.googleapis.com"),
                 ("POST", BEDROCK + "/converse", {"authorization": SIGV4["Authorization"].replace("us-east-1",
                                                                                                   "eu-west-3")},
                  "https://bedrock-runtime.eu-west-3.amazonaws.com"),
                 ("POST", "/v1beta/openai/chat/completions", {}, "https://generativelanguage.googleapis.com")]
        for method, path, headers, want in cases:
            route, params = dpmock.ROUTER.match(method, path.partition("?")[0])
            req = type("Req", (), {"route": route, "params": params, "provider": route.provider,
                                   "headers": headers, "voice": route.platform})()
            self.assertEqual(upstream_for(recorder.upstreams, req).url, want, path)
        route, params = dpmock.ROUTER.match("POST", "/v1/projects/p/locations/x.evil.com%2F/publishers/google/"
                                                    "models/g:generateContent")
        req = type("Req", (), {"route": route, "params": params, "provider": route.provider, "headers": {},
                               "voice": route.platform})()
        with self.assertRaises(dpmock.HTTPError) as cm:
            upstream_for(recorder.upstreams, req)
        self.assertEqual(cm.exception.status, 400)


def _token_credentials():
    creds = importlib.import_module("google.oauth2.credentials")
    return creds.Credentials(token="ya29.test-token",
                             expiry=datetime.datetime.utcnow() + datetime.timedelta(hours=1))


@unittest.skipUnless(_have("anthropic"), "the anthropic package is not installed (optional)")
class AnthropicVertexSdkTest(unittest.TestCase):
    """anthropic.AnthropicVertex: a plain call, a stream, a rule-driven agent step, a 429 and a cut stream."""

    def setUp(self):
        self.anthropic = importlib.import_module("anthropic")
        self.srv = Server("-q")
        self.addCleanup(self.srv.stop)
        self.srv.request("POST", "/_control/rules", json.dumps(RULES).encode())
        self.client = self.anthropic.AnthropicVertex(region="us-east5", project_id="proj", access_token="tok",
                                                     base_url=self.srv.url + "/v1", max_retries=0)
        self.addCleanup(self.client.close)

    def test_calls_streams_agent_step_and_errors(self):
        model = "claude-sonnet-4-5@20250929"
        r = self.client.messages.create(model=model, max_tokens=100, messages=[{"role": "user", "content": "hello"}])
        self.assertEqual(r.content[0].text, "Hello from " + model)
        with self.client.messages.stream(model=model, max_tokens=100,
                                         messages=[{"role": "user", "content": "hello"}]) as s:
            self.assertEqual("".join(s.text_stream), "Hello from " + model)
        tools = [{"name": "get_weather", "input_schema": TOOL}]
        msgs = [{"role": "user", "content": "what is the weather?"}]
        r = self.client.messages.create(model=model, max_tokens=100, messages=msgs, tools=tools)
        call = r.content[-1]
        self.assertEqual((call.name, call.input), ("get_weather", {"city": "Paris"}))
        msgs += [{"role": "assistant", "content": [b.model_dump() for b in r.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "22 C"}]}]
        r = self.client.messages.create(model=model, max_tokens=100, messages=msgs, tools=tools)
        self.assertEqual(r.content[0].text, "Sunny in Paris")
        self.assertEqual(self.client.messages.count_tokens(model=model, messages=msgs[:1]).input_tokens, 4)
        with self.assertRaises(self.anthropic.RateLimitError):
            self.client.messages.create(model=model, max_tokens=10, messages=msgs[:1],
                                        extra_headers={"X-DP-Scenario": "RATE_LIMITED"})
        with self.assertRaises(Exception) as cm:
            with self.client.messages.stream(model=model, max_tokens=100, messages=[{"role": "user", "content": "hi"}],
                                             extra_headers={"X-DP-Scenario": "STREAM_CUT; events=2"}) as s:
                s.get_final_message()
        self.assertNotIsInstance(cm.exception, AssertionError)


@unittest.skipUnless(_have("google.genai") and _have("google.oauth2.credentials"),
                     "the google-genai package is not installed (optional)")
class GeminiVertexSdkTest(unittest.TestCase):
    """google.genai.Client(vertexai=True): a plain call, a stream, a rule-driven agent step, a 429, a cut stream."""

    def setUp(self):
        genai = importlib.import_module("google.genai")
        self.types, self.errors = importlib.import_module("google.genai.types"), importlib.import_module(
            "google.genai.errors")
        self.srv = Server("-q")
        self.addCleanup(self.srv.stop)
        self.srv.request("POST", "/_control/rules", json.dumps(RULES).encode())

        def client(**headers):
            return genai.Client(vertexai=True, project="proj", location="us-central1",
                                credentials=_token_credentials(),
                                http_options=self.types.HttpOptions(base_url=self.srv.url, headers=headers))
        self.make, self.client = client, client()

    def test_calls_streams_agent_step_and_errors(self):
        t = self.types
        r = self.client.models.generate_content(model="gemini-2.5-flash", contents="hello")
        self.assertEqual(r.text, "Hello from gemini-2.5-flash")
        self.assertEqual("".join(c.text or "" for c in self.client.models.generate_content_stream(
            model="gemini-2.5-flash", contents="hello")), "Hello from gemini-2.5-flash")

        def get_weather(city: str) -> str:
            """Weather for a city."""
            return "22 C in " + city
        r = self.client.models.generate_content(model="gemini-2.5-flash", contents="what is the weather?",
                                                config=t.GenerateContentConfig(tools=[get_weather]))
        self.assertEqual(r.text, "Sunny in Paris")  # the SDK ran the tool and sent its result back
        self.assertEqual(self.client.models.count_tokens(model="gemini-2.5-flash", contents="a b c").total_tokens, 3)
        r = self.client.models.embed_content(model="text-embedding-005", contents=["hi there", "bye"])
        self.assertEqual([len(e.values) for e in r.embeddings], [768, 768])
        limited, cut = self.make(**{"X-DP-Scenario": "RATE_LIMITED"}), self.make(**{"X-DP-Scenario": "STREAM_CUT"})
        with self.assertRaises(self.errors.ClientError) as cm:
            limited.models.generate_content(model="gemini-2.5-flash", contents="x")
        self.assertEqual((cm.exception.code, cm.exception.status), (429, "RESOURCE_EXHAUSTED"))
        with self.assertRaises(Exception) as cm:
            list(cut.models.generate_content_stream(model="gemini-2.5-flash", contents="hello"))
        self.assertNotIsInstance(cm.exception, AssertionError)


@unittest.skipUnless(_have("openai"), "the openai package is not installed (optional)")
class AzureSdkTest(unittest.TestCase):
    """openai.AzureOpenAI: a plain call, a stream, a rule-driven agent step, a 429, a cut stream, a missing
    deployment, each as the SDK's own types."""

    def setUp(self):
        self.openai = importlib.import_module("openai")
        self.srv = Server("-q")
        self.addCleanup(self.srv.stop)
        self.srv.request("POST", "/_control/rules", json.dumps(RULES).encode())
        self.client = self.openai.AzureOpenAI(azure_endpoint=self.srv.url, api_key="az-key", api_version="2024-10-21",
                                              max_retries=0)
        self.addCleanup(self.client.close)

    def test_calls_streams_agent_step_and_errors(self):
        o, c = self.openai, self.client
        msgs = [{"role": "user", "content": "hello"}]
        self.assertEqual(c.chat.completions.create(model="my-gpt4o", messages=msgs).choices[0].message.content,
                         "Hello from my-gpt4o")
        with c.chat.completions.stream(model="my-gpt4o", messages=msgs) as s:
            self.assertEqual(s.get_final_completion().choices[0].message.content, "Hello from my-gpt4o")
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": TOOL}}]
        msgs = [{"role": "user", "content": "what is the weather?"}]
        r = c.chat.completions.create(model="my-gpt4o", messages=msgs, tools=tools)
        call = r.choices[0].message.tool_calls[0]
        self.assertEqual(json.loads(call.function.arguments), {"city": "Paris"})
        msgs += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "22 C"}]
        self.assertEqual(c.chat.completions.create(model="my-gpt4o", messages=msgs, tools=tools)
                         .choices[0].message.content, "Sunny in Paris")
        with self.assertRaises(o.RateLimitError):
            c.chat.completions.create(model="my-gpt4o", messages=msgs[:1],
                                      extra_headers={"X-DP-Scenario": "RATE_LIMITED"})
        with self.assertRaises(o.NotFoundError) as cm:
            c.chat.completions.create(model="gpt-does-not-exist", messages=msgs[:1])
        self.assertEqual(cm.exception.code, "DeploymentNotFound")
        with self.assertRaises(o.APIError):
            list(c.chat.completions.create(model="my-gpt4o", messages=msgs[:1], stream=True,
                                           extra_headers={"X-DP-Scenario": "STREAM_ERROR"}))
        with self.assertRaises(Exception) as cm:
            list(c.chat.completions.create(model="my-gpt4o", messages=msgs[:1], stream=True,
                                           extra_headers={"X-DP-Scenario": "STREAM_CUT; events=2"}))
        self.assertNotIsInstance(cm.exception, AssertionError)


def _scenario_hook(scenario):
    """A botocore handler that adds X-DP-Scenario to each request (before it is signed, as a real header)."""
    def add(request, **kwargs):
        request.headers["X-DP-Scenario"] = scenario
    return add


@unittest.skipUnless(_have("boto3"), "boto3 is not installed (optional)")
class BedrockBoto3SdkTest(unittest.TestCase):
    """boto3's bedrock-runtime: Converse and InvokeModel, plain and streamed, a rule-driven agent step, a 429 and
    a cut stream as botocore's own errors; the event stream read byte for byte by botocore's decoder."""

    def setUp(self):
        self.boto3 = importlib.import_module("boto3")
        self.config = importlib.import_module("botocore.config")
        self.exceptions = importlib.import_module("botocore.exceptions")
        self.srv = Server("-q")
        self.addCleanup(self.srv.stop)
        self.srv.request("POST", "/_control/rules", json.dumps(RULES).encode())
        self.client = self.make()

    def make(self, scenario=None):
        client = self.boto3.client("bedrock-runtime", region_name="us-east-1", endpoint_url=self.srv.url,
                                   aws_access_key_id="AKIDTEST", aws_secret_access_key="secret",
                                   config=self.config.Config(retries={"total_max_attempts": 1}))
        if scenario:
            client.meta.events.register("before-sign.bedrock-runtime.*", _scenario_hook(scenario))
        self.addCleanup(client.close)
        return client

    def test_converse_invoke_agent_step_and_errors(self):
        c, m = self.client, BEDROCK_MODEL
        r = c.converse(modelId=m, messages=[{"role": "user", "content": [{"text": "hello"}]}])
        self.assertEqual(r["output"]["message"]["content"][0]["text"], "Hello from " + m)
        events = list(c.converse_stream(modelId=m, messages=[{"role": "user", "content": [{"text": "hello"}]}])[
            "stream"])
        self.assertEqual("".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e),
                         "Hello from " + m)
        self.assertEqual(list(events[-1]), ["metadata"])
        tools = {"tools": [{"toolSpec": {"name": "get_weather", "inputSchema": {"json": TOOL}}}]}
        msgs = [{"role": "user", "content": [{"text": "what is the weather?"}]}]
        r = c.converse(modelId=m, messages=msgs, toolConfig=tools)
        use = r["output"]["message"]["content"][0]["toolUse"]
        self.assertEqual((r["stopReason"], use["input"]), ("tool_use", {"city": "Paris"}))
        msgs += [r["output"]["message"], {"role": "user", "content": [{"toolResult": {
            "toolUseId": use["toolUseId"], "content": [{"text": "22 C"}]}}]}]
        r = c.converse(modelId=m, messages=msgs, toolConfig=tools)
        self.assertEqual(r["output"]["message"]["content"][0]["text"], "Sunny in Paris")
        body = json.dumps(bedrock_invoke("hello"))
        self.assertEqual(json.loads(c.invoke_model(modelId=m, body=body)["body"].read())["content"][0]["text"],
                         "Hello from " + m)
        chunks = [json.loads(e["chunk"]["bytes"]) for e in
                  c.invoke_model_with_response_stream(modelId=m, body=body)["body"]]
        self.assertEqual("".join(e["delta"].get("text", "") for e in chunks if e["type"] == "content_block_delta"),
                         "Hello from " + m)
        self.assertEqual(c.count_tokens(modelId=m, input={"converse": {"messages": msgs[:1]}})["inputTokens"], 4)
        with self.assertRaises(c.exceptions.ThrottlingException):
            self.make("RATE_LIMITED").converse(modelId=m, messages=msgs[:1])
        with self.assertRaises(c.exceptions.ValidationException):
            c.converse(modelId="anthropic.claude-does-not-exist", messages=msgs[:1])
        stream = self.make("STREAM_ERROR").converse_stream(modelId=m, messages=msgs[:1])["stream"]
        self.addCleanup(stream.close)
        with self.assertRaises(self.exceptions.EventStreamError) as cm:
            list(stream)
        self.assertEqual(cm.exception.response["Error"]["Code"], "internalServerException")
        for stream in (self.make("STREAM_CUT; events=2").converse_stream(modelId=m, messages=msgs[:1])["stream"],
                       self.make("STREAM_CUT; events=2").invoke_model_with_response_stream(modelId=m, body=body)[
                           "body"]):
            self.addCleanup(stream.close)
            with self.assertRaises(Exception) as cm:
                list(stream)
            self.assertNotIsInstance(cm.exception, AssertionError)

    def test_botocores_decoder_reads_every_byte(self):
        eventstream_mod = importlib.import_module("botocore.eventstream")
        for path, body, scenario in ((BEDROCK + "/invoke-with-response-stream", bedrock_invoke("hello"), None),
                                     (BEDROCK + "/converse-stream", converse("the weather", tools=True), None),
                                     (BEDROCK + "/converse-stream", converse("hello"), "STREAM_ERROR; after=2"),
                                     (BEDROCK + "/invoke-with-response-stream", bedrock_invoke("hello \u00fc\u2713"),
                                      "SSE_SPLIT; every=5")):
            headers = dict(SIGV4, **({"X-DP-Scenario": scenario} if scenario else {}))
            with socket.create_connection((self.srv.host, self.srv.port), timeout=5) as sock:
                sock.sendall(raw_request(path, headers, body, close=True))
                raw = recv_all(sock)
            _, _, data, _ = split_response(raw)
            ours, rest = eventstream(data)
            buf = eventstream_mod.EventStreamBuffer()
            buf.add_data(data)  # botocore checks each prelude and message CRC32 (ChecksumMismatch otherwise)
            theirs = list(buf)
            self.assertEqual((rest, sum(m.prelude.total_length for m in theirs)), (b"", len(data)), path)
            self.assertEqual([(m.headers, m.payload) for m in theirs], ours, path)
            for m, (h, p) in zip(theirs, ours):  # the same bytes again from what botocore read
                self.assertEqual(m.prelude.headers_length + len(m.payload) + 16, m.prelude.total_length)
                self.assertEqual(m.crc, zlib.crc32(data[:m.prelude.total_length - 4]))
                data = data[m.prelude.total_length:]
            if scenario and scenario.startswith("STREAM_ERROR"):
                self.assertEqual(theirs[-1].to_response_dict()["status_code"], 400)

    def test_record_signs_bedrock_requests_again_as_botocore_would(self):
        captured = []

        class Upstream(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                captured.append((self.path, dict(self.headers), body))
                out = json.dumps({"output": {"message": {"role": "assistant", "content": [{"text": "signed"}]}},
                                  "stopReason": "end_turn", "metrics": {"latencyMs": 1},
                                  "usage": {"inputTokens": 1, "outputTokens": 1, "totalTokens": 2}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        self.addCleanup(httpd.server_close)
        self.addCleanup(httpd.shutdown)
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder, True)
        env = dict(os.environ, AWS_ACCESS_KEY_ID="AKIDDPMOCK", AWS_SECRET_ACCESS_KEY="s3cret", AWS_SESSION_TOKEN="tok")
        rec = Server("-q", "--record", folder, "--upstream", "bedrock=http://127.0.0.1:%d" % httpd.server_port,
                     env=env)
        self.addCleanup(rec.stop)
        client = self.boto3.client("bedrock-runtime", region_name="eu-west-3", endpoint_url=rec.url,
                                   aws_access_key_id="AKIDCLIENT", aws_secret_access_key="other",
                                   config=self.config.Config(retries={"total_max_attempts": 1}))
        self.addCleanup(client.close)
        r = client.converse(modelId=BEDROCK_MODEL, messages=[{"role": "user", "content": [{"text": "sign it"}]}])
        self.assertEqual(r["output"]["message"]["content"][0]["text"], "signed")
        path, headers, body = captured[0]
        stamp = headers["X-Amz-Date"]
        auth, awsrequest = importlib.import_module("botocore.auth"), importlib.import_module("botocore.awsrequest")
        credentials = importlib.import_module("botocore.credentials")
        req = awsrequest.AWSRequest(method="POST", url="http://127.0.0.1:%d%s" % (httpd.server_port, path), data=body,
                                    headers={"X-Amz-Date": stamp, "X-Amz-Security-Token": "tok"})
        req.context["timestamp"] = stamp
        signer = auth.SigV4Auth(credentials.Credentials("AKIDDPMOCK", "s3cret", "tok"), "bedrock", "eu-west-3")
        signature = signer.signature(signer.string_to_sign(req, signer.canonical_request(req)), req)
        self.assertEqual(headers["Authorization"], "AWS4-HMAC-SHA256 Credential=AKIDDPMOCK/%s/eu-west-3/bedrock/"
                         "aws4_request, SignedHeaders=host;x-amz-date;x-amz-security-token, Signature=%s"
                         % (stamp[:8], signature))
        self.assertEqual(path, BEDROCK + "/converse")


@unittest.skipUnless(_have("anthropic") and _have("botocore"), "the anthropic and botocore packages are not "
                     "installed (optional)")
class AnthropicBedrockSdkTest(unittest.TestCase):
    """anthropic.AnthropicBedrock (SigV4, and a Bedrock API key): a plain call, a stream, a rule-driven agent
    step, a 429, a stream error and a cut stream, as the SDK's own types."""

    def setUp(self):
        self.anthropic = importlib.import_module("anthropic")
        self.srv = Server("-q")
        self.addCleanup(self.srv.stop)
        self.srv.request("POST", "/_control/rules", json.dumps(RULES).encode())
        self.client = self.make()

    def make(self, **keys):
        keys = keys or {"aws_access_key": "AKIDTEST", "aws_secret_key": "secret"}
        client = self.anthropic.AnthropicBedrock(base_url=self.srv.url, aws_region="us-east-1", max_retries=0, **keys)
        self.addCleanup(client.close)
        return client

    def test_calls_streams_agent_step_and_errors(self):
        a, c, m = self.anthropic, self.client, BEDROCK_MODEL
        hello = [{"role": "user", "content": "hello"}]
        self.assertEqual(c.messages.create(model=m, max_tokens=100, messages=hello).content[0].text, "Hello from " + m)
        with c.messages.stream(model=m, max_tokens=100, messages=hello) as s:
            self.assertEqual("".join(s.text_stream), "Hello from " + m)
        tools = [{"name": "get_weather", "input_schema": TOOL}]
        msgs = [{"role": "user", "content": "what is the weather?"}]
        r = c.messages.create(model=m, max_tokens=100, messages=msgs, tools=tools)
        call = r.content[-1]
        self.assertEqual((call.name, call.input), ("get_weather", {"city": "Paris"}))
        msgs += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "22 C"}]}]
        self.assertEqual(c.messages.create(model=m, max_tokens=100, messages=msgs, tools=tools).content[0].text,
                         "Sunny in Paris")
        self.assertEqual(self.make(api_key="bedrock-api-key").messages.create(
            model=m, max_tokens=100, messages=hello).content[0].text, "Hello from " + m)
        with self.assertRaises(a.RateLimitError):
            c.messages.create(model=m, max_tokens=10, messages=hello, extra_headers={"X-DP-Scenario": "RATE_LIMITED"})
        with self.assertRaises(a.PermissionDeniedError):
            self.make(aws_access_key="dummy_key", aws_secret_key="x").messages.create(model=m, max_tokens=10,
                                                                                      messages=hello)
        with self.assertRaises(a.APIStatusError):
            with c.messages.stream(model=m, max_tokens=100, messages=hello,
                                   extra_headers={"X-DP-Scenario": "STREAM_ERROR"}) as s:
                s.get_final_message()
        with self.assertRaises(Exception) as cm:
            with c.messages.stream(model=m, max_tokens=100, messages=hello,
                                   extra_headers={"X-DP-Scenario": "STREAM_CUT; events=2"}) as s:
                s.get_final_message()
        self.assertNotIsInstance(cm.exception, (AssertionError, a.APIStatusError))

if __name__ == "__main__":
    unittest.main()
