"""Route table: one row per route (provider, body, stream), bound to the one function that answers it."""

from .anthropic_api import anthropic_reader, handle_anthropic_count_tokens, handle_anthropic_messages
from .base import ANTHROPIC, DPMOCK, GEMINI, OPENAI, SHARED
from .control import (handle_control_requests, handle_control_requests_clear, handle_control_reset,
    handle_control_restart, handle_control_rule_delete, handle_control_rules_add, handle_control_rules_clear,
    handle_control_rules_list, handle_control_schedules, handle_control_shutdown, handle_control_status)
from .faults import check_catalogue
from .files import (handle_file_delete, handle_file_get, handle_files_list, handle_gemini_upload,
    handle_gemini_upload_raw, handle_openai_file_upload)
from .gemini_api import (gemini_embed_turn, gemini_turn, handle_gemini_batch_embed, handle_gemini_count_tokens,
    handle_gemini_embed, handle_gemini_generate, handle_gemini_predict)
from .images import handle_image_png
from .models import handle_model_get, handle_models_list
from .openai_api import (completion_turn, embeddings_turn, handle_openai_chat, handle_openai_completions,
    handle_openai_embeddings, handle_openai_images, handle_openai_moderations, openai_turn)
from .responses_api import (handle_openai_responses, handle_responses_cancel, handle_responses_delete,
    handle_responses_get, handle_responses_input_items, handle_responses_input_tokens, responses_reader)
from .routing import BODY_JSON, BODY_STREAM, Route, Router, STREAM_ALWAYS, STREAM_FLAG


_GEMINI_MODEL = "/models/{model}"
_VERTEX_MODEL = "/projects/{project}/locations/{location}/publishers/{publisher}/models/{model}"
_EXPRESS_MODEL = "/publishers/{publisher}/models/{model}"

def _gemini_reader(req):
    return gemini_turn(req.json, req.params["model"])


ROUTES = (
    Route("POST", "/chat/completions", "chat", handle_openai_chat, OPENAI, BODY_JSON, STREAM_FLAG,
          lambda req: openai_turn(req.json)),
    Route("POST", "/images/generations", "images", handle_openai_images, OPENAI, BODY_JSON),
    Route("POST", "/embeddings", "embeddings", handle_openai_embeddings, OPENAI, BODY_JSON, reader=embeddings_turn),
    Route("POST", "/completions", "completions", handle_openai_completions, OPENAI, BODY_JSON, STREAM_FLAG,
          completion_turn),
    Route("POST", "/moderations", "moderations", handle_openai_moderations, OPENAI, BODY_JSON),
    Route("POST", "/responses", "responses", handle_openai_responses, OPENAI, BODY_JSON, STREAM_FLAG,
          responses_reader),
    Route("POST", "/responses/input_tokens", "responses_input_tokens", handle_responses_input_tokens, OPENAI,
          BODY_JSON),
    Route("GET", "/responses/{response_id}", "responses_get", handle_responses_get, OPENAI),
    Route("DELETE", "/responses/{response_id}", "responses_delete", handle_responses_delete, OPENAI),
    Route("POST", "/responses/{response_id}/cancel", "responses_cancel", handle_responses_cancel, OPENAI),
    Route("GET", "/responses/{response_id}/input_items", "responses_input_items", handle_responses_input_items,
          OPENAI),
    Route("POST", "/files", "files", handle_openai_file_upload, OPENAI, BODY_STREAM),
    Route("POST", "/messages", "messages", handle_anthropic_messages, ANTHROPIC, BODY_JSON, STREAM_FLAG,
          anthropic_reader),
    Route("POST", "/messages/count_tokens", "messages_count_tokens", handle_anthropic_count_tokens, ANTHROPIC,
          BODY_JSON),
    Route("POST", _GEMINI_MODEL + ":generateContent", "gemini_generate", handle_gemini_generate, GEMINI, BODY_JSON,
          reader=_gemini_reader),
    Route("POST", _EXPRESS_MODEL + ":generateContent", "gemini_generate", handle_gemini_generate, GEMINI, BODY_JSON,
          reader=_gemini_reader),
    Route("POST", _GEMINI_MODEL + ":streamGenerateContent", "gemini_stream", handle_gemini_generate, GEMINI,
          BODY_JSON, STREAM_ALWAYS, _gemini_reader),
    Route("POST", _EXPRESS_MODEL + ":streamGenerateContent", "gemini_stream", handle_gemini_generate, GEMINI,
          BODY_JSON, STREAM_ALWAYS, _gemini_reader),
    Route("POST", _GEMINI_MODEL + ":countTokens", "gemini_count_tokens", handle_gemini_count_tokens, GEMINI,
          BODY_JSON),
    Route("POST", _GEMINI_MODEL + ":embedContent", "gemini_embed", handle_gemini_embed, GEMINI, BODY_JSON,
          reader=gemini_embed_turn),
    Route("POST", _GEMINI_MODEL + ":batchEmbedContents", "gemini_batch_embed", handle_gemini_batch_embed, GEMINI,
          BODY_JSON, reader=gemini_embed_turn),
    Route("POST", _GEMINI_MODEL + ":predict", "gemini_predict", handle_gemini_predict, GEMINI, BODY_JSON),
    Route("POST", _VERTEX_MODEL + ":predict", "gemini_predict", handle_gemini_predict, GEMINI, BODY_JSON),
    Route("POST", _EXPRESS_MODEL + ":predict", "gemini_predict", handle_gemini_predict, GEMINI, BODY_JSON),
    Route("POST", "/files:upload", "gemini_upload", handle_gemini_upload_raw, GEMINI, BODY_STREAM),
    Route("POST", "/upload/files", "gemini_upload_media", handle_gemini_upload, GEMINI, BODY_STREAM),
    Route("GET", "/models", "models", handle_models_list, SHARED),
    Route("GET", "/models/{model}", "models_get", handle_model_get, SHARED),
    Route("GET", "/files", "files_list", handle_files_list, SHARED),
    Route("GET", "/files/{file_id}", "files_get", handle_file_get, SHARED),
    Route("DELETE", "/files/{file_id}", "files_delete", handle_file_delete, SHARED),
    Route("GET", "/_images/{image}", "image_png", handle_image_png, DPMOCK),
    Route("GET", "/_control/status", "control_status", handle_control_status, DPMOCK),
    Route("GET", "/_control/requests", "control_requests", handle_control_requests, DPMOCK),
    Route("DELETE", "/_control/requests", "control_requests_clear", handle_control_requests_clear, DPMOCK),
    Route("GET", "/_control/schedules", "control_schedules", handle_control_schedules, DPMOCK),
    Route("POST", "/_control/reset", "control_reset", handle_control_reset, DPMOCK),
    Route("POST", "/_control/rules", "control_rules_add", handle_control_rules_add, DPMOCK, BODY_STREAM),
    Route("GET", "/_control/rules", "control_rules", handle_control_rules_list, DPMOCK),
    Route("DELETE", "/_control/rules", "control_rules_clear", handle_control_rules_clear, DPMOCK),
    Route("DELETE", "/_control/rules/{rule_id}", "control_rule_delete", handle_control_rule_delete, DPMOCK),
    Route("POST", "/_control/shutdown", "control_shutdown", handle_control_shutdown, DPMOCK),
    Route("POST", "/_control/restart", "control_restart", handle_control_restart, DPMOCK),
)

ROUTER = Router(ROUTES)

check_catalogue(ROUTES)  # importing dpmock with a catalogue it cannot carry out fails at once
