"""The official SDKs (openai, anthropic, google-genai) against dpmock; skipped when not installed."""

import importlib
import json
import typing
import unittest

from dpmock import cosine
from dpmocklib.base import scenarios

from .support import SERVER, Server, _have


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
            png = resp.read()
            self.assertTrue(png.startswith(b"\x89PNG\r\n"))
        edited = self.client.images.edit(image=("fox.png", png, "image/png"), prompt="make it blue", n=2,
                                         response_format="b64_json")
        self.assertEqual(len(edited.data), 2)
        self.assertTrue(__import__("base64").b64decode(edited.data[0].b64_json).startswith(b"\x89PNG\r\n"))
        varied = self.client.images.create_variation(image=("fox.png", png, "image/png"))
        self.assertIn("/_images/", varied.data[0].url)

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


@unittest.skipUnless(_have("agents"), "the openai-agents package is not installed (optional)")
class OpenAIAgentsSdkTest(unittest.TestCase):
    """The OpenAI Agents SDK, offline: its agent loop calls a function tool and answers from its result, on
    the Responses API (its default) and on Chat Completions, with tracing off (it would call OpenAI)."""

    RULES = [{"match": {"text": "weather"}, "respond": {"tool_calls": [
                  {"name": "get_weather", "arguments": {"city": "Paris"}}]}},
             {"match": {"tool_result": "get_weather"}, "respond": {"text": "It is {{tool_result}} in {{args.city}}"}}]

    def setUp(self):
        self.srv = Server("-q", "--strict")
        self.addCleanup(self.srv.stop)
        st, _, out = self.srv.request("POST", "/_control/rules", json.dumps(self.RULES).encode(), {})
        self.assertEqual(st, 200, out)

    def test_an_agent_with_a_tool_runs_offline_on_both_apis(self):
        agents = importlib.import_module("agents")
        openai = importlib.import_module("openai")
        agents.set_tracing_disabled(True)
        calls = []

        @agents.function_tool
        def get_weather(city: str) -> str:
            """The weather in a city."""
            calls.append(city)
            return "sunny"
        for model_class in (agents.OpenAIResponsesModel, agents.OpenAIChatCompletionsModel):
            with self.subTest(model_class.__name__):
                client = openai.AsyncOpenAI(api_key="sk-test", base_url=self.srv.url + "/v1", max_retries=0)
                agent = agents.Agent(name="weather", instructions="Answer about the weather.", tools=[get_weather],
                                     model=model_class(model="gpt-4o", openai_client=client))
                result = agents.Runner.run_sync(agent, "What is the weather in Paris?")
                self.assertEqual(result.final_output, "It is sunny in Paris")
        self.assertEqual(calls, ["Paris", "Paris"])
        routes = [e["route"] for e in json.loads(self.srv.request("GET", "/_control/requests")[2])["requests"]]
        self.assertEqual(routes, ["responses", "responses", "chat", "chat"])


@unittest.skipUnless(_have("anthropic"), "the anthropic package is not installed (optional)")
class AnthropicToolRunnerSdkTest(unittest.TestCase):
    """anthropic's own agent helper (client.beta.messages.tool_runner) loops over dpmock's rules to the answer."""

    def test_the_tool_runner_calls_the_tool_and_ends_on_the_rules_answer(self):
        anthropic = importlib.import_module("anthropic")
        srv = Server("-q", "--strict")
        self.addCleanup(srv.stop)
        rules = [{"match": {"text": "weather"}, "respond": {"tool_calls": [
                     {"name": "get_weather", "arguments": {"city": "Paris"}}]}},
                 {"match": {"tool_result": "get_weather"}, "respond": {"text": "{{tool_result}} in {{args.city}}"}}]
        self.assertEqual(srv.request("POST", "/_control/rules", json.dumps(rules).encode(), {})[0], 200)
        calls = []

        @anthropic.beta_tool
        def get_weather(city: str) -> str:
            """The weather in a city."""
            calls.append(city)
            return "Sunny"
        client = anthropic.Anthropic(api_key="sk-ant-test", base_url=srv.url, max_retries=0)
        self.addCleanup(client.close)
        runner = client.beta.messages.tool_runner(model="claude-sonnet-4-5", max_tokens=200, tools=[get_weather],
                                                  messages=[{"role": "user", "content": "The weather in Paris?"}])
        final = runner.until_done()
        self.assertEqual([b.text for b in final.content if b.type == "text"], ["Sunny in Paris"])
        self.assertEqual(calls, ["Paris"])
