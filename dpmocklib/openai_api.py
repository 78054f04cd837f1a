"""OpenAI: chat completions, completions, embeddings, moderations and images."""

import json
import re
import time

from .base import AZURE, OPENAI, b64, bounded_int, clip, scenarios
from .conversation import JSON_OBJECT, Plan, Turn, check_max_tokens, require_model, json_fragments, read_turn
from .embeddings import embedding, embedding_b64, embedding_dims
from .images import image_name, png_for
from .providers import TOKEN_PIECES, first_of, check_key, check_model, count_tokens, invalid, new_id
from .shapes import Shape, validate


NULL = type(None)
_OPENAI_PART = {"type": str, "text": str, "image_url": Shape.of(str, {"url": str, "detail": str}),
                "input_audio": dict, "file": dict}
_OPENAI_TOOL_CALL = {"id": str, "type": str, "function": {"name": str, "arguments": str}}
#: chat/completions fields typed as the SDKs type them (the real API refuses other types).
OPENAI_CHAT_SHAPE = {
    "model": str,
    "messages": [{"role": str, "name": str, "tool_call_id": str, "content": Shape.of(str, NULL, [_OPENAI_PART]),
                  "tool_calls": Shape.of(NULL, [_OPENAI_TOOL_CALL]), "refusal": (str, NULL)}],
    "tools": [{"type": str, "function": {"name": str, "description": str, "parameters": dict,
                                         "strict": (bool, NULL)}}],
    "tool_choice": Shape.of(str, {"type": str, "function": {"name": str}}),
    "stream": (bool, NULL), "stream_options": Shape.of(NULL, {"include_usage": bool}),
    "max_tokens": (int, NULL), "max_completion_tokens": (int, NULL), "n": (int, NULL),
    "temperature": (float, NULL), "top_p": (float, NULL), "presence_penalty": (float, NULL),
    "frequency_penalty": (float, NULL), "seed": (int, NULL), "user": str, "logprobs": (bool, NULL),
    "stop": Shape.of(str, NULL, [str]), "reasoning_effort": (str, NULL), "parallel_tool_calls": bool,
    "response_format": {"type": str, "json_schema": dict}, "metadata": (dict, NULL), "store": (bool, NULL),
}


def openai_turn(body):
    """Read a chat/completions body into a Turn, refusing what OpenAI refuses."""
    validate(OPENAI, body, OPENAI_CHAT_SHAPE)
    turn = Turn(require_model(body))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array of message objects.", "messages")
    calls = {}  # tool_call_id -> name
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool",
                                                              "function"):
            raise invalid("Invalid value for 'messages[%d].role': expected one of system, developer, user, "
                          "assistant, tool." % i, "messages[%d].role" % i)
        text = openai_content(m.get("content"), turn)
        if isinstance(m.get("function_call"), dict):  # the legacy functions API: results name the function
            calls[("fn", m["function_call"].get("name"))] = m["function_call"].get("arguments")
        for tc in m.get("tool_calls") or []:
            if isinstance(tc, dict):
                calls[tc.get("id")] = first_of(tc.get("function"), "name")
                calls[("args", tc.get("id"))] = first_of(tc.get("function"), "arguments")
        if m["role"] == "user":
            turn.user_text = text
            turn.user_turns += 1
        elif m["role"] in ("system", "developer"):
            turn.system = (turn.system + "\n" + text).strip("\n")
    last = messages[-1]
    if last["role"] in ("tool", "function"):
        name = calls.get(last.get("tool_call_id")) or last.get("name") or "tool"
        turn.tool_result = (name, openai_content(last.get("content"), Turn("")))
        turn.tool_args = calls.get(("args", last.get("tool_call_id"))) if last["role"] == "tool" else \
            calls.get(("fn", last.get("name")))
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid("Invalid type for 'tools': expected an array of tool objects.", "tools")
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise invalid("Missing required parameter: 'tools[%d].function.name'." % i,
                              "tools[%d].function.name" % i, "missing_required_parameter")
            turn.tools.append((fn["name"], fn.get("parameters") or {"type": "object", "properties": {}}))
    choice = body.get("tool_choice")
    if choice == "none":
        turn.tools_off = True
    elif isinstance(choice, dict):
        turn.forced_tool = first_of(choice.get("function"), "name")
    turn.thinking = (body.get("reasoning_effort") not in (None, "none", "minimal")
                     or isinstance(body.get("reasoning"), dict) or bool(body.get("thinking")))
    turn.max_tokens = check_max_tokens(body.get("max_completion_tokens"), "max_completion_tokens") or \
        check_max_tokens(body.get("max_tokens"), "max_tokens")
    turn.output = openai_output(body.get("response_format"), "response_format")
    return turn


