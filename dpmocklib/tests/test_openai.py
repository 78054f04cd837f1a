"""OpenAI routes: chat completions, structured outputs, embeddings, completions, images, moderations."""

import base64
import json
import math
import struct
import unittest

from dpmock import cosine
from dpmocklib.base import scenarios
import dpmock

from .support import (AN, CHAT, GE, OA, SERVER, WEATHER_SCHEMA, jpost, jsonschema, post_raw, scen, split_response,
    sse_chunks, sse_events)


class OpenAIRoutesTest(unittest.TestCase):

    def test_chat_text(self):
        st, hdrs, r = jpost("/v1/chat/completions", {"model": "gpt-4o", "messages": [
            {"role": "system", "content": "Be brief"}, {"role": "user", "content": [
                {"type": "text", "text": "Hi   there"}, {"type": "image_url", "image_url": {"url": "x"}}]}]}, OA)
        self.assertEqual(st, 200)
        self.assertTrue(hdrs["x-request-id"].startswith("req_"))
        self.assertTrue(r["id"].startswith("chatcmpl-"))
        self.assertEqual(r["object"], "chat.completion")
        msg = r["choices"][0]["message"]
        self.assertEqual((msg["role"], msg["content"], r["choices"][0]["finish_reason"]),
                         ("assistant", "dpmock reply to: Hi there", "stop"))
        # 2 + 2 words of prompt + one image; 5 words of answer
        self.assertEqual((r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"], r["usage"]["total_tokens"]),
                         (4 + dpmock.MEDIA_TOKENS, 5, 9 + dpmock.MEDIA_TOKENS))

    def test_ids_are_unique(self):
        ids = {jpost("/v1/chat/completions", json.loads(CHAT), OA)[2]["id"] for _ in range(5)}
        self.assertEqual(len(ids), 5)

    def test_stream_framing_and_usage(self):
        raw = post_raw({"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True},
                        "messages": [{"role": "user", "content": "Hi there"}]}, "/chat/completions", OA)
        hdrs, chunks = sse_chunks(raw)
        self.assertEqual(hdrs["content-type"], "text/event-stream; charset=utf-8")
        for c in chunks:
            self.assertTrue(c.startswith(b"data: ") and c.endswith(b"\n\n") and c.count(b"\n") == 2, c)
        self.assertEqual(chunks[-1], b"data: [DONE]\n\n")
        events = [json.loads(c[6:]) for c in chunks[:-1]]
        self.assertEqual({e["object"] for e in events}, {"chat.completion.chunk"})
        self.assertEqual(events[0]["choices"][0]["delta"]["role"], "assistant")
        self.assertEqual("".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]),
                         "dpmock reply to: Hi there")
        finish = events[-2]["choices"][0]
        self.assertEqual((finish["delta"], finish["finish_reason"]), ({}, "stop"))
        self.assertEqual((events[-1]["choices"], events[-1]["usage"]["total_tokens"]), ([], 7))
        self.assertEqual(len({e["id"] for e in events}), 1)

    def test_tool_call_valid_against_schema_streamed_too(self):
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Weather?"}],
                "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}]}
        _, _, r = jpost("/v1/chat/completions", body, OA)
        choice = r["choices"][0]
        call = choice["message"]["tool_calls"][0]
        self.assertEqual((choice["finish_reason"], choice["message"]["content"], call["type"]),
                         ("tool_calls", None, "function"))
        self.assertTrue(call["id"].startswith("call_"))
        self.assertIsInstance(call["function"]["arguments"], str)
        self.assertEqual(json.loads(call["function"]["arguments"]), {"city": "example", "unit": "C"})
        _, chunks = sse_chunks(post_raw(dict(body, stream=True), "/v1/chat/completions", OA))
        events = [json.loads(c[6:]) for c in chunks[:-1]]
        frags = [tc for e in events for tc in e["choices"][0]["delta"].get("tool_calls", [])]
        self.assertEqual((frags[0]["function"]["name"], frags[0]["function"]["arguments"]), ("get_weather", ""))
        self.assertGreater(len(frags), 2)
        self.assertEqual(json.loads("".join(f["function"]["arguments"] for f in frags)),
                         {"city": "example", "unit": "C"})
        self.assertEqual(events[-1]["choices"][0]["finish_reason"], "tool_calls")

    def test_tool_result_answers_with_text(self):
        body = {"model": "gpt-4o", "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "22 and Sunny in Tokyo"}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}]}
        _, _, r = jpost("/v1/chat/completions", body, OA)
        self.assertEqual(r["choices"][0]["message"]["content"], "The get_weather tool returned: 22 and Sunny in Tokyo")
        body["tool_choice"] = "none"
        body["messages"] = body["messages"][:1]
        _, _, r = jpost("/v1/chat/completions", body, OA)
        self.assertEqual(r["choices"][0]["message"]["content"], "dpmock reply to: Weather?")

    def test_reasoning_content_and_max_tokens(self):
        body = {"model": "o4-mini", "reasoning_effort": "high", "max_completion_tokens": 2,
                "messages": [{"role": "user", "content": "why is it so"}]}
        _, _, r = jpost("/v1/chat/completions", body, OA)
        msg = r["choices"][0]
        self.assertEqual((msg["message"]["reasoning_content"], msg["message"]["content"], msg["finish_reason"]),
                         ("Thinking about: why is it so", "dpmock reply ", "length"))
        self.assertEqual(r["usage"]["completion_tokens_details"]["reasoning_tokens"], 6)
        _, chunks = sse_chunks(post_raw(dict(body, stream=True), "/v1/chat/completions", OA))
        deltas = [json.loads(c[6:])["choices"][0]["delta"] for c in chunks[:-1]]
        self.assertEqual("".join(d.get("reasoning_content", "") for d in deltas), "Thinking about: why is it so")

    def test_errors_in_openai_shape(self):
        msgs = [{"role": "user", "content": "x"}]
        cases = [
            ({"messages": msgs}, OA, 400, "model", None),
            ({"model": "gpt-4o", "messages": []}, OA, 400, "messages", None),
            ({"model": "gpt-4o", "messages": msgs, "tools": [{"type": "function", "function": {}}]}, OA, 400,
             "tools[0].function.name", "missing_required_parameter"),
            ({"model": "gpt-4o", "messages": msgs, "max_tokens": 0}, OA, 400, "max_tokens", None),
            ({"model": "gpt-4o", "messages": msgs}, {"Authorization": "Bearer invalid-abc"}, 401, None,
             "invalid_api_key"),
            ({"model": "gpt-4o", "messages": msgs}, {"Authorization": "Bearer dummy_key"}, 401, None,
             "invalid_api_key"),
            ({"model": "gpt-4o", "messages": msgs}, {}, 401, None, None),
            ({"model": "gpt-does-not-exist", "messages": msgs}, OA, 404, None, "model_not_found"),
        ]
        for body, headers, status, param, code in cases:
            with self.subTest(body=body, headers=headers):
                st, hdrs, r = jpost("/v1/chat/completions", body, headers)
                self.assertEqual(st, status)
                self.assertEqual(set(r["error"]), {"message", "type", "param", "code"})
                self.assertEqual((r["error"]["param"], r["error"]["code"]), (param, code))
                self.assertTrue(hdrs["x-request-id"].startswith("req_"))

    def test_models(self):
        st, _, data = SERVER.request("GET", "/v1/models", None, OA)
        r = json.loads(data)
        self.assertEqual((st, r["object"]), (200, "list"))
        self.assertEqual([m["id"] for m in r["data"]], [m[0] for m in scenarios.OPENAI_MODELS])
        st, _, data = SERVER.request("GET", "/v1/models/gpt-4o-mini", None, OA)
        self.assertEqual(json.loads(data), {"id": "gpt-4o-mini", "object": "model", "created": 1721172741,
                                            "owned_by": "system"})
        st, _, data = SERVER.request("GET", "/v1/models/gpt-does-not-exist", None, OA)
        self.assertEqual((st, json.loads(data)["error"]["code"]), (404, "model_not_found"))

    def test_file_upload_multipart_streamed(self):
        boundary = "----dpmockBoundary7"
        content = b"line\r\n--not-the-boundary\r\n" * 5000
        body = ("--%s\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nassistants\r\n"
                "--%s\r\nContent-Disposition: form-data; name=\"file\"; filename=\"notes.txt\"\r\n"
                "Content-Type: text/plain\r\n\r\n" % (boundary, boundary)).encode() + content + \
            ("\r\n--%s--\r\n" % boundary).encode()
        # chunked, in pieces of 1000 bytes, so the boundary falls across pieces
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000])
                           for i in range(0, len(body), 1000)) + b"0\r\n\r\n"
        raw = SERVER.raw(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nConnection: close\r\n"
                         b"Content-Type: multipart/form-data; boundary=" + boundary.encode() +
                         b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
        st, _, data, _ = split_response(raw)
        f = json.loads(data)
        self.assertEqual((st, f["object"], f["filename"], f["bytes"], f["purpose"]),
                         (200, "file", "notes.txt", len(content), "assistants"))
        st, _, data = SERVER.request("GET", "/v1/files/" + f["id"], None, OA)
        self.assertEqual(json.loads(data), f)
        st, _, data = SERVER.request("GET", "/v1/files", None, OA)
        self.assertIn(f["id"], [x["id"] for x in json.loads(data)["data"]])
        st, _, data = SERVER.request("DELETE", "/v1/files/" + f["id"], None, OA)
        self.assertEqual(json.loads(data), {"id": f["id"], "object": "file", "deleted": True})
        st, _, data = SERVER.request("GET", "/v1/files/" + f["id"], None, OA)
        self.assertEqual(st, 404)

    def test_file_upload_refusals(self):
        st, _, r = jpost("/v1/files", b"x", dict(OA, **{"Content-Type": "text/plain"}))
        self.assertEqual(st, 400)
        self.assertIn("multipart/form-data", r["error"]["message"])
        body = b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--b--\r\n'
        st, _, r = jpost("/v1/files", body, dict(OA, **{"Content-Type": "multipart/form-data; boundary=b"}))
        self.assertEqual((st, r["error"]["param"]), (400, "file"))

    def test_images_b64_and_url(self):
        import zlib
        _, _, r = jpost("/v1/images/generations", {"prompt": "a red fox", "model": "dall-e-3", "n": 2,
                                                   "response_format": "b64_json"}, OA)
        self.assertEqual(len(r["data"]), 2)
        png = __import__("base64").b64decode(r["data"][0]["b64_json"])
        self.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
        idat = png[png.index(b"IDAT") + 4:png.index(b"IEND") - 8]
        self.assertEqual(len(zlib.decompress(idat)), 8 * (1 + 8 * 3))  # 8 rows of filter byte + 8 RGB pixels
        _, _, r = jpost("/v1/images/generations", {"prompt": "a red fox", "model": "dall-e-3"}, OA)
        url = r["data"][0]["url"]
        self.assertTrue(url.startswith(SERVER.url + "/_images/"))
        st, hdrs, data = SERVER.request("GET", url[len(SERVER.url):])
        self.assertEqual((st, hdrs["content-type"], data[:4]), (200, "image/png", b"\x89PNG"))
        st, _, r = jpost("/v1/images/generations", {"model": "dall-e-3"}, OA)
        self.assertEqual((st, r["error"]["param"]), (400, "prompt"))

    def test_image_edits_and_variations(self):
        png = base64.b64decode(jpost("/v1/images/generations", {"prompt": "x", "response_format": "b64_json"},
                                     OA)[2]["data"][0]["b64_json"])

        def form(fields, images=("image",)):
            body = b"".join(b'--B\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (k.encode(),
                                                                                                   v.encode())
                            for k, v in fields)
            body += b"".join(b'--B\r\nContent-Disposition: form-data; name="%s"; filename="i.png"\r\n'
                             b'Content-Type: image/png\r\n\r\n%s\r\n' % (name.encode(), png) for name in images)
            return body + b"--B--\r\n", dict(OA, **{"Content-Type": "multipart/form-data; boundary=B"})
        st, _, r = jpost("/v1/images/edits", *form([("prompt", "make it blue"), ("n", "2"),
                                                    ("response_format", "b64_json")]))
        self.assertEqual((st, len(r["data"])), (200, 2), r)
        self.assertEqual(base64.b64decode(r["data"][0]["b64_json"])[:4], b"\x89PNG")
        st, _, r = jpost("/v1/images/edits", *form([("prompt", "merge"), ("model", "gpt-image-1")],
                                                   ("image[]", "image[]")))
        self.assertEqual((st, "usage" in r, "b64_json" in r["data"][0]), (200, True, True))
        st, _, r = jpost("/v1/images/variations", *form([]))
        self.assertTrue(r["data"][0]["url"].startswith(SERVER.url + "/_images/"))
        for path, fields, images, param in (("/v1/images/edits", [], ("image",), "prompt"),
                                            ("/v1/images/edits", [("prompt", "x")], (), "image"),
                                            ("/v1/images/edits", [("prompt", "x")], ("image", "image"), "image"),
                                            ("/v1/images/variations", [("model", "gpt-image-1")], ("image",), "model"),
                                            ("/v1/images/variations", [("n", "11")], ("image",), "n"),
                                            ("/v1/images/edits", [("prompt", "x"), ("stream", "true")], ("image",),
                                             "stream")):
            st, _, r = jpost(path, *form(fields, images))
            self.assertEqual((st, r["error"]["param"]), (400, param), (path, fields))


