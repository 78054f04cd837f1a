"""Amazon Bedrock: InvokeModel for Anthropic's models (its body and events, in AWS's binary event stream), the
Converse API (its own shapes, any model), and token counting. Anthropic's engine answers; Bedrock's keys, errors
and headers are its row of providers.PROVIDERS. The event stream (application/vnd.amazon.eventstream) is framed
here: each message is a prelude (total length, headers length, CRC32), headers, the payload and a CRC32."""

import binascii
import json
import struct
import time

from .anthropic_api import anthropic_blocks, anthropic_turn, handle_anthropic_messages
from .base import ANTHROPIC, COMPACT_JSON, HTTPError, b64
from .conversation import JSON_OBJECT, Plan, Turn, check_max_tokens, json_fragments, read_turn
from .providers import check_key, check_model, count_tokens
from .shapes import validate


EVENTSTREAM = "application/vnd.amazon.eventstream"


def _validation(message):
    return HTTPError(400, message, etype="ValidationException")


# ----------------------------------------------------------------------------- the event stream framing

def _header(name, value):
    """One string header (type 7): name length (1 byte), name, type, value length (2 bytes), value."""
    n, v = name.encode("utf-8"), value.encode("utf-8")
    return struct.pack(">B", len(n)) + n + b"\x07" + struct.pack(">H", len(v)) + v


def event_headers(*pairs):
    return b"".join(_header(k, v) for k, v in pairs)


def eventstream_message(headers, payload):
    """One event stream message: ``headers`` already encoded (event_headers), ``payload`` bytes."""
    prelude = struct.pack(">II", 16 + len(headers) + len(payload), len(headers))
    message = prelude + struct.pack(">I", binascii.crc32(prelude)) + headers + payload
    return message + struct.pack(">I", binascii.crc32(message))


_EVENT_HEADERS = {}  #: event type -> its encoded headers (a finite set of names)


def _event(event_type, payload):
    headers = _EVENT_HEADERS.get(event_type)
    if headers is None:
        headers = _EVENT_HEADERS[event_type] = event_headers(
            (":event-type", event_type), (":content-type", "application/json"), (":message-type", "event"))
    return eventstream_message(headers, payload.encode("utf-8"))


def exception_message(exception_type, payload):
    """An exception event (``:message-type: exception``): how a stream reports an error after its 200."""
    return eventstream_message(event_headers((":exception-type", exception_type), (":content-type", "application/json"),
                                             (":message-type", "exception")), payload.encode("utf-8"))


def read_message(data):
    """The first message of an event stream as a recorded event (``chunk``: an InvokeModel chunk's decoded
    bytes; ``event`` and ``data``; ``exception`` and ``data``), and how many bytes it took; (None, 0) while it is
    incomplete. Bytes that are no message (a bad prelude or CRC, binary headers) are kept as ``data_base64``."""
    if len(data) < 12:
        return None, 0
    total, hlen = struct.unpack(">II", data[:8])
    if total < 16 or hlen > total - 16 or struct.unpack(">I", data[8:12])[0] != binascii.crc32(data[:8]):
        return {"data_base64": b64(data)}, len(data)
    if len(data) < total:
        return None, 0
    raw = {"data_base64": b64(data[:total])}
    if struct.unpack(">I", data[total - 4:total])[0] != binascii.crc32(data[:total - 4]):
        return raw, total
    headers, at = {}, 12
    try:
        while at < 12 + hlen:
            n = data[at]
            name = data[at + 1:at + 1 + n].decode("utf-8")
            if data[at + 1 + n] != 7:
                return raw, total  # a header of another type: kept as it came
            size = struct.unpack(">H", data[at + 2 + n:at + 4 + n])[0]
            headers[name] = data[at + 4 + n:at + 4 + n + size].decode("utf-8")
            at += 4 + n + size
        text = data[12 + hlen:total - 4].decode("utf-8")
    except (IndexError, struct.error, UnicodeDecodeError):
        return raw, total
    kind, event = headers.get(":message-type"), headers.get(":event-type")
    if kind == "exception" and ":exception-type" in headers:
        return {"exception": headers[":exception-type"], "data": text}, total
    if kind != "event" or event is None:
        return raw, total
    if event == "chunk":
        try:
            return {"chunk": binascii.a2b_base64(json.loads(text)["bytes"]).decode("utf-8")}, total
        except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
            pass
    return {"event": event, "data": text}, total


_STREAM_FAILURE = ("internalServerException", "The system encountered an unexpected error during processing. "
                                              "Try your request again.")
_PADDING = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


