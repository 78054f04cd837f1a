"""OpenAI Responses: /v1/responses, its stream of typed events, and stored responses."""

import itertools
import json
import re
import time

from .base import HTTPError, OPENAI, COMPACT_JSON, scenarios
from .conversation import Plan, Turn, require_model, json_fragments, read_turn
from .openai_api import NULL, openai_content, openai_output
from .providers import TOKEN_PIECES, ascii_json, first_of, check_key, check_model, count_tokens, invalid, new_id
from .routing import int_arg
from .shapes import Shape, validate
from .state import StoredResponse


_RESPONSES_PART = {"type": str, "text": str, "image_url": (str, NULL), "file_id": (str, NULL), "file_data": str,
                   "file_url": str, "filename": str, "detail": str, "annotations": list, "logprobs": list}
_RESPONSES_ITEM = {"type": str, "id": str, "role": str, "status": (str, NULL),
                   "content": Shape.of(str, NULL, [_RESPONSES_PART]), "call_id": str, "name": str, "arguments": str,
                   "output": Shape.of(str, [_RESPONSES_PART]), "summary": [{"type": str, "text": str}]}
#: /responses fields typed as the SDKs type them (``tools`` are flat: no ``function`` object as in Chat).
RESPONSES_SHAPE = {
    "model": str, "input": Shape.of(str, [_RESPONSES_ITEM]), "instructions": (str, NULL),
    "tools": [{"type": str, "name": str, "description": (str, NULL), "parameters": (dict, NULL),
               "strict": (bool, NULL)}],
    "tool_choice": Shape.of(str, {"type": str, "name": str}),
    "reasoning": Shape.of(NULL, {"effort": (str, NULL), "summary": (str, NULL), "generate_summary": (str, NULL)}),
    "text": Shape.of(NULL, {"format": {"type": str, "name": str, "schema": dict, "strict": (bool, NULL),
                                        "description": str}, "verbosity": (str, NULL)}),
    "max_output_tokens": (int, NULL), "max_tool_calls": (int, NULL), "store": (bool, NULL),
    "background": (bool, NULL), "previous_response_id": (str, NULL), "metadata": (dict, NULL),
    "temperature": (float, NULL), "top_p": (float, NULL), "top_logprobs": (int, NULL),
    "parallel_tool_calls": (bool, NULL), "stream": (bool, NULL), "stream_options": (dict, NULL),
    "truncation": (str, NULL), "include": (list, NULL), "user": str, "service_tier": (str, NULL),
    "prompt_cache_key": (str, NULL), "safety_identifier": (str, NULL),
}
MIN_OUTPUT_TOKENS = 16  #: the API refuses a smaller max_output_tokens
_ITEM_IDS = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_", "reasoning": "rs_"}


def _missing(name):
    return invalid("Missing required parameter: '%s'." % name, name, "missing_required_parameter")


