"""Anthropic: /v1/messages (with its event stream) and token counting."""

import json
import re

from .base import ANTHROPIC, HTTPError, b64, scenarios
from .conversation import Plan, Turn, check_max_tokens, json_fragments, read_turn
from .files import file_key
from .providers import TOKEN_PIECES, first_of, check_key, check_model, count_tokens, invalid, new_id
from .shapes import Shape, validate
from .state import ThreadStore


_ANTHROPIC_BLOCK = {"type": str, "text": str, "id": str, "name": str, "input": dict, "tool_use_id": str,
                    "content": Shape.of(str, [dict]), "is_error": bool, "source": dict, "thinking": str,
                    "signature": str, "cache_control": (dict, type(None))}
#: messages fields typed as the SDKs type them (the real API refuses other types).
ANTHROPIC_MESSAGES_SHAPE = {
    "model": str, "max_tokens": int,
    "messages": [{"role": str, "content": Shape.of(str, [_ANTHROPIC_BLOCK])}],
    "system": Shape.of(str, [{"type": str, "text": str}]),
    "tools": [{"name": str, "description": str, "input_schema": dict, "type": str}],
    "tool_choice": {"type": str, "name": str, "disable_parallel_tool_use": bool},
    "stream": bool, "temperature": float, "top_p": float, "top_k": int, "stop_sequences": [str],
    "thinking": {"type": str, "budget_tokens": int}, "metadata": dict, "service_tier": str,
    "output_config": {"format": dict, "effort": str}, "output_format": dict,
    "thread": {"type": str, "previous_message_id": str},
}


def anthropic_reader(req):
    """The route's reader: a server-held thread (``thread: continue``) is resumed first; a block whose source
    is an uploaded file (Files API) must name one."""
    body = thread_messages(req)
    turn = anthropic_turn(body)
    for m in body.get("messages") or ():
        for block in m.get("content") if isinstance(m.get("content"), list) else ():
            source = block.get("source") if isinstance(block, dict) else None
            if isinstance(source, dict) and source.get("type") == "file":
                file_id = source.get("file_id")
                if not isinstance(file_id, str) or not file_id:
                    raise invalid("source.file_id: Input should be a valid string")
                if req.server.files.get(ANTHROPIC, file_key(ANTHROPIC, file_id)) is None:
                    raise HTTPError(404, "File not found: %s" % file_id[:100], etype="not_found_error")
    return turn


def thread_messages(req):
    """The body, with a continued thread's earlier messages in front of the new turn's."""
    body = req.json
    thread = body.get("thread")
    if thread is None:
        return body
    validate(ANTHROPIC, body, {"thread": {"type": str, "previous_message_id": str}})
    if thread.get("type") not in ("create", "continue"):
        raise invalid("thread.type: Input should be 'create' or 'continue'")
    if thread["type"] == "create":
        return body
    earlier = req.server.threads.get(thread.get("previous_message_id"))
    if earlier is None:
        raise HTTPError(404, "thread.previous_message_id: no stored message %r (dpmock holds the last %d)" % (
            thread.get("previous_message_id"), ThreadStore.LIMIT), etype="not_found_error")
    return dict(body, messages=earlier + list(body.get("messages") or []))


def anthropic_turn(body, need_max_tokens=True):
    """Read a messages body into a Turn, refusing what Anthropic refuses."""
    validate(ANTHROPIC, body, ANTHROPIC_MESSAGES_SHAPE)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model: Field required")
    turn = Turn(model)
    if need_max_tokens:
        if "max_tokens" not in body:
            raise invalid("max_tokens: Field required")
        turn.max_tokens = check_max_tokens(body.get("max_tokens"), "max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: at least one message is required")
    system = body.get("system")
    turn.system = _anthropic_content(system, turn, {})
    names = {}  # tool_use id -> name
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise invalid("messages.%d.role: Input should be 'user' or 'assistant'" % i)
        text = _anthropic_content(m.get("content"), turn, names)
        if m["role"] == "user":
            content = m.get("content")
            # A message of tool_result blocks only is the tool's answer, not the user's words: as on every
            # provider, the user's last text (and turn count) stays that of the last message they wrote.
            if not isinstance(content, list) or any(isinstance(b, dict) and b.get("type") != "tool_result"
                                                    for b in content):
                turn.user_text = text
                turn.user_turns += 1
    last = messages[-1]
    wrote = isinstance(last.get("content"), list) and any(
        isinstance(b, dict) and b.get("type") == "text" and str(b.get("text", "")).strip() for b in last["content"])
    if last["role"] == "user" and isinstance(last.get("content"), list) and not wrote:  # words: the user's turn
        for block in last["content"]:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                turn.tool_result = (names.get(block.get("tool_use_id"), "tool"),
                                    _anthropic_content(block.get("content"), Turn(""), {}))
                turn.tool_args = names.get(("args", block.get("tool_use_id")))
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid("tools: Input should be a valid list")
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
                raise invalid("tools.%d.name: Field required" % i)
            if t.get("type") in (None, "custom"):
                if not isinstance(t.get("input_schema"), dict):
                    raise invalid("tools.%d.custom.input_schema: Field required" % i)
                turn.tools.append((t["name"], t["input_schema"]))
            else:  # one of Anthropic's own tools (bash_20250124, ...): offered, though dpmock never calls it itself
                turn.typed_tools.append(t["name"])
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        turn.tools_off = choice.get("type") == "none"
        if choice.get("type") == "tool":
            turn.forced_tool = choice.get("name")
    thinking = body.get("thinking")
    turn.thinking = isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")
    fmt = first_of(body.get("output_config"), "format") or body.get("output_format")  # GA, and the beta's name
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise invalid("output_config.format.schema: Field required")
        turn.output = fmt["schema"]
    elif fmt is not None:
        raise invalid("output_config.format: Input tag %r found using 'type' does not match the expected tag: "
                      "'json_schema'" % (fmt.get("type") if isinstance(fmt, dict) else fmt,))
    return turn


