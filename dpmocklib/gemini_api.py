"""Gemini: generateContent, streamGenerateContent, embeddings, token counting and predict."""

import json

from .base import GEMINI, VERTEX, b64
from .conversation import JSON_OBJECT, Plan, Turn, check_max_tokens, read_turn
from .embeddings import embedding, embedding_dims
from .images import image_name, png_for
from .providers import first_of, check_key, check_model, count_tokens, invalid, new_id
from .shapes import validate


_GEMINI_CALL = {"name": str, "args": (dict, type(None)), "id": str}
_GEMINI_PART = {"text": str, "thought": bool, "thoughtSignature": str, "thought_signature": str,
                "inlineData": {"mimeType": str, "data": str}, "inline_data": {"mime_type": str, "data": str},
                "fileData": {"mimeType": str, "fileUri": str}, "file_data": {"mime_type": str, "file_uri": str},
                "functionCall": _GEMINI_CALL, "function_call": _GEMINI_CALL,
                "functionResponse": {"name": str, "response": dict, "id": str},
                "function_response": {"name": str, "response": dict, "id": str}}
_GEMINI_CONTENT = {"role": str, "parts": [_GEMINI_PART]}
_GEMINI_DECLARATION = {"name": str, "description": str, "parameters": dict, "parametersJsonSchema": dict,
                       "parameters_json_schema": dict}
_GEMINI_GEN = {"maxOutputTokens": int, "max_output_tokens": int, "temperature": float, "topP": float,
               "top_p": float, "topK": float, "top_k": float, "candidateCount": int, "stopSequences": [str],
               "responseMimeType": str, "response_mime_type": str, "responseSchema": dict, "response_schema": dict,
               "responseJsonSchema": dict, "response_json_schema": dict,
               "thinkingConfig": {"includeThoughts": bool, "thinkingBudget": int},
               "thinking_config": {"include_thoughts": bool, "thinking_budget": int}}
#: generateContent fields typed as the SDKs type them (camelCase and snake_case alike).
GEMINI_GENERATE_SHAPE = {
    "contents": [_GEMINI_CONTENT], "systemInstruction": _GEMINI_CONTENT, "system_instruction": _GEMINI_CONTENT,
    "tools": [{"functionDeclarations": [_GEMINI_DECLARATION], "function_declarations": [_GEMINI_DECLARATION]}],
    "toolConfig": {"functionCallingConfig": {"mode": str, "allowedFunctionNames": [str]}},
    "tool_config": {"function_calling_config": {"mode": str, "allowed_function_names": [str]}},
    "generationConfig": _GEMINI_GEN, "generation_config": _GEMINI_GEN,
}


