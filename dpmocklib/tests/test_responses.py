"""The OpenAI Responses API: answers, typed stream events, stored responses."""

import json
import unittest

import dpmock

from .support import (OA, SERVER, WEATHER_SCHEMA, decode_chunks, jpost, post_raw, responses_events, scen,
    split_response, sse_chunks, sse_events)


class ResponsesRoutesTest(unittest.TestCase):
    BODY = {"model": "gpt-4o", "input": "Hi there"}
    TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather", "parameters": WEATHER_SCHEMA}]
    LONG = " ".join("word%d" % i for i in range(30))  # an answer of 33 tokens

    def create(self, body, headers=OA, status=200):
        st, hdrs, r = jpost("/v1/responses", body, headers)
        self.assertEqual(st, status, r)
        return r

    def test_text_answer_shape(self):
        st, hdrs, r = jpost("/v1/responses", dict(self.BODY, instructions="Be   brief", metadata={"k": "v"}), OA)
        self.assertEqual(st, 200)
        self.assertTrue(hdrs["x-request-id"].startswith("req_"))
        self.assertTrue(r["id"].startswith("resp_"))
        self.assertEqual((r["object"], r["status"], r["model"], r["instructions"], r["metadata"], r["store"]),
                         ("response", "completed", "gpt-4o", "Be   brief", {"k": "v"}, True))
        self.assertNotIn("output_text", r)  # the SDKs compute it
        for field in ("error", "incomplete_details", "previous_response_id", "max_output_tokens"):
            self.assertIsNone(r[field], field)
        self.assertEqual((r["tools"], r["tool_choice"], r["parallel_tool_calls"], r["text"]["format"], r["truncation"]),
                         ([], "auto", True, {"type": "text"}, "disabled"))
        [msg] = r["output"]
        self.assertTrue(msg["id"].startswith("msg_"))
        self.assertEqual({k: v for k, v in msg.items() if k != "id"}, {
            "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": "dpmock reply to: Hi there", "annotations": [], "logprobs": []}]})
        self.assertEqual(r["usage"], {"input_tokens": 4, "input_tokens_details": {"cached_tokens": 0,
                                                                                   "cache_write_tokens": 0},
                                      "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0},
                                      "total_tokens": 9})
        # items: message parts (input_text, input_image, output_text) and every role
        r = self.create({"model": "gpt-4o", "input": [
            {"role": "developer", "content": "Be brief"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "first"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "an answer"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "look  here"},
                                         {"type": "input_image", "image_url": "data:image/png;base64,AA=="}]}]})
        self.assertEqual(r["output"][0]["content"][0]["text"], "dpmock reply to: look here")
        self.assertEqual(r["usage"]["input_tokens"], 7 + dpmock.MEDIA_TOKENS)

    def test_stream_events_in_order_numbered_from_zero(self):
        raw = post_raw(dict(self.BODY, stream=True), "/responses", OA)
        self.assertIn(b"content-type: text/event-stream; charset=utf-8", raw.partition(b"\r\n\r\n")[0].lower())
        events = responses_events(raw)
        self.assertEqual([n for n, _ in events], [
            "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"] +
            ["response.output_text.delta"] * 5 + [
            "response.output_text.done", "response.content_part.done", "response.output_item.done",
            "response.completed"])
        self.assertEqual([d["sequence_number"] for _, d in events], list(range(len(events))))
        for name, data in events:
            self.assertEqual(data["type"], name)
        created = events[0][1]["response"]
        self.assertEqual((created["status"], created["output"], created["usage"]), ("in_progress", [], None))
        final = events[-1][1]["response"]
        self.assertEqual((final["id"], final["status"]), (created["id"], "completed"))
        item = events[2][1]["item"]
        self.assertEqual((item["status"], item["content"], events[2][1]["output_index"]), ("in_progress", [], 0))
        deltas = [d for n, d in events if n == "response.output_text.delta"]
        self.assertEqual({(d["item_id"], d["output_index"], d["content_index"]) for d in deltas}, {(item["id"], 0, 0)})
        self.assertEqual(deltas[0]["logprobs"], [])
        self.assertEqual("".join(d["delta"] for d in deltas), "dpmock reply to: Hi there")
        self.assertEqual(events[9][1]["text"], "dpmock reply to: Hi there")
        self.assertEqual(events[10][1]["part"], final["output"][0]["content"][0])
        self.assertEqual(events[11][1]["item"], final["output"][0])

    def test_function_call_flat_tools_streamed_too(self):
        r = self.create(dict(self.BODY, tools=self.TOOLS))
        [call] = r["output"]
        self.assertTrue(call["id"].startswith("fc_") and call["call_id"].startswith("call_"))
        self.assertEqual((call["type"], call["name"], call["status"]), ("function_call", "get_weather", "completed"))
        self.assertEqual(json.loads(call["arguments"]), {"city": "example", "unit": "C"})
        self.assertEqual(r["tools"], [dict(self.TOOLS[0], strict=True)])
        events = responses_events(post_raw(dict(self.BODY, tools=self.TOOLS, stream=True), "/v1/responses", OA))
        names = [n for n, _ in events]
        frags = [d["delta"] for n, d in events if n == "response.function_call_arguments.delta"]
        self.assertEqual(names, ["response.created", "response.in_progress", "response.output_item.added"] +
                         ["response.function_call_arguments.delta"] * len(frags) +
                         ["response.function_call_arguments.done", "response.output_item.done", "response.completed"])
        self.assertEqual(events[2][1]["item"]["arguments"], "")
        self.assertTrue(len(frags) > 2 and all(len(f) <= 8 for f in frags))
        self.assertEqual(json.loads("".join(frags)), {"city": "example", "unit": "C"})
        done = events[-3][1]
        self.assertEqual((done["arguments"], done["name"]), ("".join(frags), "get_weather"))
        self.assertEqual(events[-1][1]["response"]["output"][0]["arguments"], done["arguments"])

    def test_tool_results_and_tool_choice(self):
        first = self.create(dict(self.BODY, tools=self.TOOLS))
        call = first["output"][0]
        result = {"type": "function_call_output", "call_id": call["call_id"], "output": "22 and sunny"}
        by_id = self.create({"model": "gpt-4o", "tools": self.TOOLS, "previous_response_id": first["id"],
                             "input": [result]})
        self.assertEqual(by_id["output"][0]["content"][0]["text"], "The get_weather tool returned: 22 and sunny")
        self.assertEqual(by_id["previous_response_id"], first["id"])
        explicit = self.create({"model": "gpt-4o", "tools": self.TOOLS, "store": False, "input": [
            {"role": "user", "content": "Hi there"}, call, dict(result, output=[{"type": "input_text", "text": "9"}])]})
        self.assertEqual(explicit["output"][0]["content"][0]["text"], "The get_weather tool returned: 9")
        again = self.create({"model": "gpt-4o", "tools": self.TOOLS, "tool_choice": "required",
                             "previous_response_id": first["id"], "input": [result]})
        self.assertEqual(again["output"][0]["type"], "function_call")
        off = self.create(dict(self.BODY, tools=self.TOOLS, tool_choice="none"))
        self.assertEqual(off["output"][0]["type"], "message")
        tools = self.TOOLS + [{"type": "function", "name": "other", "parameters": {"type": "object"}}]
        forced = self.create(dict(self.BODY, tools=tools, tool_choice={"type": "function", "name": "other"}))
        self.assertEqual(forced["output"][0]["name"], "other")
        r = self.create(dict(self.BODY, tools=tools, tool_choice={"type": "function", "name": "nope"}), status=400)
        self.assertEqual(r["error"]["param"], "tool_choice")

    def test_reasoning_item_and_max_output_tokens(self):
        r = self.create(dict(self.BODY, reasoning={"effort": "high", "summary": "auto"}))
        self.assertEqual([o["type"] for o in r["output"]], ["reasoning", "message"])
        self.assertTrue(r["output"][0]["id"].startswith("rs_"))
        self.assertEqual(r["output"][0]["summary"], [{"type": "summary_text", "text": "Thinking about: Hi there"}])
        self.assertEqual((r["usage"]["output_tokens_details"]["reasoning_tokens"], r["usage"]["output_tokens"]), (4, 9))
        self.assertEqual(r["reasoning"], {"effort": "high", "summary": "auto"})
        r = self.create(dict(self.BODY, reasoning={"effort": "low"}))
        self.assertEqual(r["output"][0]["summary"], [])  # no summary unless asked for
        events = responses_events(post_raw(dict(self.BODY, stream=True, reasoning={"summary": "detailed"}),
                                           "/v1/responses", OA))
        names = [n for n, _ in events]
        self.assertEqual(names[2:5], ["response.output_item.added", "response.reasoning_summary_part.added",
                                      "response.reasoning_summary_text.delta"])
        summary = "".join(d["delta"] for n, d in events if n == "response.reasoning_summary_text.delta")
        self.assertEqual(summary, "Thinking about: Hi there")
        self.assertEqual({d["summary_index"] for n, d in events if "reasoning_summary" in n}, {0})
        self.assertEqual(events[names.index("response.content_part.added")][1]["output_index"], 1)
        r = self.create(dict(self.BODY, input=self.LONG, max_output_tokens=16))
        self.assertEqual((r["status"], r["incomplete_details"], r["output"][0]["status"], r["usage"]["output_tokens"],
                          r["max_output_tokens"], r["completed_at"]),
                         ("incomplete", {"reason": "max_output_tokens"}, "incomplete", 16, 16, None))
        events = responses_events(post_raw(dict(self.BODY, input=self.LONG, max_output_tokens=16, stream=True),
                                           "/v1/responses", OA))
        self.assertEqual((events[-1][0], events[-1][1]["response"]["status"]), ("response.incomplete", "incomplete"))
        r = self.create(dict(self.BODY, max_output_tokens=15), status=400)
        self.assertEqual((r["error"]["param"], r["error"]["code"]), ("max_output_tokens", "integer_below_min_value"))

    def test_structured_output_flat_json_schema(self):
        schema = {"type": "object", "properties": {"title": {"type": "string"}, "n": {"type": "integer"}},
                  "required": ["title", "n"], "additionalProperties": False}
        fmt = {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}
        r = self.create(dict(self.BODY, text={"format": fmt}))
        self.assertEqual(json.loads(r["output"][0]["content"][0]["text"]), {"title": "dpmock reply to: Hi there", "n": 1})
        self.assertEqual(r["text"]["format"], fmt)
        events = responses_events(post_raw(dict(self.BODY, text={"format": fmt}, stream=True), "/v1/responses", OA))
        text = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
        self.assertEqual(json.loads(text), {"title": "dpmock reply to: Hi there", "n": 1})
        r = self.create(dict(self.BODY, text={"format": {"type": "json_object"}}))
        self.assertEqual(json.loads(r["output"][0]["content"][0]["text"]), {"response": "dpmock reply to: Hi there"})
        r = self.create(dict(self.BODY, text={"format": {"type": "json_schema", "schema": schema}}), status=400)
        self.assertEqual((r["error"]["param"], r["error"]["code"]), ("text.format.name", "missing_required_parameter"))

    def test_previous_response_id_and_store(self):
        first = self.create({"model": "gpt-4o", "input": "one two", "instructions": "not carried over"})
        second = self.create({"model": "gpt-4o", "input": "three", "previous_response_id": first["id"]})
        # first's input (2) and output (6: "dpmock reply to: one two"), then "three"
        self.assertEqual(second["usage"]["input_tokens"], 2 + 5 + 1)
        self.assertEqual(second["output"][0]["content"][0]["text"], "dpmock reply to: three")
        third = self.create({"model": "gpt-4o", "input": [{"role": "assistant", "content": "ok"}],
                             "previous_response_id": second["id"]})
        self.assertEqual(third["output"][0]["content"][0]["text"], "dpmock reply to: three")  # the last user text
        self.assertEqual(third["usage"]["input_tokens"], 8 + 4 + 1)
        r = self.create(dict(self.BODY, previous_response_id="resp_nope"), status=400)
        self.assertEqual(r["error"], {"message": "Previous response with id 'resp_nope' not found.",
                                      "type": "invalid_request_error", "param": "previous_response_id",
                                      "code": "previous_response_not_found"})
        unstored = self.create(dict(self.BODY, store=False))
        self.assertIs(unstored["store"], False)
        r = self.create(dict(self.BODY, previous_response_id=unstored["id"]), status=400)
        self.assertEqual(r["error"]["code"], "previous_response_not_found")

    def test_stored_response_routes(self):
        items = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                 {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "three"}]}]
        r = self.create({"model": "gpt-4o", "input": items})
        path = "/v1/responses/" + r["id"]
        st, _, data = SERVER.request("GET", path, None, OA)
        self.assertEqual((st, json.loads(data)), (200, r))
        st, _, data = SERVER.request("GET", path + "/input_items", None, OA)
        page = json.loads(data)
        self.assertEqual((st, page["object"], page["has_more"]), (200, "list", False))
        self.assertEqual([(i["type"], i["role"], i["content"][0]["text"]) for i in page["data"]],
                         [("message", "user", "three"), ("message", "assistant", "two"), ("message", "user", "one")])
        self.assertEqual(page["data"][1]["content"][0]["type"], "output_text")
        ids = [i["id"] for i in page["data"]]
        self.assertEqual((page["first_id"], page["last_id"]), (ids[0], ids[-1]))
        self.assertTrue(all(i.startswith("msg_") for i in ids) and len(set(ids)) == 3)
        page = json.loads(SERVER.request("GET", path + "/input_items?order=asc&limit=2", None, OA)[2])
        self.assertEqual(([i["id"] for i in page["data"]], page["has_more"]), (ids[::-1][:2], True))
        page = json.loads(SERVER.request("GET", path + "/input_items?order=asc&after=" + page["last_id"], None, OA)[2])
        self.assertEqual(([i["id"] for i in page["data"]], page["has_more"]), ([ids[0]], False))
        for query in ("?order=sideways", "?after=msg_nope", "?limit=0"):
            self.assertEqual(SERVER.request("GET", path + "/input_items" + query, None, OA)[0], 400, query)
        # input_tokens counts as the answer did, previous responses included
        st, _, data = SERVER.request("POST", "/v1/responses/input_tokens", {"model": "gpt-4o", "input": items}, OA)
        self.assertEqual((st, json.loads(data)), (200, {"object": "response.input_tokens",
                                                        "input_tokens": r["usage"]["input_tokens"]}))
        nxt = self.create({"model": "gpt-4o", "input": "four", "previous_response_id": r["id"]})
        count = json.loads(SERVER.request("POST", "/v1/responses/input_tokens", {
            "model": "gpt-4o", "input": "four", "previous_response_id": r["id"]}, OA)[2])
        self.assertEqual(count["input_tokens"], nxt["usage"]["input_tokens"])
        # delete, then every route says 404
        st, _, data = SERVER.request("DELETE", path, None, OA)
        self.assertEqual((st, json.loads(data)), (200, {"id": r["id"], "object": "response.deleted", "deleted": True}))
        for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/input_items"), ("POST", "/cancel")):
            st, _, data = SERVER.request(method, path + suffix, b"" if method == "POST" else None, OA)
            err = json.loads(data)["error"]
            self.assertEqual((st, err["message"], err["type"]),
                             (404, "Response with id '%s' not found." % r["id"], "invalid_request_error"), suffix)
        unstored = self.create(dict(self.BODY, store=False))
        self.assertEqual(SERVER.request("GET", "/v1/responses/" + unstored["id"], None, OA)[0], 404)

    def test_background_and_cancel(self):
        done = self.create(self.BODY)
        st, _, data = SERVER.request("POST", "/v1/responses/%s/cancel" % done["id"], b"", OA)
        self.assertEqual((st, json.loads(data)["error"]["param"]), (400, "response_id"))
        queued = self.create(dict(self.BODY, background=True))
        self.assertEqual((queued["status"], queued["output"], queued["usage"], queued["background"]),
                         ("queued", [], None, True))
        st, _, data = SERVER.request("GET", "/v1/responses/" + queued["id"], None, OA)
        later = json.loads(data)
        self.assertEqual((later["status"], later["output"][0]["content"][0]["text"]),
                         ("completed", "dpmock reply to: Hi there"))
        st, _, data = SERVER.request("POST", "/v1/responses/%s/cancel" % queued["id"], b"", OA)
        self.assertEqual((st, json.loads(data)), (200, later))  # already finished: answered as it is
        r = self.create(dict(self.BODY, background=True, store=False), status=400)
        self.assertEqual(r["error"]["param"], "background")

    def test_paths_beside_the_stored_responses(self):
        # the exact path does not hide the pattern's methods, nor the other way round
        st, _, data = SERVER.request("GET", "/v1/responses/input_tokens", None, OA)
        self.assertEqual((st, json.loads(data)["error"]["message"]), (404, "Response with id 'input_tokens' not found."))
        st, hdrs, _ = SERVER.request("POST", "/v1/responses/resp_x", b"{}", OA)
        self.assertEqual((st, hdrs["allow"]), (405, "DELETE, GET, HEAD"))
        st, hdrs, _ = SERVER.request("PUT", "/responses/input_tokens", b"{}", OA)
        self.assertEqual((st, hdrs["allow"]), (405, "DELETE, GET, POST, HEAD"))
        r = self.create(self.BODY)
        st, hdrs, data = SERVER.request("HEAD", "/responses/" + r["id"], None, OA)
        self.assertEqual((st, data), (200, b""))
        for path in ("/responses", "/v1beta/responses"):
            self.assertEqual(jpost(path, self.BODY, OA)[0], 200, path)

    def test_faults_on_the_responses_stream(self):
        stream = dict(self.BODY, stream=True)

        def post(spec, body=stream):
            return post_raw(body, "/v1/responses", dict(OA, **{"X-DP-Scenario": spec}))
        raw = post("STREAM_CUT; events=3")
        parts = decode_chunks(raw.partition(b"\r\n\r\n")[2], strict=False)[0]
        self.assertEqual([sse_events(p)[0][0] for p in parts],
                         ["response.created", "response.in_progress", "response.output_item.added"])
        self.assertFalse(raw.endswith(b"0\r\n\r\n"))
        for after in (4, 1000):  # inside the stream, and beyond its end (then at its end)
            with self.subTest(after=after):
                raw = post("STREAM_ERROR; after=%d" % after)
                hdrs, chunks = sse_chunks(raw)
                name, data = sse_events(chunks[-1])[0]
                err = json.loads(data)
                self.assertEqual((name, err["type"], err["code"], err["param"], hdrs["connection"]),
                                 ("error", "error", "server_error", None, "close"))
                self.assertEqual(err["sequence_number"], len(chunks) - 1)
                self.assertEqual(len(chunks), 5 if after == 4 else 13)  # beyond the end: before response.completed
        events = responses_events(post("STREAM_NO_END"))
        self.assertEqual(events[-1][0], "response.output_item.done")
        self.assertNotIn("response.completed", [n for n, _ in events])
        events = responses_events(post("STREAM_NO_END", dict(stream, input=self.LONG, max_output_tokens=16)))
        self.assertEqual(events[-1][0], "response.output_item.done")
        r = json.loads(split_response(post("STREAM_CUT; events=1", self.BODY))[2])  # not a stream: left alone
        self.assertEqual(r["status"], "completed")
        events = responses_events(post("SSE_MANY_EVENTS; n=50"))
        self.assertEqual(len([n for n, _ in events if n == "response.output_text.delta"]), 50)
        self.assertEqual([d["sequence_number"] for _, d in events], list(range(len(events))))

    def test_rate_limited_on_every_route(self):
        r = self.create(self.BODY)
        routes = [("POST", "/v1/responses", self.BODY), ("POST", "/v1/responses", dict(self.BODY, stream=True)),
                  ("POST", "/v1/responses/input_tokens", self.BODY), ("GET", "/v1/responses/" + r["id"], None),
                  ("DELETE", "/v1/responses/" + r["id"], None), ("POST", "/v1/responses/%s/cancel" % r["id"], b""),
                  ("GET", "/v1/responses/%s/input_items" % r["id"], None)]
        for method, path, body in routes:
            with self.subTest(method=method, path=path):
                st, hdrs, data = SERVER.request(method, path, body, scen("RATE_LIMITED; retry_after=2"))
                self.assertEqual((st, json.loads(data)["error"]["code"], hdrs["retry-after"]),
                                 (429, "rate_limit_exceeded", "2"))
        self.assertEqual(SERVER.request("GET", "/v1/responses/" + r["id"], None, OA)[0], 200)  # never deleted

    def test_errors_in_openai_shape(self):
        cases = [
            ({"input": "x"}, OA, 400, "model", None),
            ({"model": "gpt-4o"}, OA, 400, "input", "missing_required_parameter"),
            ({"model": "gpt-4o", "input": 5}, OA, 400, "input", "invalid_type"),
            ({"model": "gpt-4o", "input": [{"role": "user", "content": 5}]}, OA, 400, "input[0].content",
             "invalid_type"),
            ({"model": "gpt-4o", "input": [{"role": "robot", "content": "x"}]}, OA, 400, "input[0].role",
             "invalid_value"),
            ({"model": "gpt-4o", "input": [{"type": "function_call_output", "output": "x"}]}, OA, 400,
             "input[0].call_id", "missing_required_parameter"),
            ({"model": "gpt-4o", "input": "x", "tools": [{"type": "function", "parameters": {}}]}, OA, 400,
             "tools[0].name", "missing_required_parameter"),
            ({"model": "gpt-4o", "input": "x", "tool_choice": "sometimes"}, OA, 400, "tool_choice", "invalid_value"),
            ({"model": "gpt-4o", "input": "x", "max_output_tokens": "9"}, OA, 400, "max_output_tokens",
             "invalid_type"),
            ({"model": "gpt-4o", "input": "x"}, {"Authorization": "Bearer invalid-abc"}, 401, None, "invalid_api_key"),
            ({"model": "gpt-4o", "input": "x"}, {}, 401, None, None),
            ({"model": "gpt-does-not-exist", "input": "x"}, OA, 404, None, "model_not_found"),
        ]
        for body, headers, status, param, code in cases:
            with self.subTest(body=body, headers=headers):
                st, hdrs, r = jpost("/v1/responses", body, headers)
                self.assertEqual(st, status)
                self.assertEqual(set(r["error"]), {"message", "type", "param", "code"})
                self.assertEqual((r["error"]["param"], r["error"]["code"]), (param, code))
                self.assertTrue(hdrs["x-request-id"].startswith("req_"))
