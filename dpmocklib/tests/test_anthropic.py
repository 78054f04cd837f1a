"""Anthropic routes: messages, streams, token counting."""

import json
import unittest

from dpmocklib.base import scenarios

from .support import AN, ANTHROPIC_BODY, SERVER, WEATHER_SCHEMA, jpost, post_raw, sse_chunks, sse_events


class AnthropicRoutesTest(unittest.TestCase):
    BODY = ANTHROPIC_BODY

    def test_message_text(self):
        st, hdrs, r = jpost("/v1/messages", self.BODY, AN)
        self.assertEqual(st, 200)
        self.assertTrue(hdrs["request-id"].startswith("req_"))
        self.assertTrue(r["id"].startswith("msg_"))
        self.assertEqual((r["type"], r["role"], r["content"], r["stop_reason"], r["stop_sequence"]),
                         ("message", "assistant", [{"type": "text", "text": "dpmock reply to: Hi there"}],
                          "end_turn", None))
        self.assertEqual((r["usage"]["input_tokens"], r["usage"]["output_tokens"]), (2, 5))

    def test_bearer_key_as_current_sdks_send_it(self):
        st, _, _ = jpost("/v1/messages", self.BODY, {"Authorization": "Bearer sk-ant", "anthropic-version": "x"})
        self.assertEqual(st, 200)

    def test_stream_event_order(self):
        raw = post_raw(dict(self.BODY, stream=True), "/v1/messages", AN)
        hdrs, chunks = sse_chunks(raw)
        events = [sse_events(c)[0] for c in chunks]
        names = [n for n, _ in events]
        self.assertEqual(names, ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * 5 +
                         ["content_block_stop", "message_delta", "message_stop"])
        for name, data in events:
            self.assertEqual(json.loads(data)["type"], name)
        start = json.loads(events[0][1])["message"]
        self.assertEqual((start["content"], start["stop_reason"]), ([], None))
        text = "".join(json.loads(d)["delta"]["text"] for n, d in events if n == "content_block_delta")
        self.assertEqual(text, "dpmock reply to: Hi there")
        delta = json.loads(events[-2][1])
        self.assertEqual((delta["delta"]["stop_reason"], delta["usage"]["output_tokens"]), ("end_turn", 5))

    def test_thinking_then_text_streamed(self):
        body = dict(self.BODY, thinking={"type": "enabled", "budget_tokens": 1024}, stream=True)
        events = [sse_events(c)[0] for c in sse_chunks(post_raw(body, "/v1/messages", AN))[1]]
        blocks = [(n, json.loads(d)) for n, d in events if n.startswith("content_block")]
        self.assertEqual(blocks[0][1]["content_block"], {"type": "thinking", "thinking": "", "signature": ""})
        kinds = [d["delta"]["type"] for n, d in blocks if n == "content_block_delta"]
        self.assertEqual(kinds, ["thinking_delta"] * 4 + ["signature_delta"] + ["text_delta"] * 5)
        stop_index = [n for n, _ in blocks].index("content_block_stop")
        self.assertEqual(blocks[stop_index - 1][1]["delta"]["type"], "signature_delta")
        self.assertEqual(blocks[stop_index + 1][1]["index"], 1)
        _, _, r = jpost("/v1/messages", dict(body, stream=False), AN)
        self.assertEqual([b["type"] for b in r["content"]], ["thinking", "text"])
        self.assertEqual(r["content"][0]["thinking"], "Thinking about: Hi there")

    def test_tool_use_streamed_as_input_json_delta(self):
        body = dict(self.BODY, tools=[{"name": "get_weather", "input_schema": WEATHER_SCHEMA}])
        _, _, r = jpost("/v1/messages", body, AN)
        block = r["content"][-1]
        self.assertEqual((r["stop_reason"], block["type"], block["name"], block["input"]),
                         ("tool_use", "tool_use", "get_weather", {"city": "example", "unit": "C"}))
        self.assertTrue(block["id"].startswith("toolu_"))
        events = [sse_events(c)[0] for c in sse_chunks(post_raw(dict(body, stream=True), "/v1/messages", AN))[1]]
        start = [json.loads(d) for n, d in events if n == "content_block_start"][-1]["content_block"]
        self.assertEqual((start["type"], start["input"]), ("tool_use", {}))
        partial = "".join(json.loads(d)["delta"].get("partial_json", "") for n, d in events
                          if n == "content_block_delta")
        self.assertEqual(json.loads(partial), {"city": "example", "unit": "C"})
        self.assertEqual(json.loads(events[-2][1])["delta"]["stop_reason"], "tool_use")

    def test_max_tokens_and_count_tokens(self):
        _, _, r = jpost("/v1/messages", dict(self.BODY, max_tokens=3), AN)
        self.assertEqual((r["content"][0]["text"], r["stop_reason"]), ("dpmock reply to: ", "max_tokens"))
        st, _, r = jpost("/v1/messages/count_tokens", {"model": "claude-x", "system": "be brief",
                                                       "messages": [{"role": "user", "content": "one two"}]}, AN)
        self.assertEqual((st, r), (200, {"input_tokens": 4}))

    def test_errors_in_anthropic_shape(self):
        msgs = [{"role": "user", "content": "x"}]
        cases = [
            ({"model": "c", "messages": msgs}, AN, 400, "invalid_request_error", "max_tokens: Field required"),
            ({"max_tokens": 5, "messages": msgs}, AN, 400, "invalid_request_error", "model: Field required"),
            ({"model": "c", "max_tokens": 5, "messages": []}, AN, 400, "invalid_request_error", "messages"),
            ({"model": "c", "max_tokens": 5, "messages": msgs, "tools": [{"name": "t"}]}, AN, 400,
             "invalid_request_error", "input_schema"),
            ({"model": "c", "max_tokens": 5, "messages": msgs}, {"x-api-key": "invalid-1"}, 401,
             "authentication_error", "invalid x-api-key"),
            ({"model": "c", "max_tokens": 5, "messages": msgs}, {"anthropic-version": "2023-06-01"}, 401,
             "authentication_error", "x-api-key"),
            ({"model": "claude-does-not-exist", "max_tokens": 5, "messages": msgs}, AN, 404, "not_found_error",
             "claude-does-not-exist"),
        ]
        for body, headers, status, etype, needle in cases:
            with self.subTest(body=body, headers=headers):
                st, hdrs, r = jpost("/v1/messages", body, headers)
                self.assertEqual((st, r["type"], r["error"]["type"]), (status, "error", etype))
                self.assertIn(needle, r["error"]["message"])
                self.assertEqual(r["request_id"], hdrs["request-id"])

    def test_server_held_threads(self):
        """thread: create holds the conversation under the answer's id; continue sends only the new turn."""
        tools = [{"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}]
        st, _, r = jpost("/v1/messages", dict(self.BODY, tools=tools, thread={"type": "create"}), AN)
        use = r["content"][0]
        self.assertEqual((st, use["type"]), (200, "tool_use"))
        turn = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"], "content": "42"}]}
        st, _, r2 = jpost("/v1/messages", dict(self.BODY, tools=tools, messages=[turn],
                                               thread={"type": "continue", "previous_message_id": r["id"]}), AN)
        self.assertEqual((st, r2["content"][0]["text"]), (200, "The lookup tool returned: 42"))
        st, _, r3 = jpost("/v1/messages", dict(self.BODY, messages=[{"role": "user", "content": "and then?"}],
                                               thread={"type": "continue", "previous_message_id": r2["id"]}), AN)
        self.assertGreater(r3["usage"]["input_tokens"], r2["usage"]["input_tokens"])  # the whole thread counts
        st, _, r = jpost("/v1/messages", dict(self.BODY, thread={"type": "continue", "previous_message_id": "msg_x"}),
                         AN)
        self.assertEqual((st, r["error"]["type"]), (404, "not_found_error"))

    def test_models_paging(self):
        ids = [m[0] for m in scenarios.ANTHROPIC_MODELS]
        get = lambda q: json.loads(SERVER.request("GET", "/v1/models" + q, None, AN)[2])  # noqa: E731
        r = get("?limit=2")
        self.assertEqual(([m["id"] for m in r["data"]], r["has_more"], r["first_id"], r["last_id"]),
                         (ids[:2], True, ids[0], ids[1]))
        r = get("?limit=4&after_id=" + ids[6])
        self.assertEqual(([m["id"] for m in r["data"]], r["has_more"]), (ids[7:], False))
        r = get("?limit=2&before_id=" + ids[3])
        self.assertEqual([m["id"] for m in r["data"]], ids[1:3])
        st, _, data = SERVER.request("GET", "/v1/models?limit=0", None, AN)
        self.assertEqual(st, 400)
        r = json.loads(SERVER.request("GET", "/v1/models/" + ids[0], None, AN)[2])
        self.assertEqual((r["type"], r["id"], r["display_name"]), ("model", ids[0], "Claude Opus 4.5"))