def gemini_turn(body, model):
    """Read a generateContent body (camelCase or snake_case) into a Turn."""
    validate(GEMINI, body, GEMINI_GENERATE_SHAPE)
    turn = Turn(model)
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise invalid("* GenerateContentRequest.contents: contents is not specified")
    turn.system = _gemini_parts(first_of(first_of(body, "systemInstruction", "system_instruction"), "parts"), turn)
    for i, c in enumerate(contents):
        if not isinstance(c, dict) or not isinstance(c.get("parts"), list):
            raise invalid("* GenerateContentRequest.contents[%d].parts: contents.parts must not be empty" % i)
        text = _gemini_parts(c["parts"], turn)
        if c.get("role", "user") == "user" and text:
            turn.user_text = text
        if c.get("role", "user") == "user" and any(
                isinstance(p, dict) and first_of(p, "functionResponse", "function_response") is None
                for p in c["parts"]):
            turn.user_turns += 1
    results = [first_of(p, "functionResponse", "function_response") for p in contents[-1]["parts"]]
    results = [r for r in results if isinstance(r, dict)]
    if results and contents[-1].get("role", "user") == "user" and any(
            isinstance(p, dict) and isinstance(p.get("text"), str) and p["text"].strip()
            for p in contents[-1]["parts"]):
        results = []  # the user wrote beside the results: their turn, as a user message after them is elsewhere
    if results:
        response = results[-1].get("response")
        content = first_of(response, "content", "result", "output")
        if not isinstance(content, str):  # an object: its result field (google-genai's {"result": ...}), as JSON
            content = json.dumps(response if content is None else content, separators=(",", ":"))
        turn.tool_result = (results[-1].get("name") or "tool", content)
        calls = [first_of(p, "functionCall", "function_call") for c in contents[:-1] if c.get("role") == "model"
                 for p in c["parts"]]  # the arguments of the last call of that name
        turn.tool_args = next((call.get("args") for call in reversed(calls) if isinstance(call, dict)
                               and call.get("name") == turn.tool_result[0]), None)
    for t in body.get("tools") or []:
        decls = first_of(t, "functionDeclarations", "function_declarations")
        for i, d in enumerate(decls if isinstance(decls, list) else ()):
            if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not d["name"]:
                raise invalid("* GenerateContentRequest.tools[0].function_declarations[%d].name: Name cannot be "
                              "empty." % i)
            schema = first_of(d, "parameters", "parametersJsonSchema", "parameters_json_schema") or {}
            turn.tools.append((d["name"], schema))
    config = first_of(first_of(body, "toolConfig", "tool_config"), "functionCallingConfig", "function_calling_config")
    if isinstance(config, dict):
        turn.tools_off = str(config.get("mode", "")).upper() == "NONE"
        allowed = first_of(config, "allowedFunctionNames", "allowed_function_names")
        if isinstance(allowed, list) and allowed:
            turn.forced_tool = allowed[0]
    gen = first_of(body, "generationConfig", "generation_config") or {}
    turn.max_tokens = check_max_tokens(first_of(gen, "maxOutputTokens", "max_output_tokens"), "maxOutputTokens")
    thinking = first_of(gen, "thinkingConfig", "thinking_config")
    turn.thinking = bool(first_of(thinking, "includeThoughts", "include_thoughts"))
    mime = first_of(gen, "responseMimeType", "response_mime_type")
    schema = first_of(gen, "responseJsonSchema", "response_json_schema", "responseSchema", "response_schema")
    if mime == "application/json":
        turn.output = schema if isinstance(schema, dict) and schema else JSON_OBJECT
    elif mime == "text/x.enum" and isinstance(schema, dict):
        turn.output = ("enum", schema)
    elif schema is not None and mime not in (None, "text/plain"):
        raise invalid("* GenerateContentRequest.generation_config.response_mime_type: allowed mimetypes are "
                      "`text/plain`, `application/json`, `application/xml`, `application/yaml` and `text/x.enum`.")
    elif schema is not None:
        raise invalid("* GenerateContentRequest.generation_config.response_schema: response_mime_type must be "
                      "application/json or text/x.enum when a response schema is set.")
    return turn


def _gemini_parts(parts, turn):
    texts = []
    for p in parts if isinstance(parts, list) else ():
        if not isinstance(p, dict):
            continue
        if isinstance(p.get("text"), str) and not p.get("thought"):
            texts.append(p["text"])
            turn.add_text(p["text"])
        elif first_of(p, "inlineData", "inline_data", "fileData", "file_data") is not None:
            turn.media += 1
        else:
            call = first_of(p, "functionCall", "function_call", "functionResponse", "function_response")
            if call is not None:
                turn.add_text(json.dumps(call))
    return "\n".join(texts)


_GEMINI_FINISH = {"stop": "STOP", "length": "MAX_TOKENS", "tool": "STOP", "filter": "SAFETY"}


def gemini_usage(plan, output_tokens):
    usage = {"promptTokenCount": plan.prompt_tokens, "candidatesTokenCount": output_tokens,
             "totalTokenCount": plan.prompt_tokens + output_tokens + plan.thinking_tokens,
             "promptTokensDetails": [{"modality": "TEXT", "tokenCount": plan.prompt_tokens}]}
    if plan.thinking_tokens:
        usage["thoughtsTokenCount"] = plan.thinking_tokens
    return usage