def responses_input(value):
    """The request's ``input`` as the items the API stores: each with a type, an id and a status."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    items = []
    for i, raw in enumerate(value):
        kind = raw.get("type") or ("message" if "role" in raw else None)
        where = "input[%d]" % i
        if kind is None:
            raise _missing(where + ".type")
        item = dict(raw, type=kind, id=raw.get("id") or new_id(_ITEM_IDS.get(kind, "item_"), 24))
        if kind == "message":
            role, content = raw.get("role"), raw.get("content")
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid("Invalid value: '%s'. Supported values are: 'assistant', 'system', 'developer', and "
                              "'user'." % role, where + ".role", "invalid_value")
            if content is None:
                raise _missing(where + ".content")
            if isinstance(content, str):
                content = [{"type": "output_text", "text": content, "annotations": []} if role == "assistant" else
                           {"type": "input_text", "text": content}]
            item["content"] = content
        for field in {"function_call": ("call_id", "name", "arguments"),
                      "function_call_output": ("call_id", "output")}.get(kind, ()):
            if raw.get(field) is None:
                raise _missing("%s.%s" % (where, field))
        if kind in ("message", "function_call", "function_call_output"):
            item["status"] = raw.get("status") or "completed"
        items.append(item)
    return items


def responses_turn(body, model, items):
    """Read a /responses body (its items: previous ones, then this input) into a Turn."""
    turn = Turn(model)
    turn.add_text(body.get("instructions"))
    turn.system = body.get("instructions") or ""
    names = {}  # call_id -> function name
    for item in items:
        kind = item["type"]
        if kind == "message":
            text = openai_content(item["content"], turn)
            if item["role"] == "user":
                turn.user_text = text
                turn.user_turns += 1
            elif item["role"] in ("system", "developer"):
                turn.system = (turn.system + "\n" + text).strip("\n")
        elif kind == "function_call":
            names[item["call_id"]] = item["name"]
            names[("args", item["call_id"])] = item["arguments"]
            turn.add_text(item["arguments"])
        elif kind == "function_call_output":
            result = openai_content(item["output"], turn)
    if items and items[-1]["type"] == "function_call_output":
        last = items[-1]
        turn.tool_result = (names.get(last["call_id"]) or last.get("name") or "tool", result)
        turn.tool_args = names.get(("args", last["call_id"]))
    for i, t in enumerate(body.get("tools") or ()):
        if t.get("type") == "function":
            if not t.get("name"):
                raise _missing("tools[%d].name" % i)
            turn.tools.append((t["name"], t.get("parameters") or {"type": "object", "properties": {}}))
    choice = body.get("tool_choice")
    if isinstance(choice, str) and choice not in ("auto", "none", "required"):
        raise invalid("Invalid value: '%s'. Supported values are: 'none', 'auto', and 'required'." % choice,
                      "tool_choice", "invalid_value")
    if isinstance(choice, dict) and choice.get("type") == "function":
        if choice.get("name") not in dict(turn.tools):
            raise invalid("Tool choice 'function' not found in 'tools' parameter.", "tool_choice")
        turn.forced_tool = choice["name"]
    turn.tools_off = choice == "none"
    # dpmock's own answer must call a tool, even right after a tool's result (rules still see the result)
    turn.must_call = choice == "required" or bool(turn.forced_tool)
    reasoning = body.get("reasoning")
    turn.thinking = isinstance(reasoning, dict) and reasoning.get("effort") != "none"
    limit = body.get("max_output_tokens")
    if limit is not None and limit < MIN_OUTPUT_TOKENS:
        raise invalid("Invalid 'max_output_tokens': integer below minimum value. Expected a value >= %d, but got %d "
                      "instead." % (MIN_OUTPUT_TOKENS, limit), "max_output_tokens", "integer_below_min_value")
    turn.max_tokens = limit
    turn.output = openai_output(first_of(body.get("text"), "format"), "text.format")
    return turn


def responses_history(store, previous_id, lenient=False):
    """The items a previous response carries into this one (its conversation, input and output), and
    what they cost the store. ``lenient``: an unknown one is no error (while recording, the upstream
    holds the responses dpmock never saw)."""
    if previous_id is None:
        return [], 0
    record = store.get(previous_id)
    if record is None:
        if lenient:
            return [], 0
        raise HTTPError(400, "Previous response with id '%s' not found." % previous_id, "previous_response_not_found",
                        param="previous_response_id")
    return record.context, record.size


def responses_output(plan, summary):
    """The answer's output items: reasoning (when asked for), then one message or the function calls."""
    output = []
    if plan.thinking:
        output.append({"id": new_id("rs_", 24), "type": "reasoning",
                       "summary": [{"type": "summary_text", "text": plan.thinking}] if summary else []})
    for cid, name, args in plan.calls:
        output.append({"id": new_id("fc_", 24), "type": "function_call", "status": "completed",
                       "arguments": COMPACT_JSON(args), "call_id": "call_" + cid, "name": name})
    if not plan.calls:
        output.append({"id": new_id("msg_", 24), "type": "message",
                       "status": "incomplete" if plan.finish == "length" else "completed",
                       "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": plan.text}],
                       "role": "assistant"})
    return output


def responses_usage(plan):
    out = plan.output_tokens + plan.thinking_tokens
    return {"input_tokens": plan.prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": plan.thinking_tokens},
            "total_tokens": plan.prompt_tokens + out}


def _given(body, name, default):
    value = body.get(name)
    return default if value is None else value