class ConverseFramer:
    """ConverseStream's framing: each event's JSON is the payload, its name the ``:event-type``."""

    content_type = EVENTSTREAM

    def __init__(self, req):
        self.headers = []

    def frame(self, event, payload):
        return _event(event, payload)

    def error(self):
        return exception_message(_STREAM_FAILURE[0], COMPACT_JSON({"message": _STREAM_FAILURE[1]}))


class InvokeFramer(ConverseFramer):
    """InvokeModelWithResponseStream's framing: each Anthropic event's JSON, base64, in a ``chunk`` event's
    ``bytes`` (with Bedrock's ``p`` padding); message_stop carries Bedrock's invocation metrics."""

    def __init__(self, req):
        self.headers = [("X-Amzn-Bedrock-Content-Type", "application/json")]
        self.t0, self.first, self.tokens = req.t0, None, {}

    def frame(self, event, payload):
        if event == "chunk":  # already a chunk's JSON (a recorded one that was no Anthropic event)
            return _event("chunk", payload)
        if self.first is None:
            self.first = time.monotonic()
        if event in ("message_start", "message_delta"):  # the usage the metrics repeat
            try:
                usage = json.loads(payload)
                usage = usage.get("message", usage).get("usage") or {}
                self.tokens.update((k, v) for k, v in usage.items() if k in ("input_tokens", "output_tokens"))
            except (ValueError, AttributeError):
                pass  # a fault broke the payload: the metrics keep what they had
        elif event == "message_stop" and payload.endswith("}") and "amazon-bedrock-invocationMetrics" not in payload:
            now = time.monotonic()
            metrics = {"inputTokenCount": self.tokens.get("input_tokens", 0),
                       "outputTokenCount": self.tokens.get("output_tokens", 0),
                       "invocationLatency": int((now - self.t0) * 1000),
                       "firstByteLatency": int((self.first - self.t0) * 1000)}
            payload = payload[:-1] + ',"amazon-bedrock-invocationMetrics":%s}' % COMPACT_JSON(metrics)
        data = b64(payload.encode("utf-8"))
        return _event("chunk", '{"bytes":"%s","p":"%s"}' % (data, _PADDING[:len(data) % 24 + 4]))


# ----------------------------------------------------------------------------- InvokeModel

def handle_bedrock_invoke(w, req):
    """InvokeModel / InvokeModelWithResponseStream: Anthropic's messages body (the model in the path,
    ``anthropic_version`` in the body), answered by Anthropic's engine."""
    check_key(req)
    model = req.params["model"]
    check_model(req, model)
    if "anthropic" not in model.lower() and not model.startswith("arn:"):  # an ARN may name a profile only
        raise _validation("dpmock answers InvokeModel for Anthropic's models (anthropic.*, us.anthropic.*, their "
                          "inference profiles), not %r; the Converse API (/model/%s/converse) answers every model"
                          % (model, model))
    if not isinstance(req.json, dict):
        raise _validation("Malformed input request: expected a JSON object, please reformat your input and try again.")
    if not isinstance(req.json.get("anthropic_version"), str):
        raise _validation("Malformed input request: #: required key [anthropic_version] not found, please reformat "
                          "your input and try again. (Bedrock's is \"bedrock-2023-05-31\")")
    handle_anthropic_messages(w, req)


# ----------------------------------------------------------------------------- Converse

_CONVERSE_BLOCK = {"text": str, "toolUse": {"toolUseId": str, "name": str, "input": (dict, list, str, int, float,
                                                                                      bool, type(None))},
                   "toolResult": {"toolUseId": str, "content": [dict], "status": str},
                   "image": dict, "document": dict, "video": dict, "audio": dict, "reasoningContent": dict,
                   "cachePoint": dict, "guardContent": dict}
CONVERSE_SHAPE = {
    "messages": [{"role": str, "content": [_CONVERSE_BLOCK]}],
    "system": [{"text": str, "cachePoint": dict, "guardContent": dict}],
    "inferenceConfig": {"maxTokens": int, "temperature": float, "topP": float, "stopSequences": [str]},
    "toolConfig": {"tools": [{"toolSpec": {"name": str, "description": str, "inputSchema": {"json": dict}},
                              "cachePoint": dict}],
                   "toolChoice": {"auto": dict, "any": dict, "tool": {"name": str}}},
    "additionalModelRequestFields": dict,
    "outputConfig": {"textFormat": {"type": str, "structure": {"jsonSchema": {"schema": str, "name": str,
                                                                              "description": str}}}},
}


def converse_reader(req):
    return converse_turn(req.json, req.params["model"])