def gemini_chunks(plan):
    """The answer as a list of (parts, finished?, cumulative output tokens): one item per streamed chunk."""
    out = []
    if plan.thinking:
        out.append(([{"text": plan.thinking, "thought": True}], False, 0))
    if plan.calls:
        out.append(([{"functionCall": {"name": name, "args": args}} for _, name, args in plan.calls], True,
                    plan.output_tokens))
        return out
    for i, piece in enumerate(plan.pieces or [""]):
        out.append(([{"text": piece}], i == max(len(plan.pieces), 1) - 1, i + 1 if plan.pieces else 0))
    return out


def handle_gemini_generate(w, req):
    check_key(req)
    model = req.params["model"]
    stream = req.route.streaming(req)
    check_model(req, model, "streamGenerateContent" if stream else "generateContent")
    plan = Plan(read_turn(req), w.fault, req.answer)
    head = {"modelVersion": model, "responseId": new_id("", 11)}
    finish = _GEMINI_FINISH[plan.finish]

    def response(parts, final, tokens):
        candidate = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if final:
            candidate["finishReason"] = finish
        return dict({"candidates": [candidate], "usageMetadata": gemini_usage(plan, tokens)}, **head)
    if not stream:
        parts = [p for chunk_parts, _, _ in gemini_chunks(plan) for p in chunk_parts]
        text = [p for p in parts if "text" in p and not p.get("thought")]
        if len(text) > 1:  # one text part for the whole answer, as the real API sends it
            parts = [p for p in parts if p not in text] + [{"text": "".join(p["text"] for p in text)}]
        w.send_json(200, response(parts, True, plan.output_tokens))
        return
    chunks = [response(*c) for c in gemini_chunks(plan)]
    if req.arg("alt") == "sse":
        w.start_stream(200, "text/event-stream")
        for c in chunks:
            w.send_sse_event(c, sep="\r\n\r\n")
    else:  # alt=json: one JSON array, written element by element
        w.start_stream(200, "application/json; charset=UTF-8")
        for i, c in enumerate(chunks):
            w.stream_item(json.dumps(c, indent=2), index=i)
        w.send_chunk(b"]")
    w.end_stream()


