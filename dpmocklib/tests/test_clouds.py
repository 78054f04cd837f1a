"""The providers' models on the clouds that serve them (Vertex AI): their paths, keys and error shapes, with
the same engines, rules and faults; the official cloud clients where they are installed."""

import datetime
import importlib
import json
import os
import shutil
import tempfile
import unittest

from .support import (AN, GE, Server, _have, anthropic_messages, gemini_contents, openai_chat, raw_request,
    sse_events)

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


class VertexRecordTest(unittest.TestCase):

    def test_record_says_it_does_not_forward_vertex_paths(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        srv = Server("-q", "--record", d, "--upstream", "gemini=http://127.0.0.1:9", "--upstream",
                     "anthropic=http://127.0.0.1:9")
        self.addCleanup(srv.stop)
        for path, body in ((VERTEX_GEMINI + "generateContent", gemini_contents("x")),
                           (VERTEX_CLAUDE + "rawPredict", vertex_claude("x")),
                           (VERTEX + "/google/models/text-embedding-005:predict", {"instances": [{"content": "x"}]})):
            st, _, data = srv.request("POST", path, json.dumps(body).encode(), BEARER)
            err = json.loads(data)["error"]
            self.assertEqual((st, err["status"]), (501, "UNIMPLEMENTED"))
            self.assertIn("vertex", err["message"])
        st, _, data = srv.request("POST", "/v1beta/openai/chat/completions", json.dumps(openai_chat("x")).encode(),
                                  {"Authorization": "Bearer gemini-key"})  # never to the OpenAI upstream
        self.assertEqual((st, json.loads(data)["error"]["code"]), (501, "not_forwarded"))
        self.assertEqual(os.listdir(d), [])


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


if __name__ == "__main__":
    unittest.main()
