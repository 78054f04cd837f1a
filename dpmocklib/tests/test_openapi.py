"""Conformance: every OpenAI answer body and stream event dpmock sends, validated against the schemas of
OpenAI's published OpenAPI document (openai/openai-openapi, pinned in data/; or the file DPMOCK_OPENAPI
names). Needs jsonschema (CI's venv has it). Where the document contradicts the real API, the field is
left out of the check with a comment saying so (CONTRADICTIONS)."""

import gzip
import importlib
import json
import os
import unittest

from .support import OA, SERVER, _have, sse_events

#: openai/openai-openapi at f85dbe223d40e1a31cba812ab2d755c7e98a92a3 (2026-08-21), openapi.json, gzipped
#: (MIT licence: Copyright (c) OpenAI).
PINNED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "openai-openapi.json.gz")


def load_document():
    path = os.environ.get("DPMOCK_OPENAPI") or PINNED
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def as_json_schema(node):
    """The document's schemas as JSON Schema: ``nullable: true`` (OpenAPI 3.0's, still in the document) allows
    null, and ``oneOf`` is read as ``anyOf`` (its ``discriminator`` picks one; without it, branches that share
    their fields would each match, and oneOf refuse)."""
    if isinstance(node, list):
        return [as_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: as_json_schema(v) for k, v in node.items() if k != "nullable"}
    if "oneOf" in out:
        out["anyOf"] = out.pop("oneOf") + out.pop("anyOf", [])
    if node.get("nullable") is True:
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = list(out["enum"]) + [None]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


#: Where the document contradicts the real API, as its own examples show: null fields it types as not nullable.
#: object type -> the keys whose null is left out of the check (the real API sends them null).
CONTRADICTIONS = {
    # the Batch examples ("cancelled_at": null, "error_file_id": null...) and every real batch
    "batch": ("output_file_id", "error_file_id", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
              "expired_at", "cancelling_at", "cancelled_at", "errors", "metadata"),
    "response": ("user", "usage"),  # the Response examples show "user": null, and a stream's first "usage": null
}


def without_contradictions(value):
    """``value`` without the null fields CONTRADICTIONS names, wherever their object appears in it, a base64
    embedding read as numbers; and a
    streamed legacy completion's "finish_reason": null (the document types the stream's chunks with the whole
    answer's schema, whose finish_reason is never null; the real stream's chunks before the last carry null)."""
    if isinstance(value, list):
        return [without_contradictions(v) for v in value]
    if not isinstance(value, dict):
        return value
    drop = CONTRADICTIONS.get(value.get("object"), ())
    out = {k: without_contradictions(v) for k, v in value.items() if not (k in drop and v is None)}
    if value.get("object") == "embedding" and isinstance(value.get("embedding"), str):
        # encoding_format "base64" answers a base64 string (the SDKs ask for it by default and decode it); the
        # document types the field as numbers only
        out["embedding"] = [0.0]
    if value.get("object") == "text_completion":
        out["choices"] = [dict(c, finish_reason=c.get("finish_reason") or "stop") for c in out.get("choices", [])]
    return out