def handle_gemini_count_tokens(w, req):
    check_key(req)
    model = req.params["model"]
    check_model(req, model, "countTokens")
    body = req.json
    inner = first_of(body, "generateContentRequest", "generate_content_request")
    # The C library sends a top-level system_instruction (the real API has none here): counted too.
    turn = gemini_turn(inner if isinstance(inner, dict) else body, model)
    total = count_tokens(turn.texts, turn.media)
    w.send_json(200, {"totalTokens": total, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": total}]})


def handle_gemini_predict(w, req):
    check_key(req)
    model = req.params["model"]
    check_model(req, model, "predict")
    instances = req.json.get("instances")
    params = req.json.get("parameters") or {}
    if req.route.platform == VERTEX and not model.startswith("imagen") and isinstance(instances, list) and \
            instances and all(isinstance(i, dict) and "content" in i for i in instances):
        return _predict_embeddings(w, req, model, instances, params)  # Vertex AI's text embedding models
    if not isinstance(instances, list) or not instances or not all(
            isinstance(i, dict) and isinstance(i.get("prompt"), str) and i["prompt"] for i in instances):
        raise invalid("instances: every instance needs a non-empty prompt (or, for an embedding model, content)")
    n = first_of(params, "sampleCount", "sample_count", "numberOfImages")
    n = 1 if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 8:
        raise invalid("parameters.sampleCount: expected an integer from 1 to 8")
    predictions = [{"mimeType": "image/png", "bytesBase64Encoded": b64(png_for(image_name(inst["prompt"])))}
                   for inst in instances for _ in range(n)]
    w.send_json(200, {"predictions": predictions})


MAX_EMBED_INSTANCES = 250  #: Vertex AI's limit of texts in one embedding :predict
MAX_BATCH_EMBED = 100  #: the Gemini API's limit of requests in one batchEmbedContents


def _predict_embeddings(w, req, model, instances, params):
    """Vertex AI's :predict for text embedding models: {"instances": [{"content": ...}]} -> predictions."""
    if not isinstance(params, dict):
        raise invalid("parameters: expected an object")
    if len(instances) > MAX_EMBED_INSTANCES:
        raise invalid("instances: at most %d instances in one request, not %d" % (MAX_EMBED_INSTANCES, len(instances)))
    dims = first_of(params, "outputDimensionality", "output_dimensionality")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or
                             not 1 <= dims <= embedding_dims(model)):
        raise invalid("parameters.outputDimensionality: expected an integer from 1 to %d" % embedding_dims(model))
    predictions, chars = [], 0
    for i, inst in enumerate(instances):
        text = inst.get("content")
        if not isinstance(text, str) or not text:
            raise invalid("instances[%d].content: expected a non-empty string" % i)
        chars += len(text)
        predictions.append({"embeddings": {
            "values": [round(x, 9) for x in embedding(text, dims or embedding_dims(model))],
            "statistics": {"truncated": False, "token_count": count_tokens([text])}}})
    w.send_json(200, {"predictions": predictions, "metadata": {"billableCharacterCount": chars}})


def _gemini_embed_one(req, body, model, where):
    validate(GEMINI, body, {"content": _GEMINI_CONTENT, "taskType": str, "task_type": str, "title": str,
                            "outputDimensionality": int, "output_dimensionality": int, "model": str})
    content = body.get("content")
    if not isinstance(content, dict) or not content.get("parts"):
        raise invalid("* %scontent: content is not specified" % where)
    text = _gemini_parts(content["parts"], Turn(model))
    dims = first_of(body, "outputDimensionality", "output_dimensionality")
    if dims is not None and not 1 <= dims <= embedding_dims(model):
        raise invalid("* %soutput_dimensionality: expected an integer from 1 to %d" % (where, embedding_dims(model)))
    given = (req.answer or {}).get("embedding")
    return {"values": given or [round(x, 9) for x in embedding(text, dims or embedding_dims(model))]}


def handle_gemini_embed(w, req):
    check_key(req)
    model = req.params["model"]
    check_model(req, model, "embedContent")
    w.send_json(200, {"embedding": _gemini_embed_one(req, req.json, model, "EmbedContentRequest.")})


def gemini_embed_turn(req):
    content = req.json.get("content") or (req.json.get("requests") or [{}])[-1].get("content")
    turn = Turn(req.params["model"])
    turn.user_text = _gemini_parts(first_of(content, "parts"), turn)
    return turn


def handle_gemini_batch_embed(w, req):
    """:batchEmbedContents, what google-genai's embed_content sends."""
    check_key(req)
    model = req.params["model"]
    check_model(req, model, "batchEmbedContents")
    requests = req.json.get("requests")
    if not isinstance(requests, list) or not requests:
        raise invalid("* BatchEmbedContentsRequest.requests: requests is not specified")
    if len(requests) > MAX_BATCH_EMBED:
        raise invalid("* BatchEmbedContentsRequest.requests: at most %d requests are allowed per batch, not %d"
                      % (MAX_BATCH_EMBED, len(requests)))
    out = []
    for i, r in enumerate(requests):
        if not isinstance(r, dict):
            raise invalid("* BatchEmbedContentsRequest.requests[%d]: expected an object" % i)
        named = r.get("model")
        if isinstance(named, str) and named.split("/")[-1] != model:
            raise invalid("* BatchEmbedContentsRequest.requests[%d].model: it must be models/%s, the model of the "
                          "request, not %s" % (i, model, named))
        out.append(_gemini_embed_one(req, r, model, "BatchEmbedContentsRequest.requests[%d]." % i))
    w.send_json(200, {"embeddings": out})


def gemini_reader(req):
    """The generate and stream routes' reader: the body's conversation for the model in the path."""
    return gemini_turn(req.json, req.params["model"])
