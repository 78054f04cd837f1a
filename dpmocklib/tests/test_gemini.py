"""Gemini routes: generateContent, streams, embeddings, token counting, files."""

import json
import unittest

from dpmocklib.base import scenarios

from .support import (GE, GEMINI_BODY, GEMINI_GEN, GEMINI_STREAM, SERVER, WEATHER_SCHEMA, decode_chunks, jpost,
    post_raw, split_response, sse_chunks)


class GeminiRoutesTest(unittest.TestCase):
    BODY, GEN, STREAM = GEMINI_BODY, GEMINI_GEN, GEMINI_STREAM

    def test_generate_text(self):
        st, hdrs, r = jpost(self.GEN + "?key=g", self.BODY, {})
        self.assertEqual(st, 200)
        cand = r["candidates"][0]
        self.assertEqual((cand["content"], cand["finishReason"]),
                         ({"parts": [{"text": "dpmock reply to: Hi there"}], "role": "model"}, "STOP"))
        self.assertEqual((r["usageMetadata"]["promptTokenCount"], r["usageMetadata"]["candidatesTokenCount"],
                          r["usageMetadata"]["totalTokenCount"], r["modelVersion"]), (2, 5, 7, "gemini-2.5-flash"))

    def test_stream_sse_framing(self):
        raw = post_raw(self.BODY, self.STREAM + "?alt=sse&key=g", {})
        hdrs, chunks = sse_chunks(raw)
        self.assertEqual(hdrs["content-type"], "text/event-stream")
        for c in chunks:
            self.assertTrue(c.startswith(b"data: ") and c.endswith(b"\r\n\r\n") and c.count(b"\n") == 2, c)
        events = [json.loads(c[6:]) for c in chunks]
        self.assertEqual("".join(e["candidates"][0]["content"]["parts"][0]["text"] for e in events),
                         "dpmock reply to: Hi there")
        self.assertEqual(["finishReason" in e["candidates"][0] for e in events], [False] * 4 + [True])
        self.assertEqual([e["usageMetadata"]["candidatesTokenCount"] for e in events], [1, 2, 3, 4, 5])

    def test_stream_json_array_written_incrementally(self):
        raw = post_raw(self.BODY, self.STREAM + "?key=g", {})
        status, hdrs, body, _ = split_response(raw)
        self.assertEqual(hdrs["content-type"], "application/json; charset=UTF-8")
        parts = decode_chunks(raw.partition(b"\r\n\r\n")[2])[0]
        self.assertEqual((parts[0][:1], parts[1][:3], parts[-1]), (b"[", b",\r\n", b"]"))
        items = json.loads(body)
        self.assertEqual(len(items), 5)
        self.assertEqual(items[-1]["candidates"][0]["finishReason"], "STOP")

    def test_function_call_snake_and_camel(self):
        for tools in ([{"functionDeclarations": [{"name": "get_weather", "parameters": {
                "type": "OBJECT", "properties": {"city": {"type": "STRING"}}, "required": ["city"]}}]}],
                      [{"function_declarations": [{"name": "get_weather",
                                                   "parameters_json_schema": WEATHER_SCHEMA}]}]):
            with self.subTest(tools=tools):
                _, _, r = jpost(self.GEN + "?key=g", dict(self.BODY, tools=tools), {})
                part = r["candidates"][0]["content"]["parts"][0]
                self.assertEqual(part["functionCall"]["name"], "get_weather")
                self.assertEqual(part["functionCall"]["args"]["city"], "example")
        result = {"contents": self.BODY["contents"] + [
            {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
            {"role": "function", "parts": [{"functionResponse": {"name": "get_weather", "response": {
                "content": "15 and cloudy in Paris"}}}]}], "tools": tools}
        _, _, r = jpost(self.GEN + "?key=g", result, {})
        self.assertEqual(r["candidates"][0]["content"]["parts"][0]["text"],
                         "The get_weather tool returned: 15 and cloudy in Paris")

    def test_thoughts_both_spellings(self):
        for config in ({"thinkingConfig": {"includeThoughts": True}},
                       {"thinkingConfig": {"include_thoughts": True, "thinking_budget": 1024}}):
            with self.subTest(config=config):
                _, _, r = jpost(self.GEN + "?key=g", dict(self.BODY, generationConfig=config), {})
                parts = r["candidates"][0]["content"]["parts"]
                self.assertEqual(parts, [{"text": "Thinking about: Hi there", "thought": True},
                                         {"text": "dpmock reply to: Hi there"}])
                self.assertEqual(r["usageMetadata"]["thoughtsTokenCount"], 4)
                self.assertEqual(r["usageMetadata"]["totalTokenCount"], 2 + 5 + 4)

    def test_max_output_tokens(self):
        _, _, r = jpost(self.GEN + "?key=g", dict(self.BODY, generationConfig={"maxOutputTokens": 2}), {})
        self.assertEqual((r["candidates"][0]["content"]["parts"][0]["text"], r["candidates"][0]["finishReason"]),
                         ("dpmock reply ", "MAX_TOKENS"))

    def test_count_tokens_forms(self):
        path = "/v1beta/models/gemini-2.5-flash:countTokens?key=g"
        for body in (self.BODY, {"generateContentRequest": dict(self.BODY, model="models/gemini-2.5-flash")},
                     dict(self.BODY, system_instruction={"parts": [{"text": "counted"}]})):
            with self.subTest(body=body):
                st, _, r = jpost(path, body, {})
                self.assertEqual((st, r["totalTokens"]), (200, 3 if "system_instruction" in body else 2))

    def test_errors_in_gemini_shape(self):
        st, _, r = jpost(self.GEN + "?key=invalid-1", self.BODY, {})
        self.assertEqual((st, r["error"]["status"], r["error"]["details"][0]["reason"]),
                         (400, "INVALID_ARGUMENT", "API_KEY_INVALID"))
        st, _, r = jpost(self.GEN, self.BODY, {})
        self.assertEqual((st, r["error"]["code"], r["error"]["status"]), (403, 403, "PERMISSION_DENIED"))
        st, _, r = jpost("/v1beta/models/gemini-does-not-exist:generateContent?key=g", self.BODY, {})
        self.assertEqual((st, r["error"]["status"]), (404, "NOT_FOUND"))
        st, _, r = jpost(self.GEN + "?key=g", {"contents": []}, {})
        self.assertEqual((st, r["error"]["status"]), (400, "INVALID_ARGUMENT"))
        self.assertIn("contents", r["error"]["message"])

    def test_models_paging(self):
        names = ["models/" + m[0] for m in scenarios.GEMINI_MODELS]
        r = json.loads(SERVER.request("GET", "/v1beta/models?pageSize=3&key=g")[2])
        self.assertEqual(([m["name"] for m in r["models"]], r["nextPageToken"]), (names[:3], "3"))
        r = json.loads(SERVER.request("GET", "/v1beta/models?pageSize=3&pageToken=6&key=g")[2])
        self.assertEqual([m["name"] for m in r["models"]], names[6:])
        self.assertNotIn("nextPageToken", r)
        r = json.loads(SERVER.request("GET", "/v1/models/gemini-2.5-pro", None, GE)[2])
        self.assertEqual((r["name"], r["displayName"], r["inputTokenLimit"]), ("models/gemini-2.5-pro",
                                                                            "Gemini 2.5 Pro", 1048576))

    def test_resumable_upload(self):
        c = SERVER.conn()
        self.addCleanup(c.close)
        c.request("POST", "/upload/v1beta/files", body=json.dumps({"file": {"display_name": "n.txt"}}), headers=dict(
            GE, **{"X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
                   "X-Goog-Upload-Header-Content-Length": "10", "X-Goog-Upload-Header-Content-Type": "text/plain",
                   "Content-Type": "application/json"}))
        r = c.getresponse()
        r.read()
        self.assertEqual((r.status, r.getheader("X-Goog-Upload-Status")), (200, "active"))
        url = r.getheader("X-Goog-Upload-URL")
        self.assertTrue(url.startswith("http://%s:%d/upload/" % (SERVER.host, SERVER.port)), url)
        path = url.split(str(SERVER.port), 1)[1]
        c.request("POST", path, body=b"hello", headers={"X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "0"})
        r = c.getresponse()
        r.read()
        self.assertEqual((r.status, r.getheader("X-Goog-Upload-Status")), (200, "active"))
        c.request("POST", path, body=b"world", headers={"X-Goog-Upload-Command": "upload, finalize",
                                                        "X-Goog-Upload-Offset": "5"})  # no key: as the SDK does
        r = c.getresponse()
        f = json.loads(r.read())["file"]
        self.assertEqual((r.status, r.getheader("X-Goog-Upload-Status")), (200, "final"))
        self.assertEqual((f["displayName"], f["mimeType"], f["sizeBytes"], f["state"]), ("n.txt", "text/plain",
                                                                                          "10", "ACTIVE"))
        import base64
        import hashlib
        self.assertEqual(base64.b64decode(f["sha256Hash"]), hashlib.sha256(b"helloworld").digest())
        fid = f["name"].split("/")[1]
        self.assertEqual(json.loads(SERVER.request("GET", "/v1beta/files/" + fid, None, GE)[2])["name"], f["name"])
        st, _, r = jpost(path, b"x", {"X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "0"})
        self.assertEqual(st, 404)  # the session is over

    def test_raw_media_and_multipart_uploads(self):
        st, _, r = jpost("/v1/files:upload?key=g", b"abc" * 100, {"Content-Type": "text/csv"})
        self.assertEqual((st, r["file"]["sizeBytes"], r["file"]["mimeType"]), (200, "300", "text/csv"))
        st, _, r = jpost("/v1beta/v1/files:upload?key=g", b"abc", {"Content-Type": "text/csv"})
        self.assertEqual(st, 200)  # as the C library sends it with its default base URL
        st, _, r = jpost("/upload/v1beta/files?uploadType=media&key=g", b"\0" * 70000,
                         {"Content-Type": "application/pdf"})
        self.assertEqual((st, r["file"]["sizeBytes"], r["file"]["mimeType"]), (200, "70000", "application/pdf"))
        body = (b'--xx\r\nContent-Type: application/json\r\n\r\n{"file": {"displayName": "pic"}}\r\n'
                b"--xx\r\nContent-Type: image/png\r\n\r\n" + b"\x89PNG" * 10 + b"\r\n--xx--\r\n")
        st, _, r = jpost("/upload/v1beta/files?uploadType=multipart&key=g", body,
                         {"Content-Type": "multipart/related; boundary=xx"})
        self.assertEqual((st, r["file"]["displayName"], r["file"]["mimeType"], r["file"]["sizeBytes"]),
                         (200, "pic", "image/png", "40"))

    def test_predict_paths(self):
        body = {"instances": [{"prompt": "a fox"}], "parameters": {"sampleCount": 2}}
        for path in ("/v1beta/models/imagen-4.0-generate-001:predict?key=g",
                     "/v1beta/v1/projects/PROJECT_ID/locations/us-central1/publishers/google/models/imagen-3:predict",
                     "/v1beta1/publishers/google/models/imagen-4.0-generate-001:predict"):
            with self.subTest(path=path):
                st, _, r = jpost(path, body, {"Authorization": "Bearer k"} if "key=" not in path else {})
                self.assertEqual((st, len(r["predictions"]), r["predictions"][0]["mimeType"]), (200, 2, "image/png"))
                png = __import__("base64").b64decode(r["predictions"][0]["bytesBase64Encoded"])
                self.assertEqual(png[:4], b"\x89PNG")