@unittest.skipUnless(_have("jsonschema"), "jsonschema is not installed (optional: CI's venv has it)")
class OpenAPIConformanceTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.jsonschema = importlib.import_module("jsonschema")  # by name: the project itself imports none
        doc = load_document()
        cls.components = {"schemas": as_json_schema(doc["components"]["schemas"])}
        cls.problems = []

    checked = 0

    def check(self, schema_name, value, where):
        type(self).checked += 1
        schema = {"$ref": "#/components/schemas/" + schema_name, "components": self.components}
        validator = self.jsonschema.Draft202012Validator(schema)
        errors = sorted(validator.iter_errors(without_contradictions(value)), key=lambda e: list(e.absolute_path))
        for e in errors[:3]:
            best = self.jsonschema.exceptions.best_match([e] + list(e.context or ()))
            self.problems.append("%s (%s) at %s: %s" % (where, schema_name, "/".join(map(str, best.absolute_path)),
                                                        best.message[:300]))

    def post(self, path, body, headers=OA):
        st, hdrs, data = SERVER.request("POST", path, json.dumps(body).encode(), dict(headers, **{
            "Content-Type": "application/json"}))
        return st, hdrs, data

    def answers(self, path, body, schema, where, stream_schema=None):
        st, _, data = self.post(path, body)
        self.assertEqual(st, 200, (where, data[:300]))
        self.check(schema, json.loads(data), where)
        if stream_schema:
            st, _, data = self.post(path, dict(body, stream=True, **({"stream_options": {"include_usage": True}}
                                                                       if path.endswith("completions") else {})))
            for _, d in sse_events(data):
                if d and d != "[DONE]":
                    self.check(stream_schema, json.loads(d), where + " stream event")

    def test_every_openai_answer_conforms(self):
        tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
        chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello there"}]}
        self.answers("/v1/chat/completions", chat, "CreateChatCompletionResponse", "chat",
                     "CreateChatCompletionStreamResponse")
        self.answers("/v1/chat/completions", dict(chat, tools=[tool]), "CreateChatCompletionResponse", "chat tools",
                     "CreateChatCompletionStreamResponse")
        self.answers("/v1/chat/completions", dict(chat, logprobs=True, top_logprobs=2, reasoning_effort="low",
                                                  model="o4-mini"), "CreateChatCompletionResponse", "chat logprobs")
        self.answers("/v1/chat/completions", dict(chat, response_format={"type": "json_schema", "json_schema": {
            "name": "r", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}}),
            "CreateChatCompletionResponse", "chat json_schema")
        self.answers("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hello"},
                     "CreateCompletionResponse", "completions", "CreateCompletionResponse")
        self.answers("/v1/embeddings", {"model": "text-embedding-3-small", "input": ["a", "b"]},
                     "CreateEmbeddingResponse", "embeddings")
        self.answers("/v1/moderations", {"input": "hello"}, "CreateModerationResponse", "moderations")
        self.answers("/v1/images/generations", {"prompt": "a fox", "model": "gpt-image-1"}, "ImagesResponse",
                     "images")
        self.answers("/v1/responses", {"model": "gpt-4o", "input": "hello"}, "Response", "responses",
                     "ResponseStreamEvent")
        self.answers("/v1/responses", {"model": "gpt-4o", "input": "weather?", "tools": [dict(
            tool["function"], type="function")]}, "Response", "responses tools", "ResponseStreamEvent")
        for path, schema in (("/v1/models", "ListModelsResponse"), ("/v1/models/gpt-4o", "Model")):
            st, _, data = SERVER.request("GET", path, None, OA)
            self.check(schema, json.loads(data), path)
        body = (b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--B\r\nContent-Disposition: '
                b'form-data; name="file"; filename="b.jsonl"\r\n\r\n' + json.dumps({
                    "custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": chat}).encode() +
                b"\r\n--B--\r\n")
        st, _, data = SERVER.request("POST", "/v1/files", body, dict(OA, **{
            "Content-Type": "multipart/form-data; boundary=B"}))
        f = json.loads(data)
        self.check("OpenAIFile", f, "file upload")
        for path, schema in (("/v1/files", "ListFilesResponse"), ("/v1/files/" + f["id"], "OpenAIFile")):
            self.check(schema, json.loads(SERVER.request("GET", path, None, OA)[2]), path)
        st, _, data = self.post("/v1/batches", {"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                                                "completion_window": "24h"})
        batch = json.loads(data)
        self.check("Batch", batch, "batch create")
        self.check("Batch", json.loads(SERVER.request("GET", "/v1/batches/" + batch["id"], None, OA)[2]), "batch")
        self.check("ListBatchesResponse", json.loads(SERVER.request("GET", "/v1/batches", None, OA)[2]), "batches")
        data = self.post("/v1/audio/speech", {"model": "gpt-4o-mini-tts", "input": "hi there " * 30, "voice": "alloy",
                                              "stream_format": "sse"})[2]
        for _, d in sse_events(data):
            self.check("CreateSpeechResponseStreamEvent", json.loads(d), "speech stream event")
        batch = json.loads(SERVER.request("GET", "/v1/batches/" + batch["id"], None, OA)[2])
        for line in SERVER.request("GET", "/v1/files/%s/content" % batch["output_file_id"], None, OA)[2].splitlines():
            self.check("CreateChatCompletionResponse", json.loads(line)["response"]["body"], "batch output line")
        wav = self.post("/v1/audio/speech", {"model": "tts-1", "input": "hi there", "voice": "alloy",
                                             "response_format": "wav"})[2]
        for model, fmt, schema in (("whisper-1", "json", "CreateTranscriptionResponseJson"),
                                   ("gpt-4o-transcribe", "json", "CreateTranscriptionResponseJson"),
                                   ("whisper-1", "verbose_json", "CreateTranscriptionResponseVerboseJson")):
            form = (b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\n%s\r\n--B\r\nContent-Disposition: '
                    b'form-data; name="response_format"\r\n\r\n%s\r\n--B\r\nContent-Disposition: form-data; '
                    b'name="timestamp_granularities[]"\r\n\r\nword\r\n--B\r\nContent-Disposition: form-data; '
                    b'name="file"; filename="s.wav"\r\n\r\n' % (model.encode(), fmt.encode())) + wav + b"\r\n--B--\r\n"
            st, _, data = SERVER.request("POST", "/v1/audio/transcriptions", form, dict(OA, **{
                "Content-Type": "multipart/form-data; boundary=B"}))
            self.check(schema, json.loads(data), "transcription %s %s" % (model, fmt))
        form = (b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o-transcribe\r\n--B\r\n'
                b'Content-Disposition: form-data; name="stream"\r\n\r\ntrue\r\n--B\r\nContent-Disposition: form-data; '
                b'name="file"; filename="s.wav"\r\n\r\n') + wav + b"\r\n--B--\r\n"
        data = SERVER.request("POST", "/v1/audio/transcriptions", form, dict(OA, **{
            "Content-Type": "multipart/form-data; boundary=B"}))[2]
        for _, d in sse_events(data):
            self.check("CreateTranscriptionResponseStreamEvent", json.loads(d), "transcription stream event")
        st, _, data = self.post("/v1/responses", {"model": "o4-mini", "input": "think", "store": True,
                                                  "reasoning": {"effort": "low", "summary": "auto"}})
        response = json.loads(data)
        self.check("Response", response, "responses reasoning")
        for path, schema in (("/v1/responses/" + response["id"], "Response"),
                             ("/v1/responses/%s/input_items" % response["id"], "ResponseItemList")):
            self.check(schema, json.loads(SERVER.request("GET", path, None, OA)[2]), path)
        st, _, data = self.post("/v1/batches/%s/cancel" % json.loads(self.post("/v1/batches", {
            "input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
            dict(OA, **{"X-DP-Scenario": "BATCH_SLOW; step_ms=5000"}))[2])["id"], {})
        self.check("Batch", json.loads(data), "batch cancel")
        self.check("DeleteFileResponse", json.loads(SERVER.request("DELETE", "/v1/files/" + f["id"], None, OA)[2]),
                   "file delete")
        # more shapes of the same routes: variants of each request that change the answer's fields
        self.answers("/v1/embeddings", {"model": "text-embedding-3-large", "input": "a", "encoding_format": "base64",
                                        "dimensions": 64}, "CreateEmbeddingResponse", "embeddings base64")
        self.answers("/v1/moderations", {"input": ["a", "b"], "model": "omni-moderation-latest"},
                     "CreateModerationResponse", "moderations list")
        self.answers("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": ["a", "b"], "logprobs": 2,
                                         "max_tokens": 2}, "CreateCompletionResponse", "completions logprobs")
        self.answers("/v1/images/generations", {"prompt": "a fox", "model": "dall-e-3", "n": 2},
                     "ImagesResponse", "images url")
        self.answers("/v1/chat/completions", dict(chat, max_completion_tokens=2, stream_options=None),
                     "CreateChatCompletionResponse", "chat cut by max tokens", "CreateChatCompletionStreamResponse")
        self.answers("/v1/responses", {"model": "gpt-4o", "input": "json please", "max_output_tokens": 16,
                                       "text": {"format": {"type": "json_schema", "name": "r", "schema": {
                                           "type": "object", "properties": {"a": {"type": "string"}}}}}},
                     "Response", "responses structured", "ResponseStreamEvent")
        st, _, data = self.post("/v1/responses/input_tokens", {"model": "gpt-4o", "input": "count these"})
        self.check("TokenCountsResource", json.loads(data), "responses input_tokens")
        st, _, data = self.post("/v1/responses", {"model": "gpt-4o", "input": "later", "background": True,
                                                  "store": True})
        later = json.loads(data)
        self.check("Response", later, "responses background")
        st, _, data = self.post("/v1/responses/%s/cancel" % later["id"], {})
        if st == 200:
            self.check("Response", json.loads(data), "responses cancel")
        for path, body in (("/v1/chat/completions", {"model": "gpt-4o"}),
                           ("/v1/chat/completions", dict(chat, model="gpt-does-not-exist"))):
            st, _, data = self.post(path, body)
            self.check("ErrorResponse", json.loads(data), "error %d" % st)
        self.assertEqual(self.problems, [], "\n" + "\n".join(self.problems))
        self.assertGreaterEqual(self.checked, 100)  # every answer above, and each stream's events


if __name__ == "__main__":
    unittest.main()
