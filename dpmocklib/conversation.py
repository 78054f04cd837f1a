"""Conversations: what was asked (a Turn), and dpmock's deterministic answer (a Plan)."""

import json
import os
import re

from .base import COMPACT_JSON
from .providers import TOKEN_PIECES, check_key, count_tokens, invalid


class Turn:
    """A request reduced to what dpmock's answer depends on, whatever the provider."""

    def __init__(self, model):
        self.model = model
        self.texts = []  #: every text in the prompt, for token counts
        self.media = 0  #: image/document/file parts in the prompt
        self.user_text = ""  #: the last user message's text
        self.tool_result = None  #: (tool name, result text) when the last message answers a tool call
        self.tool_args = None  #: the arguments (JSON text or an object) of the call that result answers
        self.must_call = False  #: dpmock's own answer calls a tool even after a tool's result (Responses' required)
        self.tools = []  #: (name, JSON schema) the model may call
        self.typed_tools = []  #: names of tools with a provider-defined schema (Anthropic's bash, ...)
        self.forced_tool = None  #: a tool the request insists on
        self.tools_off = False  #: tool_choice none / mode NONE
        self.thinking = False
        self.max_tokens = None
        self.output = None  #: structured output: a JSON schema, JSON_OBJECT (any object), or ("enum", schema)
        self.system = ""  #: the system prompt / instructions, as text
        self.user_turns = 0  #: user messages that are not only tool results (rules' ``turn``)

    def add_text(self, text):
        if isinstance(text, str) and text:
            self.texts.append(text)


JSON_OBJECT = {"type": "object"}  #: Turn.output for "any JSON object" (json_object, a bare JSON MIME type)


class Plan:
    """dpmock's answer to a Turn: optional thinking, then text pieces or tool calls.

    ``answer`` is a matching rule's (rendered) answer: its text, tool calls, thinking, JSON,
    finish and usage replace dpmock's own; what it leaves out follows dpmock's rules.
    """

    def __init__(self, turn, fault, answer=None):
        answer = answer or {}
        self.thinking = answer.get("thinking") or (thinking_text(turn) if turn.thinking else None)
        self.calls = []  #: (call id suffix, tool name, arguments dict)
        self.pieces = []
        self.finish = "stop"  #: stop | length | tool | filter
        self.structured = None  #: the JSON value of a structured-output answer
        if answer.get("tool_calls"):
            self.calls = [(os.urandom(12).hex(), c["name"], c.get("arguments") or {}) for c in answer["tool_calls"]]
            self.finish = "tool"
        elif "json" in answer or "text" in answer:
            self.structured = answer.get("json")
            text = answer["text"] if "json" not in answer else (
                answer["json"] if isinstance(answer["json"], str) else COMPACT_JSON(answer["json"]))
            self.pieces = json_fragments(text) if "json" in answer else re.findall(TOKEN_PIECES, text) or [text]
            if turn.max_tokens is not None and len(self.pieces) > turn.max_tokens:
                self.pieces = self.pieces[:turn.max_tokens]
                self.finish = "length"
        elif (turn.tool_result is None or turn.must_call) and turn.tools and not turn.tools_off:
            name = turn.forced_tool or turn.tools[0][0]
            schema = dict(turn.tools).get(name, {})
            from .schema import schema_instance  # the schema engine loads on the first request that needs it
            self.calls.append((os.urandom(12).hex(), name, schema_instance(schema)))
            self.finish = "tool"
        else:
            if turn.output is not None:  # the JSON arrives as text, in 8-character pieces
                self.structured = structured_answer(turn)
                text = self.structured if isinstance(self.structured, str) else COMPACT_JSON(self.structured)
                self.pieces = json_fragments(text)
            else:
                self.pieces = fault[0].pieces(turn, fault[1]) or re.findall(TOKEN_PIECES, answer_text(turn))
            if turn.max_tokens is not None and len(self.pieces) > turn.max_tokens:
                self.pieces = self.pieces[:turn.max_tokens]
                self.finish = "length"
        self.text = "".join(self.pieces)
        self.prompt_tokens = count_tokens(turn.texts, turn.media)
        self.thinking_tokens = count_tokens([self.thinking]) if self.thinking else 0
        self.output_tokens = (len(self.pieces) if not self.calls else
                              sum(count_tokens([json.dumps(args)]) for _, _, args in self.calls))
        if "finish" in answer:
            self.finish = RULE_FINISH[answer["finish"]]
        usage = answer.get("usage") or {}
        self.prompt_tokens = usage.get("input_tokens", self.prompt_tokens)
        self.output_tokens = usage.get("output_tokens", self.output_tokens)


def structured_answer(turn):
    """The value of a structured-output answer: an instance of the schema whose first string
    carries the answer text; {"response": text} for any JSON object; an enum's first value."""
    if turn.output is JSON_OBJECT:
        return {"response": answer_text(turn)}
    from .schema import schema_instance  # the schema engine loads on the first request that needs it
    if isinstance(turn.output, tuple):  # ("enum", schema): Gemini's text/x.enum answers a bare value
        return str(schema_instance(turn.output[1], answer_text(turn)))
    return schema_instance(turn.output, answer_text(turn))


def answer_text(turn):
    """The documented text rule (README): what dpmock says back."""
    if turn.tool_result is not None:
        name, result = turn.tool_result
        return "The %s tool returned: %s" % (name, result)
    if turn.user_text.strip():
        return "dpmock reply to: " + " ".join(turn.user_text.split())
    return "dpmock reply to a message with no text."


def thinking_text(turn):
    return "Thinking about: " + (" ".join(turn.user_text.split()) or "a message with no text")


def require_model(body):
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("you must provide a model parameter", "model")
    return model


def check_max_tokens(value, name):
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise invalid("Invalid '%s': expected an integer of at least 1, got %s." % (name, json.dumps(value)), name)
    return value


def json_fragments(text, size=8):
    """A JSON text cut into the small fragments a streamed tool call arrives in."""
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]
RULE_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool", "content_filter": "filter"}


def read_turn(req):
    """The conversation of a route that has one (read once; handlers reuse it)."""
    if req.turn is None and req.route.reader is not None and req.json is not None:
        check_key(req)  # a missing or bad key is refused before the body's fields are judged
        req.turn = req.route.reader(req)
    return req.turn