def converse_turn(body, model):
    """Read a Converse body into a Turn, refusing what Bedrock refuses (in its words)."""
    if not isinstance(body, dict):
        raise _validation("Malformed input request: expected a JSON object")
    validate(ANTHROPIC, body, CONVERSE_SHAPE)
    turn = Turn(model)
    for block in body.get("system") or ():
        turn.add_text(block.get("text"))
    turn.system = "\n".join(b["text"] for b in body.get("system") or () if isinstance(b.get("text"), str))
    messages = body.get("messages")
    if not messages:
        raise _validation("A conversation must start with a user message. Try again with a conversation that starts "
                          "with a user message.")
    tools = body.get("toolConfig")
    names = {}  # toolUseId -> (name, input)
    for i, m in enumerate(messages or ()):
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise _validation("1 validation error detected: Value '%s' at 'messages.%d.member.role' failed to satisfy "
                              "constraint: Member must satisfy enum value set: [user, assistant]" % (role, i + 1))
        if (role == "user") != (i % 2 == 0):
            raise _validation("A conversation must start with a user message. Try again with a conversation that "
                              "starts with a user message." if i == 0 else
                              "A conversation must alternate between user and assistant roles. Make sure the "
                              "conversation alternates between user and assistant roles and try again.")
        content = m.get("content")
        if not content:
            raise _validation("The content field in the Message object at messages.%d is empty. Add a ContentBlock "
                              "object to the content field and try again." % i)
        texts, results = [], []
        for block in content:
            if isinstance(block.get("text"), str):
                texts.append(block["text"])
                turn.add_text(block["text"])
            elif "toolUse" in block:
                use = block["toolUse"]
                names[use.get("toolUseId")] = (use.get("name"), use.get("input"))
                turn.add_text(json.dumps(use.get("input")))
            elif "toolResult" in block:
                if tools is None:
                    raise _validation("The toolConfig field must be defined when using toolUse and toolResult content "
                                      "blocks.")
                results.append(block["toolResult"])
            elif any(k in block for k in ("image", "document", "video", "audio")):
                turn.media += 1
        text = "\n".join(texts)
        for result in results:
            turn.add_text(_result_text(result))
        if role == "user" and (texts or not results):
            turn.user_text = text
            turn.user_turns += 1
        if role == "user" and i == len(messages) - 1 and results and not "".join(texts).strip():
            name, args = names.get(results[-1].get("toolUseId"), ("tool", None))
            turn.tool_result, turn.tool_args = (name or "tool", _result_text(results[-1])), args
    for i, t in enumerate((tools or {}).get("tools") or ()):
        spec = t.get("toolSpec")
        if spec is None:
            continue  # a cachePoint between tools
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise _validation("The value at toolConfig.tools.%d.toolSpec.name is empty. Name the tool and try again." % i)
        schema = (spec.get("inputSchema") or {}).get("json")
        if not isinstance(schema, dict):
            raise _validation("The value at toolConfig.tools.%d.toolSpec.inputSchema.json is not a JSON schema object."
                              % i)
        turn.tools.append((spec["name"], schema))
    if tools is not None and not turn.tools and not (tools.get("tools") or ()):
        raise _validation("The value at toolConfig.tools is empty: name at least one tool, or leave toolConfig out.")
    choice = (tools or {}).get("toolChoice") or {}
    if "tool" in choice:
        turn.forced_tool = choice["tool"].get("name")
    config = body.get("inferenceConfig") or {}
    turn.max_tokens = check_max_tokens(config.get("maxTokens"), "inferenceConfig.maxTokens")
    extra = body.get("additionalModelRequestFields") or {}
    thinking = extra.get("thinking") or extra.get("reasoning_config")
    turn.thinking = isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")
    fmt = (body.get("outputConfig") or {}).get("textFormat")
    if fmt is not None:
        turn.output = _output_schema(fmt)
    return turn


def _result_text(result):
    """A toolResult's content as text: its text blocks, else its JSON blocks as JSON."""
    parts = []
    for block in result.get("content") or ():
        if isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif "json" in block:
            parts.append(json.dumps(block["json"], separators=(",", ":")))
    return "\n".join(parts)


def _output_schema(fmt):
    """outputConfig.textFormat's JSON schema (a JSON text in ``structure.jsonSchema.schema``)."""
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise _validation("outputConfig.textFormat.type: the only output format is \"json_schema\"")
    text = ((fmt.get("structure") or {}).get("jsonSchema") or {}).get("schema")  # typed by CONVERSE_SHAPE
    if not isinstance(text, str):
        raise _validation("outputConfig.textFormat.structure.jsonSchema.schema: a JSON schema, as a JSON text, is "
                          "required")
    return inner_json(text.encode("utf-8"), "outputConfig.textFormat.structure.jsonSchema.schema") or JSON_OBJECT