def responses_object(body, model, plan, output):
    """The Response object, every field the SDK types (the SDK computes ``output_text`` itself)."""
    now = int(time.time())
    status = "incomplete" if plan.finish == "length" else "completed"
    reasoning = body.get("reasoning") or {}
    text = body.get("text") or {}
    tools = [dict(t, description=t.get("description"), parameters=t.get("parameters"), strict=_given(t, "strict", True))
             if t.get("type") == "function" else t for t in body.get("tools") or ()]
    return {"id": new_id("resp_", 24), "object": "response", "created_at": now, "status": status,
            "background": body.get("background") is True, "completed_at": now if status == "completed" else None,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": body.get("max_tool_calls"), "model": model, "output": output,
            "parallel_tool_calls": _given(body, "parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"), "prompt_cache_key": body.get("prompt_cache_key"),
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
            "safety_identifier": body.get("safety_identifier"), "service_tier": "default",
            "store": body.get("store") is not False, "temperature": _given(body, "temperature", 1.0),
            "text": {"format": text.get("format") or {"type": "text"}, "verbosity": text.get("verbosity") or "medium"},
            "tool_choice": _given(body, "tool_choice", "auto"), "tools": tools,
            "top_logprobs": _given(body, "top_logprobs", 0), "top_p": _given(body, "top_p", 1.0),
            "truncation": _given(body, "truncation", "disabled"), "usage": responses_usage(plan),
            "user": body.get("user"), "metadata": _given(body, "metadata", {})}


def responses_reader(req):
    """The route's reader: the conversation, a previous response's items first."""
    body = req.json
    validate(OPENAI, body, RESPONSES_SHAPE)
    model = require_model(body)
    if body.get("input") is None:
        raise _missing("input")
    history, _ = responses_history(req.server.responses, body.get("previous_response_id"),
                                   lenient=req.server.recorder is not None)
    return responses_turn(body, model, history + responses_input(body["input"]))


def remember_response(req, raw):
    """A Responses answer dpmock did not make (forwarded while recording, or a recording replayed), stored
    as its own are: a later request chained to it by previous_response_id finds its conversation, so a
    recorded multi-turn agent replays whole, offline. ``raw`` is the recorded answer (body or events)."""
    body = req.json
    if req.route.name != "responses" or raw.get("status", 500) >= 400 or not isinstance(body, dict) \
            or body.get("store") is False:
        return
    response = None
    try:
        if "body" in raw:
            response = json.loads(raw["body"])
        for ev in raw.get("events", ()):  # a stream: the response.completed event carries the whole response
            for line in ev.get("data", "").splitlines():
                if line.startswith("data:") and '"response.completed"' in line:
                    response = json.loads(line[5:]).get("response")
    except (ValueError, AttributeError):
        return
    if not isinstance(response, dict) or not isinstance(response.get("id"), str):
        return
    output = response.get("output") if isinstance(response.get("output"), list) else []
    history, inherited = responses_history(req.server.responses, body.get("previous_response_id"), lenient=True)
    items = responses_input(body["input"])
    size = inherited + req.body_bytes + len(raw.get("body", "")) + sum(len(e.get("data", "")) for e in
                                                                      raw.get("events", ()))
    req.server.responses.add(StoredResponse(response, items, history + items + output, size))


def handle_openai_responses(w, req):
    check_key(req)
    body = req.json
    turn = read_turn(req)
    model = turn.model
    store = body.get("store") is not False
    if body.get("background") is True and not store:
        raise invalid("Background mode requires 'store' to be true.", "background")
    history, inherited = responses_history(w.server.responses, body.get("previous_response_id"))
    items = responses_input(body["input"])
    check_model(req, model)
    plan = Plan(turn, w.fault, req.answer)
    reasoning = body.get("reasoning") or {}
    response = responses_object(body, model, plan, responses_output(plan, reasoning.get("summary") or
                                                                    reasoning.get("generate_summary")))
    if store:
        cost = inherited + req.body_bytes + len(plan.text)  # a context holds its ancestors' items
        w.server.responses.add(StoredResponse(response, items, history + items + response["output"], cost))
    if req.route.streaming(req):
        send_responses_stream(w, response, plan)
    elif response["background"]:  # asked to run in the background: it is queued, and done when next asked
        w.send_json(200, dict(response, status="queued", output=[], usage=None, completed_at=None,
                              incomplete_details=None))
    else:
        w.send_json(200, response)


def send_responses_stream(w, response, plan):
    """response.created and .in_progress, each output item's events, then response.completed (or
    .incomplete) with the whole response; every event carries its type and a sequence number."""
    seq = itertools.count()

    def emit(kind, where=None, **fields):
        event = {"type": kind, "sequence_number": next(seq)}
        event.update(where or ())
        event.update(fields)
        w.send_sse_event(event, event=kind)
    w.stream_error = responses_stream_error
    w.start_stream(200, scenarios.SSE)
    head = dict(response, status="in_progress", output=[], usage=None, completed_at=None, incomplete_details=None)
    emit("response.created", response=head)
    emit("response.in_progress", response=head)
    for index, item in enumerate(response["output"]):
        _stream_output_item(emit, index, item, plan)
    emit("response." + response["status"], response=response)
    w.end_stream()


