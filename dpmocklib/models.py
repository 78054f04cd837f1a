"""Model lists: /v1/models and its Gemini and Anthropic forms."""

from .base import ANTHROPIC, OPENAI, bounded_int, clip, scenarios
from .providers import check_key, check_model, invalid
from .routing import anthropic_page, int_arg, page_body


def handle_models_list(w, req):
    check_key(req)
    p = req.provider
    if p == OPENAI:
        w.send_json(200, {"object": "list", "data": [openai_model(m) for m in scenarios.OPENAI_MODELS]})
    elif p == ANTHROPIC:
        models = [anthropic_model(m) for m in scenarios.ANTHROPIC_MODELS]
        page, more = anthropic_page(req, models, lambda m: m["id"], "model")
        w.send_json(200, dict(page_body(page), has_more=more))
    else:
        models = [gemini_model(m) for m in scenarios.GEMINI_MODELS]
        size = int_arg(req, "pageSize", 50, 1, 1000)
        token = req.arg("pageToken") or "0"
        start = bounded_int(token, 0, len(models))
        if start is None:
            raise invalid("Invalid page token %r." % clip(token), "pageToken")
        answer = {"models": models[start:start + size]}
        if start + size < len(models):
            answer["nextPageToken"] = str(start + size)
        w.send_json(200, answer)


def handle_model_get(w, req):
    check_key(req)
    model = req.params["model"]
    check_model(req, model, "get")
    p = req.provider
    if p == OPENAI:
        known = {m[0]: m for m in scenarios.OPENAI_MODELS}
        w.send_json(200, openai_model(known.get(model, (model, 1700000000, "system"))))
    elif p == ANTHROPIC:
        known = {m[0]: m for m in scenarios.ANTHROPIC_MODELS}
        w.send_json(200, anthropic_model(known.get(model, (model, model, "2025-01-01T00:00:00Z"))))
    else:
        known = {m[0]: m for m in scenarios.GEMINI_MODELS}
        w.send_json(200, gemini_model(known.get(model, (model, model, 1048576, 65536, False))))


def openai_model(m):
    return {"id": m[0], "object": "model", "created": m[1], "owned_by": m[2]}


def anthropic_model(m):
    return {"type": "model", "id": m[0], "display_name": m[1], "created_at": m[2]}


def gemini_model(m):
    name, display, input_limit, output_limit, thinking = m
    methods = ["predict"] if name.startswith("imagen") else \
        ["embedContent", "batchEmbedContents"] if "embedding" in name else \
        ["generateContent", "countTokens", "createCachedContent", "batchGenerateContent"]
    model = {"name": "models/" + name, "version": "001", "displayName": display,
             "description": "%s (served by dpmock)" % display, "inputTokenLimit": input_limit,
             "outputTokenLimit": output_limit, "supportedGenerationMethods": methods}
    if methods[0] == "generateContent":
        model.update(temperature=1, topP=0.95, topK=64, maxTemperature=2, thinking=thinking)
    return model