def _anthropic_content(content, turn, names):
    if isinstance(content, str):
        turn.add_text(content)
        return content
    texts = []
    for block in content if isinstance(content, list) else ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
            turn.add_text(texts[-1])
        elif kind == "tool_use":
            names[block.get("id")] = block.get("name")
            names[("args", block.get("id"))] = block.get("input")
            turn.add_text(json.dumps(block.get("input")))
        elif kind == "tool_result":
            turn.add_text(_anthropic_content(block.get("content"), Turn(""), names))
        elif kind in ("image", "document"):
            turn.media += 1
    return "\n".join(texts)


_ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "tool": "tool_use", "filter": "refusal"}


def anthropic_blocks(plan):
    """The content blocks of the answer, in order."""
    blocks = []
    if plan.thinking:
        blocks.append({"type": "thinking", "thinking": plan.thinking, "signature": signature(plan.thinking)})
    if plan.text or not plan.calls:
        blocks.append({"type": "text", "text": plan.text})
    for cid, name, args in plan.calls:
        blocks.append({"type": "tool_use", "id": "toolu_01" + cid, "name": name, "input": args})
    return blocks


def signature(text):
    """An opaque, deterministic signature for a thinking block (base64, as the real ones are)."""
    return b64(("dpmock-signature:" + text[:48]).encode("utf-8"))


def anthropic_usage(plan, output_tokens):
    return {"input_tokens": plan.prompt_tokens, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "output_tokens": output_tokens, "service_tier": "standard"}


def handle_vertex_messages(w, req):
    """Vertex AI's rawPredict / streamRawPredict: the model in the path, the API version in the body."""
    check_key(req)
    if req.params["model"] == "count-tokens":
        raise invalid("count-tokens is no model: token counting is POST .../models/count-tokens:rawPredict")
    if not isinstance(req.json.get("anthropic_version"), str):
        raise invalid("anthropic_version: Field required (Vertex AI takes the API version in the body, such as "
                      "\"vertex-2023-10-16\")")
    handle_anthropic_messages(w, req)


def handle_anthropic_messages(w, req):
    check_key(req)
    turn = read_turn(req)
    check_model(req, turn.model)
    plan = Plan(turn, w.fault, req.answer)
    blocks = anthropic_blocks(plan)
    out = plan.output_tokens + plan.thinking_tokens
    message = {"id": new_id("msg_01"), "type": "message", "role": "assistant", "model": turn.model}
    if req.json.get("thread") is not None:  # the server holds the conversation under this answer's id
        w.server.threads.put(message["id"], thread_messages(req)["messages"] +
                             [{"role": "assistant", "content": blocks}], req.body_bytes + len(plan.text))
    if not req.route.streaming(req):
        w.send_json(200, dict(message, content=blocks, stop_reason=_ANTHROPIC_STOP[plan.finish], stop_sequence=None,
                              usage=anthropic_usage(plan, out)))
        return
    w.start_stream(200, scenarios.SSE)
    w.send_sse_event(dict(type="message_start", message=dict(message, content=[], stop_reason=None,
                                                             stop_sequence=None, usage=anthropic_usage(plan, 1))),
                     "message_start")
    for i, block in enumerate(blocks):
        kind = block["type"]
        start = {"thinking": {"type": "thinking", "thinking": "", "signature": ""},
                 "text": {"type": "text", "text": ""}, "tool_use": dict(block, input={})}[kind]
        w.send_sse_event({"type": "content_block_start", "index": i, "content_block": start}, "content_block_start")
        if i == 0:
            w.send_sse_event({"type": "ping"}, "ping")
        if kind == "thinking":
            deltas = [{"type": "thinking_delta", "thinking": p} for p in re.findall(TOKEN_PIECES, block["thinking"])]
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        elif kind == "text":
            deltas = [{"type": "text_delta", "text": p} for p in plan.pieces]
        else:
            deltas = [{"type": "input_json_delta", "partial_json": f}
                      for f in [""] + json_fragments(json.dumps(block["input"]))]
        for delta in deltas:
            w.send_sse_event({"type": "content_block_delta", "index": i, "delta": delta}, "content_block_delta")
        w.send_sse_event({"type": "content_block_stop", "index": i}, "content_block_stop")
    w.send_sse_event({"type": "message_delta", "delta": {"stop_reason": _ANTHROPIC_STOP[plan.finish],
                                                          "stop_sequence": None},
                      "usage": {k: v for k, v in anthropic_usage(plan, out).items() if k != "service_tier"}},
                     "message_delta")
    w.send_sse_event({"type": "message_stop"}, "message_stop")
    w.end_stream()


def handle_anthropic_count_tokens(w, req):
    check_key(req)
    turn = anthropic_turn(req.json, need_max_tokens=False)
    check_model(req, turn.model)
    for name, schema in turn.tools:
        turn.add_text(name + " " + json.dumps(schema))
    w.send_json(200, {"input_tokens": count_tokens(turn.texts, turn.media)})