def openai_output(fmt, name):
    """Turn.output for an OpenAI response_format (Chat) or text.format (Responses)."""
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return JSON_OBJECT
    if fmt.get("type") != "json_schema":
        raise invalid("Invalid value: '%s'. Supported values are: 'text', 'json_object' and 'json_schema'."
                      % fmt.get("type"), name + ".type", "invalid_value")
    spec = fmt.get("json_schema", fmt)  # Chat nests it under json_schema, Responses does not
    where = name if spec is fmt and name == "text.format" else name + ".json_schema"  # the field the error names
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise invalid("Missing required parameter: '%s.name'." % where, where + ".name", "missing_required_parameter")
    if schema is not None and not isinstance(schema, dict):
        raise invalid("Invalid type for '%s.schema': expected an object." % where, where + ".schema", "invalid_type")
    return schema if schema else JSON_OBJECT


def openai_content(content, turn):
    if isinstance(content, str):
        turn.add_text(content)
        return content
    texts = []
    for part in content if isinstance(content, list) else ():
        if isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
            texts.append(str(part.get("text", "")))
            turn.add_text(texts[-1])
        elif isinstance(part, dict):
            turn.media += 1
    return "\n".join(texts)


_OPENAI_FINISH = {"stop": "stop", "length": "length", "tool": "tool_calls", "filter": "content_filter"}


def openai_usage(plan):
    out = plan.output_tokens + plan.thinking_tokens
    return {"prompt_tokens": plan.prompt_tokens, "completion_tokens": out, "total_tokens": plan.prompt_tokens + out,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": plan.thinking_tokens, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def handle_openai_chat(w, req):
    check_key(req)
    body = req.json
    turn = read_turn(req)
    check_model(req, turn.model)
    plan = Plan(turn, w.fault, req.answer)
    head = {"id": new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()), "model": turn.model}
    calls = [{"id": "call_" + cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
             for cid, name, args in plan.calls]
    filters = None
    if req.route.platform == AZURE:  # Azure's content filter says what it found (nothing) in prompt and answer
        from .azure import FILTERS as filters, PROMPT_FILTERS
    if not req.route.streaming(req):
        message = {"role": "assistant", "content": plan.text if not calls else None, "refusal": None,
                   "annotations": []}
        if calls:
            message["tool_calls"] = calls
        if plan.thinking:
            message["reasoning_content"] = plan.thinking
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": _OPENAI_FINISH[plan.finish]}
        answer = dict(head, choices=[choice], usage=openai_usage(plan), service_tier="default",
                      system_fingerprint="fp_dpmock")
        if filters is not None:
            choice["content_filter_results"] = filters
            answer["prompt_filter_results"] = PROMPT_FILTERS
        w.send_json(200, answer)
        return
    head["object"] = "chat.completion.chunk"
    head["system_fingerprint"] = "fp_dpmock"
    usage = bool(first_of(body.get("stream_options"), "include_usage"))

    def chunk(delta, finish=None):
        c = dict(head, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
        if filters is not None:
            c["choices"][0]["content_filter_results"] = filters if "content" in delta and delta["content"] else {}
        if usage:
            c["usage"] = None
        return c
    w.start_stream(200, scenarios.SSE)
    if filters is not None:  # Azure's first event: the prompt's filter results, with no choice
        w.send_sse_event({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                          "prompt_filter_results": PROMPT_FILTERS})
    w.send_sse_event(chunk({"role": "assistant", "content": "" if not calls else None, "refusal": None}))
    if plan.thinking:
        for piece in re.findall(TOKEN_PIECES, plan.thinking):
            w.send_sse_event(chunk({"reasoning_content": piece}))
    for i, piece in enumerate(plan.pieces):
        # The last content chunk carries finish_reason too (the empty-delta finish chunk follows, as
        # OpenAI sends it): Disaster Party's detailed-stream parser stops at the first chunk with a
        # finish_reason and crashes (NULL callback) when that chunk has no text.
        last = i == len(plan.pieces) - 1 and not calls
        w.send_sse_event(chunk({"content": piece}, _OPENAI_FINISH[plan.finish] if last else None))
    for i, call in enumerate(calls):
        w.send_sse_event(chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                                "function": {"name": call["function"]["name"], "arguments": ""}}]}))
        for fragment in json_fragments(call["function"]["arguments"]):
            w.send_sse_event(chunk({"tool_calls": [{"index": i, "function": {"arguments": fragment}}]}))
    w.send_sse_event(chunk({}, _OPENAI_FINISH[plan.finish]))
    if usage:
        w.send_sse_event(dict(head, choices=[], usage=openai_usage(plan)))
    w.send_sse_event("[DONE]")
    w.end_stream()