def inner_json(data, where):
    """A JSON object held in a field (as text, or base64), read as a body is: its size, depth and values bounded."""
    from .dispatch import parse_json_body
    try:
        return parse_json_body(data)
    except HTTPError as e:
        raise HTTPError(400, e.message.replace("request body", where), etype="ValidationException")


_STOP = {"stop": "end_turn", "length": "max_tokens", "tool": "tool_use", "filter": "content_filtered"}


def converse_blocks(plan):
    """The answer's content blocks, in Converse's shape (from Anthropic's, in the same order)."""
    out = []
    for block in anthropic_blocks(plan):
        if block["type"] == "thinking":
            out.append({"reasoningContent": {"reasoningText": {"text": block["thinking"],
                                                                "signature": block["signature"]}}})
        elif block["type"] == "text":
            out.append({"text": block["text"]})
        else:
            out.append({"toolUse": {"toolUseId": "tooluse_" + block["id"][8:30], "name": block["name"],
                                    "input": block["input"]}})
    return out


def _usage(plan):
    out = plan.output_tokens + plan.thinking_tokens
    return {"inputTokens": plan.prompt_tokens, "outputTokens": out, "totalTokens": plan.prompt_tokens + out}


def _latency(req):
    return {"latencyMs": max(1, int((time.monotonic() - req.t0) * 1000))}


def handle_bedrock_converse(w, req):
    """Converse and ConverseStream: dpmock's answer (or a rule's) in the Converse API's shapes."""
    check_key(req)
    turn = read_turn(req)
    check_model(req, turn.model)
    plan = Plan(turn, w.fault, req.answer)
    blocks = converse_blocks(plan)
    stop = _STOP[plan.finish]
    if not req.route.streaming(req):
        w.send_json(200, {"output": {"message": {"role": "assistant", "content": blocks}}, "stopReason": stop,
                          "usage": _usage(plan), "metrics": _latency(req)})
        return
    w.start_stream(200, EVENTSTREAM)
    w.send_sse_event({"role": "assistant"}, "messageStart")
    for i, block in enumerate(blocks):
        if "reasoningContent" in block:
            reasoning = block["reasoningContent"]["reasoningText"]
            deltas = [{"reasoningContent": {"text": p}} for p in json_fragments(reasoning["text"], 16)]
            deltas.append({"reasoningContent": {"signature": reasoning["signature"]}})
        elif "text" in block:
            deltas = [{"text": p} for p in plan.pieces]
        else:
            use = block["toolUse"]
            w.send_sse_event({"start": {"toolUse": {"toolUseId": use["toolUseId"], "name": use["name"]}},
                              "contentBlockIndex": i}, "contentBlockStart")
            deltas = [{"toolUse": {"input": f}} for f in json_fragments(json.dumps(use["input"]))]
        for delta in deltas:
            w.send_sse_event({"delta": delta, "contentBlockIndex": i}, "contentBlockDelta")
        w.send_sse_event({"contentBlockIndex": i}, "contentBlockStop")
    w.send_sse_event({"stopReason": stop}, "messageStop")
    w.send_sse_event({"usage": _usage(plan), "metrics": _latency(req)}, "metadata")
    w.end_stream()


# ----------------------------------------------------------------------------- CountTokens

def handle_bedrock_count_tokens(w, req):
    """CountTokens: ``input.invokeModel.body`` (base64 of an InvokeModel body) or ``input.converse``."""
    check_key(req)
    model = req.params["model"]
    check_model(req, model)
    given = req.json.get("input") if isinstance(req.json, dict) else None
    if not isinstance(given, dict) or len([k for k in ("invokeModel", "converse") if k in given]) != 1:
        raise _validation("input: exactly one of invokeModel and converse is required")
    if "invokeModel" in given:
        raw = given["invokeModel"].get("body") if isinstance(given["invokeModel"], dict) else None
        try:
            data = binascii.a2b_base64(raw.encode("ascii"))
        except (AttributeError, ValueError, UnicodeError, binascii.Error):
            raise _validation("input.invokeModel.body: expected the base64 of an InvokeModel JSON body")
        turn = anthropic_turn(dict(inner_json(data, "input.invokeModel.body"), model=model), need_max_tokens=False)
    else:
        turn = converse_turn(given["converse"], model)
    for name, schema in turn.tools:
        turn.add_text(name + " " + json.dumps(schema))
    w.send_json(200, {"inputTokens": count_tokens(turn.texts, turn.media)})