class StructuredOutputTest(unittest.TestCase):
    """JSON valid against the requested schema, on every provider, streamed or not."""

    SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "rating", "cast"],
              "properties": {"title": {"type": "string"}, "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                             "cast": {"type": "array", "minItems": 2, "items": {"$ref": "#/$defs/Person"}}},
              "$defs": {"Person": {"type": "object", "required": ["name", "role"], "additionalProperties": False,
                                   "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
                                                  "role": {"enum": ["lead", "support"]},
                                                  "age": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}}}}
    USER = [{"role": "user", "content": "Review Alien"}]

    def check(self, text):
        value = json.loads(text)
        self.assertEqual(value["title"], "dpmock reply to: Review Alien")  # the first string carries the answer
        if jsonschema is not None:
            jsonschema.validate(value, self.SCHEMA)
        self.assertEqual(len(value["cast"]), 2)
        return value

    def test_openai_json_schema_and_json_object(self):
        fmt = {"type": "json_schema", "json_schema": {"name": "review", "strict": True, "schema": self.SCHEMA}}
        st, _, r = jpost("/v1/chat/completions", {"model": "gpt-4o", "messages": self.USER, "response_format": fmt},
                         OA)
        self.assertEqual((st, r["choices"][0]["finish_reason"], r["choices"][0]["message"]["refusal"]),
                         (200, "stop", None))
        self.check(r["choices"][0]["message"]["content"])
        _, chunks = sse_chunks(post_raw({"model": "gpt-4o", "messages": self.USER, "response_format": fmt,
                                         "stream": True}, "/v1/chat/completions", OA))
        deltas = [json.loads(e[1]) for c in chunks for e in sse_events(c) if e[1] != "[DONE]"]
        self.check("".join(d["choices"][0]["delta"].get("content") or "" for d in deltas))
        st, _, r = jpost("/v1/chat/completions", {"model": "gpt-4o", "messages": self.USER,
                                                  "response_format": {"type": "json_object"}}, OA)
        self.assertEqual(json.loads(r["choices"][0]["message"]["content"]), {"response": "dpmock reply to: Review Alien"})
        st, _, r = jpost("/v1/chat/completions", {"model": "gpt-4o", "messages": self.USER,
                                                  "response_format": {"type": "xml"}}, OA)
        self.assertEqual((st, r["error"]["param"]), (400, "response_format.type"))

    def test_anthropic_output_config_format(self):
        body = {"model": "claude-sonnet-4-5", "max_tokens": 500, "messages": self.USER,
                "output_config": {"format": {"type": "json_schema", "schema": self.SCHEMA}}}
        st, _, r = jpost("/v1/messages", body, AN)
        self.assertEqual((st, r["stop_reason"], r["content"][0]["type"]), (200, "end_turn", "text"))
        self.check(r["content"][0]["text"])
        events = [json.loads(c.split(b"data: ", 1)[1]) for c in sse_chunks(post_raw(dict(body, stream=True),
                                                                                   "/v1/messages", AN))[1]]
        self.check("".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta"))
        usage = [e for e in events if e["type"] == "message_delta"][0]["usage"]
        self.assertEqual(set(usage), {"input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                                      "output_tokens"})
        self.assertEqual(usage["input_tokens"], events[0]["message"]["usage"]["input_tokens"])

    def test_gemini_response_schema_and_json_schema(self):
        gemini_schema = {"type": "OBJECT", "properties": {"score": {"type": "INTEGER"}, "title": {"type": "STRING"},
                                                          "tags": {"type": "ARRAY", "items": {"type": "STRING"},
                                                                   "nullable": True}},
                         "propertyOrdering": ["score", "title", "tags"], "required": ["score", "title"]}
        for config, schema in (({"responseMimeType": "application/json", "responseSchema": gemini_schema}, None),
                               ({"response_mime_type": "application/json", "response_json_schema": self.SCHEMA},
                                self.SCHEMA)):
            body = {"contents": [{"parts": [{"text": "Review Alien"}]}], "generationConfig": config}
            st, _, r = jpost("/v1beta/models/gemini-2.5-flash:generateContent", body, GE)
            text = r["candidates"][0]["content"]["parts"][0]["text"]
            value = self.check(text) if schema else json.loads(text)
            if schema is None:
                self.assertEqual(list(value)[:2], ["score", "title"])
                self.assertEqual(value["title"], "dpmock reply to: Review Alien")
            raw = post_raw(body, "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", GE)
            parts = [json.loads(e[1])["candidates"][0]["content"]["parts"][0]["text"]
                     for c in sse_chunks(raw)[1] for e in [c.decode().split("data: ", 1)]]
            self.assertEqual(json.loads("".join(parts)), value)

    def test_tool_arguments_for_nested_models_are_valid(self):
        tools = [{"type": "function", "function": {"name": "save", "parameters": self.SCHEMA}}]
        st, _, r = jpost("/v1/chat/completions", {"model": "gpt-4o", "messages": self.USER, "tools": tools}, OA)
        args = json.loads(r["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
        if jsonschema is not None:
            jsonschema.validate(args, self.SCHEMA)
        self.assertEqual([p["role"] for p in args["cast"]], ["lead", "lead"])


class EmbeddingsAndLegacyRoutesTest(unittest.TestCase):
    """/embeddings, Gemini's embedContent and batchEmbedContents, /completions and /moderations."""

    def test_openai_embeddings(self):
        st, _, r = jpost("/v1/embeddings", {"model": "text-embedding-3-small",
                                            "input": ["the cat sat on the mat", "a cat on a mat", "quarterly revenue grew"]},
                         OA)
        self.assertEqual((st, r["object"], r["model"], len(r["data"])), (200, "list", "text-embedding-3-small", 3))
        vecs = [d["embedding"] for d in r["data"]]
        self.assertEqual([len(v) for v in vecs], [1536] * 3)
        self.assertAlmostEqual(math.sqrt(sum(x * x for x in vecs[0])), 1.0, places=6)
        self.assertGreater(cosine(vecs[0], vecs[1]), cosine(vecs[0], vecs[2]) + 0.2)
        self.assertEqual(r["usage"], {"prompt_tokens": 14, "total_tokens": 14})  # 6 + 5 + 3 words
        st, _, r = jpost("/v1/embeddings", {"model": "text-embedding-3-large", "input": [[1, 2, 3], [4, 5]],
                                            "dimensions": 8, "encoding_format": "base64"}, OA)
        raw = base64.b64decode(r["data"][0]["embedding"])
        self.assertEqual(len(struct.unpack("<8f", raw)), 8)
        self.assertEqual(jpost("/v1/embeddings", {"model": "text-embedding-3-small", "input": "x",
                                                  "dimensions": 5000}, OA)[0], 400)
        self.assertEqual(jpost("/v1/embeddings", {"model": "text-embedding-ada-002", "input": "x",
                                                  "dimensions": 8}, OA)[0], 400)
        self.assertEqual(jpost("/v1/embeddings", {"model": "text-embedding-3-small", "input": []}, OA)[0], 400)
        st, hdrs, _ = SERVER.request("POST", "/v1/embeddings", b'{"model":"m","input":"x"}', scen("RATE_LIMITED"))
        self.assertEqual((st, hdrs["retry-after"]), (429, "1"))

    def test_gemini_embed_content_and_batch(self):
        st, _, r = jpost("/v1beta/models/gemini-embedding-001:embedContent",
                         {"content": {"parts": [{"text": "the cat sat"}]}, "outputDimensionality": 16}, GE)
        self.assertEqual((st, len(r["embedding"]["values"])), (200, 16))
        st, _, r = jpost("/v1beta/models/gemini-embedding-001:batchEmbedContents", {"requests": [
            {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": t}]}}
            for t in ("the cat sat", "the cat sat down")]}, GE)
        a, b = (e["values"] for e in r["embeddings"])
        self.assertEqual((st, len(a)), (200, 3072))
        self.assertGreater(cosine(a, b), 0.5)
        self.assertEqual(jpost("/v1beta/models/gemini-embedding-001:batchEmbedContents",
                               {"requests": [{"model": "models/other", "content": {"parts": [{"text": "x"}]}}]},
                               GE)[0], 400)

    def test_legacy_completions(self):
        st, _, r = jpost("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test"}, OA)
        self.assertEqual((st, r["object"], r["choices"][0]["text"], r["choices"][0]["finish_reason"]),
                         (200, "text_completion", "dpmock reply to: Say this is a test", "stop"))
        st, _, r = jpost("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "a b c d", "max_tokens": 2},
                         OA)
        self.assertEqual((r["choices"][0]["text"], r["choices"][0]["finish_reason"]), ("dpmock reply ", "length"))
        _, chunks = sse_chunks(post_raw({"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "stream": True},
                                        "/v1/completions", OA))
        events = [sse_events(c)[0][1] for c in chunks]
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual("".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]), "dpmock reply to: hi")

    def test_moderations(self):
        st, _, r = jpost("/v1/moderations", {"input": ["a nice day", "I will kill the process"]}, OA)
        self.assertEqual((st, [x["flagged"] for x in r["results"]]), (200, [False, True]))
        self.assertTrue(r["results"][1]["categories"]["violence"])
        self.assertEqual(set(r["results"][0]["categories"]), set(scenarios.MODERATION_WORDS))