def handle_openai_images(w, req):
    check_key(req)
    body = req.json
    validate(OPENAI, body, {"model": (str, NULL), "prompt": str, "n": (int, NULL), "size": (str, NULL),
                            "response_format": (str, NULL), "quality": (str, NULL), "style": (str, NULL)})
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise invalid("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    w.send_json(200, images_answer(req, body.get("model") or "dall-e-2", prompt, body.get("n", 1),
                                   body.get("response_format")))


def handle_image_edit(w, req):
    """POST /images/edits and /images/variations (multipart): the answer an image generation gives, for the
    prompt (edits) or the uploaded image (variations, which take dall-e-2 only)."""
    from .files import multipart_boundary, read_multipart
    check_key(req)
    fields, files = read_multipart(req, multipart_boundary(req, "multipart/form-data"))
    images = [f for f in files if f[5] in ("image", "image[]")]
    if not images:
        raise invalid("Missing required parameter: 'image'.", "image", "missing_required_parameter")
    model = fields.get("model") or "dall-e-2"
    if (fields.get("stream") or "").lower() == "true":
        raise invalid("dpmock does not stream image edits (partial images): leave 'stream' out", "stream",
                      "unsupported_value")
    edit = req.route.name == "images_edits"
    if edit and not fields.get("prompt"):
        raise invalid("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    if not edit and model != "dall-e-2":
        raise invalid("Invalid model %s: image variations take dall-e-2" % clip(model), "model", "invalid_value")
    if len(images) > (16 if model.startswith("gpt-image") else 1):
        raise invalid("Too many images: %s takes %s" % (model, "up to 16" if model.startswith("gpt-image") else "one"),
                      "image", "invalid_value")
    n = fields.get("n", "1")
    n = bounded_int(n, 1, 10) if isinstance(n, str) else None
    if n is None:
        raise invalid("Invalid 'n': expected an integer from 1 to 10.", "n")
    prompt = fields["prompt"] if edit else "a variation of an image (sha256 %s)" % images[0][3].hex()[:16]
    w.send_json(200, images_answer(req, model, prompt, n, fields.get("response_format")))


def images_answer(req, model, prompt, n, fmt):
    """An images answer: ``n`` PNGs whose colour comes from the prompt, as URLs dpmock serves or base64."""
    check_model(req, model)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10:
        raise invalid("Invalid 'n': expected an integer from 1 to 10.", "n")
    fmt = fmt or ("b64_json" if model.startswith("gpt-image") else "url")
    if fmt not in ("url", "b64_json"):
        raise invalid("Invalid 'response_format': expected 'url' or 'b64_json'.", "response_format")
    data = []
    for _ in range(n):
        name = image_name(prompt)
        item = {"b64_json": b64(png_for(name))} if fmt == "b64_json" else \
            {"url": "%s/_images/%s" % (req.origin(), name)}
        if not model.startswith("gpt-image"):
            item["revised_prompt"] = prompt
        data.append(item)
    answer = {"created": int(time.time()), "data": data}
    if model.startswith("gpt-image"):
        words = count_tokens([prompt])
        answer["usage"] = {"input_tokens": words, "input_tokens_details": {"text_tokens": words, "image_tokens": 0},
                           "output_tokens": 272 * n, "total_tokens": words + 272 * n}
    return answer


def embedding_texts(value, name, provider=OPENAI):
    """The texts of an embeddings input: a string, strings, or token arrays (read as their numbers)."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise invalid("'%s' must be a non-empty string, array of strings or array of token arrays." % name, name)
    texts = []
    for i, item in enumerate(value):
        if isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            item = " ".join("t%d" % t for t in item)
        if not isinstance(item, str) or not item:
            raise invalid("'%s[%d]' must be a non-empty string or array of integers." % (name, i), "%s[%d]" % (name, i))
        texts.append(item)
    if len(texts) > 2048:
        raise invalid("'%s' holds %d inputs; at most 2048 are accepted." % (name, len(texts)), name)
    return texts


def handle_openai_embeddings(w, req):
    check_key(req)
    body = req.json
    validate(OPENAI, body, {"model": str, "encoding_format": str, "dimensions": (int, NULL), "user": str})
    model = require_model(body)
    check_model(req, model)
    texts = embedding_texts(body.get("input"), "input")
    dims = body.get("dimensions")
    if dims is not None:
        if model.startswith("text-embedding-ada"):
            raise invalid("This model does not support specifying dimensions.", "dimensions")
        if not 1 <= dims <= embedding_dims(model):
            raise invalid("Invalid 'dimensions': expected an integer from 1 to %d." % embedding_dims(model),
                          "dimensions")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise invalid("Invalid value for 'encoding_format': expected 'float' or 'base64'.", "encoding_format")
    data = []
    given = (req.answer or {}).get("embedding")
    for i, text in enumerate(texts):
        vec = given or embedding(text, dims or embedding_dims(model))
        data.append({"object": "embedding", "index": i,
                     "embedding": embedding_b64(vec) if fmt == "base64" else [round(x, 9) for x in vec]})
    tokens = count_tokens(texts)
    w.send_json(200, {"object": "list", "data": data, "model": model,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def texts_turn(model, texts):
    """A Turn for routes whose input is plain texts (completions, embeddings): the last is the user's."""
    turn = Turn(model)
    for text in texts:
        turn.add_text(text)
    turn.user_text = texts[-1]
    turn.user_turns = 1
    return turn


def completion_turn(req):
    return texts_turn(require_model(req.json), embedding_texts(req.json.get("prompt"), "prompt"))


def embeddings_turn(req):
    return texts_turn(require_model(req.json), embedding_texts(req.json.get("input"), "input"))


def handle_openai_completions(w, req):
    """POST /completions, the legacy text completion: max_tokens defaults to 16, as there."""
    check_key(req)
    body = req.json
    validate(OPENAI, body, {"model": str, "max_tokens": (int, NULL), "stream": (bool, NULL), "n": (int, NULL),
                            "echo": (bool, NULL), "suffix": (str, NULL), "stream_options": (dict, NULL)})
    turn = read_turn(req)
    model = turn.model
    check_model(req, model)
    prompts = embedding_texts(body.get("prompt"), "prompt")
    turn.max_tokens = 16 if "max_tokens" not in body else check_max_tokens(body["max_tokens"], "max_tokens")
    plan = Plan(turn, w.fault, req.answer)
    finish = _OPENAI_FINISH[plan.finish]
    echo = prompts[-1] if body.get("echo") else ""
    head = {"id": new_id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": model}
    usage = {"prompt_tokens": plan.prompt_tokens, "completion_tokens": plan.output_tokens,
             "total_tokens": plan.prompt_tokens + plan.output_tokens}
    if not req.route.streaming(req):
        w.send_json(200, dict(head, choices=[{"text": echo + plan.text, "index": 0, "logprobs": None,
                                              "finish_reason": finish}], usage=usage))
        return
    w.start_stream(200, scenarios.SSE)
    pieces = ([echo] if echo else []) + plan.pieces
    for i, piece in enumerate(pieces):
        w.send_sse_event(dict(head, choices=[{"text": piece, "index": 0, "logprobs": None,
                                              "finish_reason": finish if i == len(pieces) - 1 else None}]))
    if first_of(body.get("stream_options"), "include_usage"):
        w.send_sse_event(dict(head, choices=[], usage=usage))
    w.send_sse_event("[DONE]")
    w.end_stream()


def handle_openai_moderations(w, req):
    """POST /moderations: flagged by the documented word rule (scenarios.MODERATION_WORDS)."""
    check_key(req)
    body = req.json
    validate(OPENAI, body, {"model": str})
    validate(OPENAI, body, {"input": Shape.of(str, [str], [{"type": str, "text": str, "image_url": dict}])})
    value = body.get("input")
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):  # multi-modal parts
        value = [" ".join(v.get("text", "") for v in value if v.get("type") == "text") or "image"]
    texts = embedding_texts(value, "input")
    results = []
    for text in texts:
        words = set(re.findall(r"\w+", text.lower()))
        categories = {c: bool(words & set(ws)) for c, ws in scenarios.MODERATION_WORDS.items()}
        results.append({"flagged": any(categories.values()), "categories": categories,
                        "category_scores": {c: 0.9871 if hit else 0.0001 for c, hit in categories.items()},
                        "category_applied_input_types": {c: ["text"] for c in categories}})
    w.send_json(200, {"id": new_id("modr-"), "model": body.get("model") or "omni-moderation-latest",
                      "results": results})


def openai_reader(req):
    """The chat route's reader: its body's conversation, as a Turn."""
    return openai_turn(req.json)