def _stream_output_item(emit, index, item, plan):
    """The events of one output item, from output_item.added to output_item.done."""
    kind = item["type"]
    where = {"item_id": item["id"], "output_index": index}
    if kind == "message":
        part = item["content"][0]
        emit("response.output_item.added", output_index=index, item=dict(item, status="in_progress", content=[]))
        emit("response.content_part.added", where, content_index=0, part=dict(part, text=""))
        for piece in plan.pieces:
            emit("response.output_text.delta", where, content_index=0, delta=piece, logprobs=[])
        emit("response.output_text.done", where, content_index=0, text=part["text"], logprobs=[])
        emit("response.content_part.done", where, content_index=0, part=part)
    elif kind == "function_call":
        emit("response.output_item.added", output_index=index, item=dict(item, status="in_progress", arguments=""))
        for fragment in json_fragments(item["arguments"]):
            emit("response.function_call_arguments.delta", where, delta=fragment)
        emit("response.function_call_arguments.done", where, name=item["name"], arguments=item["arguments"])
    else:  # reasoning: its summary parts
        emit("response.output_item.added", output_index=index, item=dict(item, summary=[]))
        for i, part in enumerate(item["summary"]):
            emit("response.reasoning_summary_part.added", where, summary_index=i, part=dict(part, text=""))
            for piece in re.findall(TOKEN_PIECES, part["text"]):
                emit("response.reasoning_summary_text.delta", where, summary_index=i, delta=piece)
            emit("response.reasoning_summary_text.done", where, summary_index=i, text=part["text"])
            emit("response.reasoning_summary_part.done", where, summary_index=i, part=part)
    emit("response.output_item.done", output_index=index, item=item)


def _stored_response(w, req):
    record = w.server.responses.get(req.params["response_id"])
    if record is None:
        raise HTTPError(404, "Response with id '%s' not found." % req.params["response_id"])
    return record


def handle_responses_get(w, req):
    check_key(req)
    w.send_json(200, _stored_response(w, req).response)


def handle_responses_delete(w, req):
    check_key(req)
    if w.server.responses.remove(req.params["response_id"]) is None:
        _stored_response(w, req)  # its 404
    w.send_json(200, {"id": req.params["response_id"], "object": "response.deleted", "deleted": True})


def handle_responses_cancel(w, req):
    """Only a background response can be cancelled; dpmock's have finished by then, and a finished
    one is answered as it is."""
    check_key(req)
    record = _stored_response(w, req)
    if not record.response["background"]:
        raise invalid("Only responses created with background=true can be cancelled.", "response_id")
    w.send_json(200, record.response)


def handle_responses_input_items(w, req):
    check_key(req)
    items = list(_stored_response(w, req).input)
    order = req.arg("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid("Invalid value: '%s'. Supported values are: 'asc' and 'desc'." % order, "order", "invalid_value")
    if order == "desc":
        items.reverse()
    limit = int_arg(req, "limit", 20, 1, 100)
    after = req.arg("after")
    ids = [item["id"] for item in items]
    if after is not None and after not in ids:
        raise invalid("Invalid 'after': no input item with id '%s' in this response." % after, "after")
    start = ids.index(after) + 1 if after is not None else 0
    page = items[start:start + limit]
    w.send_json(200, {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                      "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(items)})


def handle_responses_input_tokens(w, req):
    """What POST /responses would count as its input_tokens, without answering it."""
    check_key(req)
    body = req.json
    validate(OPENAI, body, RESPONSES_SHAPE)
    model = body.get("model") or "gpt-4o"
    check_model(req, model)
    history, _ = responses_history(w.server.responses, body.get("previous_response_id"))
    turn = responses_turn(body, model, history + responses_input(body.get("input")))
    w.send_json(200, {"object": "response.input_tokens", "input_tokens": count_tokens(turn.texts, turn.media)})


def responses_stream_error(w):
    """The Responses stream's own error event, numbered as the next event would have been."""
    return "event: error\ndata: %s\n\n" % ascii_json({
        "type": "error", "code": "server_error", "param": None, "sequence_number": w.events,
        "message": "The server had an error while processing your request. Sorry about that!"})
