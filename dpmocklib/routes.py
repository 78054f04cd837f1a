"""Route table: one row per route (provider, body, stream), bound to the one function that answers it.

A row names its handler (and reader) as ``"module.function"``: the file that holds it, imported when the
route is first asked for."""

from .base import ANTHROPIC, AZURE, BEDROCK, DPMOCK, GEMINI, GEMINI_OPENAI, OPENAI, SHARED, VERTEX
from .faults import check_catalogue
from .routing import BODY_JSON, BODY_STREAM, Route, Router, STREAM_ALWAYS, STREAM_FLAG, check_modules


_GEMINI_MODEL = "/models/{model}"
_VERTEX_MODEL = "/projects/{project}/locations/{location}/publishers/{publisher}/models/{model}"
_EXPRESS_MODEL = "/publishers/{publisher}/models/{model}"
_AZURE = "/openai/deployments/{deployment}"
_VERTEX_GEMINI = "/projects/{project}/locations/{location}/publishers/google/models/{model}"
_VERTEX_CLAUDE = "/projects/{project}/locations/{location}/publishers/anthropic/models/"
_BEDROCK = "/model/{model*}"  #: Bedrock's model ids hold a ':' (anthropic.claude-sonnet-4-5-20250929-v1:0)

ROUTES = (
    Route("POST", "/chat/completions", "chat", "openai_api.handle_openai_chat", OPENAI, BODY_JSON, STREAM_FLAG,
          "openai_api.openai_reader"),
    Route("POST", "/images/generations", "images", "openai_api.handle_openai_images", OPENAI, BODY_JSON),
    Route("POST", "/embeddings", "embeddings", "openai_api.handle_openai_embeddings", OPENAI, BODY_JSON,
          reader="openai_api.embeddings_turn"),
    Route("POST", "/completions", "completions", "openai_api.handle_openai_completions", OPENAI, BODY_JSON,
          STREAM_FLAG, "openai_api.completion_turn"),
    Route("POST", "/moderations", "moderations", "openai_api.handle_openai_moderations", OPENAI, BODY_JSON),
    Route("POST", "/responses", "responses", "responses_api.handle_openai_responses", OPENAI, BODY_JSON, STREAM_FLAG,
          "responses_api.responses_reader"),
    Route("POST", "/responses/input_tokens", "responses_input_tokens", "responses_api.handle_responses_input_tokens",
          OPENAI, BODY_JSON),
    Route("GET", "/responses/{response_id}", "responses_get", "responses_api.handle_responses_get", OPENAI),
    Route("DELETE", "/responses/{response_id}", "responses_delete", "responses_api.handle_responses_delete", OPENAI),
    Route("POST", "/responses/{response_id}/cancel", "responses_cancel", "responses_api.handle_responses_cancel",
          OPENAI),
    Route("GET", "/responses/{response_id}/input_items", "responses_input_items",
          "responses_api.handle_responses_input_items", OPENAI),
    Route("POST", "/files", "files", "files.handle_openai_file_upload", OPENAI, BODY_STREAM),
    Route("GET", "/files/{file_id}/content", "files_content", "files.handle_file_content", OPENAI),
    Route("POST", "/batches", "batches_create", "batches.handle_batch_create", OPENAI, BODY_JSON),
    Route("GET", "/batches", "batches_list", "batches.handle_batch_list", OPENAI),
    Route("GET", "/batches/{batch_id}", "batches_get", "batches.handle_batch_get", OPENAI),
    Route("POST", "/batches/{batch_id}/cancel", "batches_cancel", "batches.handle_batch_cancel", OPENAI),
    Route("POST", "/messages", "messages", "anthropic_api.handle_anthropic_messages", ANTHROPIC, BODY_JSON,
          STREAM_FLAG, "anthropic_api.anthropic_reader"),
    Route("POST", "/messages/count_tokens", "messages_count_tokens", "anthropic_api.handle_anthropic_count_tokens",
          ANTHROPIC, BODY_JSON),
    Route("POST", _GEMINI_MODEL + ":generateContent", "gemini_generate", "gemini_api.handle_gemini_generate", GEMINI,
          BODY_JSON, reader="gemini_api.gemini_reader"),
    Route("POST", _EXPRESS_MODEL + ":generateContent", "gemini_generate", "gemini_api.handle_gemini_generate", GEMINI,
          BODY_JSON, reader="gemini_api.gemini_reader"),
    Route("POST", _GEMINI_MODEL + ":streamGenerateContent", "gemini_stream", "gemini_api.handle_gemini_generate",
          GEMINI, BODY_JSON, STREAM_ALWAYS, "gemini_api.gemini_reader"),
    Route("POST", _EXPRESS_MODEL + ":streamGenerateContent", "gemini_stream", "gemini_api.handle_gemini_generate",
          GEMINI, BODY_JSON, STREAM_ALWAYS, "gemini_api.gemini_reader"),
    Route("POST", _GEMINI_MODEL + ":countTokens", "gemini_count_tokens", "gemini_api.handle_gemini_count_tokens",
          GEMINI, BODY_JSON),
    Route("POST", _GEMINI_MODEL + ":embedContent", "gemini_embed", "gemini_api.handle_gemini_embed", GEMINI, BODY_JSON,
          reader="gemini_api.gemini_embed_turn"),
    Route("POST", _GEMINI_MODEL + ":batchEmbedContents", "gemini_batch_embed", "gemini_api.handle_gemini_batch_embed",
          GEMINI, BODY_JSON, reader="gemini_api.gemini_embed_turn"),
    Route("POST", _GEMINI_MODEL + ":predict", "gemini_predict", "gemini_api.handle_gemini_predict", GEMINI, BODY_JSON),
    Route("POST", _VERTEX_GEMINI + ":predict", "gemini_predict", "gemini_api.handle_gemini_predict", GEMINI, BODY_JSON,
          platform=VERTEX),  # before the row below, which it narrows (google's models: Vertex AI's)
    Route("POST", _VERTEX_MODEL + ":predict", "gemini_predict", "gemini_api.handle_gemini_predict", GEMINI, BODY_JSON),
    Route("POST", _EXPRESS_MODEL + ":predict", "gemini_predict", "gemini_api.handle_gemini_predict", GEMINI,
          BODY_JSON),
    # Azure OpenAI: a deployment (the model) in the path and ?api-version=, or the v1 paths; OpenAI's engine.
    Route("POST", _AZURE + "/chat/completions", "chat", "azure.handle_azure_chat", OPENAI, BODY_JSON, STREAM_FLAG,
          "openai_api.openai_reader", platform=AZURE, model_param="deployment"),
    Route("POST", _AZURE + "/completions", "completions", "azure.handle_azure_completions", OPENAI, BODY_JSON,
          STREAM_FLAG, "openai_api.completion_turn", platform=AZURE, model_param="deployment"),
    Route("POST", _AZURE + "/embeddings", "embeddings", "azure.handle_azure_embeddings", OPENAI, BODY_JSON,
          reader="openai_api.embeddings_turn", platform=AZURE, model_param="deployment"),
    Route("POST", _AZURE + "/images/generations", "images", "azure.handle_azure_images", OPENAI, BODY_JSON,
          platform=AZURE, model_param="deployment"),
    Route("POST", "/openai/responses", "responses", "azure.handle_azure_responses", OPENAI, BODY_JSON, STREAM_FLAG,
          "responses_api.responses_reader", platform=AZURE),
    Route("POST", "/openai/v1/chat/completions", "chat", "openai_api.handle_openai_chat", OPENAI, BODY_JSON,
          STREAM_FLAG, "openai_api.openai_reader", platform=AZURE),
    Route("POST", "/openai/v1/embeddings", "embeddings", "openai_api.handle_openai_embeddings", OPENAI, BODY_JSON,
          reader="openai_api.embeddings_turn", platform=AZURE),
    Route("POST", "/openai/v1/responses", "responses", "responses_api.handle_openai_responses", OPENAI, BODY_JSON,
          STREAM_FLAG, "responses_api.responses_reader", platform=AZURE),
    # Gemini's OpenAI-compatible endpoint (/v1beta/openai/...): answered as OpenAI's Chat, with Gemini's key.
    Route("POST", "/openai/chat/completions", "chat", "openai_api.handle_openai_chat", OPENAI, BODY_JSON,
          STREAM_FLAG, "openai_api.openai_reader", platform=GEMINI_OPENAI),
    Route("POST", "/openai/embeddings", "embeddings", "openai_api.handle_openai_embeddings", OPENAI, BODY_JSON,
          reader="openai_api.embeddings_turn", platform=GEMINI_OPENAI),
    # Vertex AI: Gemini and Anthropic models on Google Cloud (Bearer tokens, Google's errors), the same engines.
    Route("POST", _VERTEX_GEMINI + ":generateContent", "gemini_generate", "gemini_api.handle_gemini_generate", GEMINI,
          BODY_JSON, reader="gemini_api.gemini_reader", platform=VERTEX),
    Route("POST", _VERTEX_GEMINI + ":streamGenerateContent", "gemini_stream", "gemini_api.handle_gemini_generate",
          GEMINI, BODY_JSON, STREAM_ALWAYS, "gemini_api.gemini_reader", platform=VERTEX),
    Route("POST", _VERTEX_GEMINI + ":countTokens", "gemini_count_tokens", "gemini_api.handle_gemini_count_tokens",
          GEMINI, BODY_JSON, platform=VERTEX),
    Route("POST", _VERTEX_GEMINI + ":embedContent", "gemini_embed", "gemini_api.handle_gemini_embed", GEMINI,
          BODY_JSON, reader="gemini_api.gemini_embed_turn", platform=VERTEX),
    Route("POST", _BEDROCK + "/invoke", "messages", "bedrock.handle_bedrock_invoke", ANTHROPIC, BODY_JSON,
          reader="anthropic_api.anthropic_reader", platform=BEDROCK, model_param="model"),
    Route("POST", _BEDROCK + "/invoke-with-response-stream", "messages", "bedrock.handle_bedrock_invoke", ANTHROPIC,
          BODY_JSON, STREAM_ALWAYS, "anthropic_api.anthropic_reader", platform=BEDROCK, model_param="model",
          framing="bedrock.InvokeFramer"),
    Route("POST", _BEDROCK + "/converse", "converse", "bedrock.handle_bedrock_converse", ANTHROPIC, BODY_JSON,
          reader="bedrock.converse_reader", platform=BEDROCK, model_param="model"),
    Route("POST", _BEDROCK + "/converse-stream", "converse", "bedrock.handle_bedrock_converse", ANTHROPIC, BODY_JSON,
          STREAM_ALWAYS, "bedrock.converse_reader", platform=BEDROCK, model_param="model",
          framing="bedrock.ConverseFramer"),
    Route("POST", _BEDROCK + "/count-tokens", "messages_count_tokens", "bedrock.handle_bedrock_count_tokens",
          ANTHROPIC, BODY_JSON, platform=BEDROCK),
    Route("POST", _VERTEX_CLAUDE + "count-tokens:rawPredict", "messages_count_tokens",
          "anthropic_api.handle_anthropic_count_tokens", ANTHROPIC, BODY_JSON, platform=VERTEX),
    Route("POST", _VERTEX_CLAUDE + "{model}:rawPredict", "messages", "anthropic_api.handle_vertex_messages",
          ANTHROPIC, BODY_JSON, STREAM_FLAG, "anthropic_api.anthropic_reader", platform=VERTEX, model_param="model"),
    Route("POST", _VERTEX_CLAUDE + "{model}:streamRawPredict", "messages", "anthropic_api.handle_vertex_messages",
          ANTHROPIC, BODY_JSON, STREAM_ALWAYS, "anthropic_api.anthropic_reader", platform=VERTEX,
          model_param="model"),
    Route("POST", "/files:upload", "gemini_upload", "files.handle_gemini_upload_raw", GEMINI, BODY_STREAM),
    Route("POST", "/upload/files", "gemini_upload_media", "files.handle_gemini_upload", GEMINI, BODY_STREAM),
    Route("GET", "/models", "models", "models.handle_models_list", SHARED),
    Route("GET", "/models/{model}", "models_get", "models.handle_model_get", SHARED),
    Route("GET", "/files", "files_list", "files.handle_files_list", SHARED),
    Route("GET", "/files/{file_id}", "files_get", "files.handle_file_get", SHARED),
    Route("DELETE", "/files/{file_id}", "files_delete", "files.handle_file_delete", SHARED),
    Route("GET", "/_images/{image}", "image_png", "images.handle_image_png", DPMOCK),
    Route("GET", "/_control/status", "control_status", "control.handle_control_status", DPMOCK),
    Route("GET", "/_control/requests", "control_requests", "control.handle_control_requests", DPMOCK),
    Route("DELETE", "/_control/requests", "control_requests_clear", "control.handle_control_requests_clear", DPMOCK),
    Route("GET", "/_control/schedules", "control_schedules", "control.handle_control_schedules", DPMOCK),
    Route("POST", "/_control/reset", "control_reset", "control.handle_control_reset", DPMOCK),
    Route("POST", "/_control/rules", "control_rules_add", "control.handle_control_rules_add", DPMOCK, BODY_STREAM),
    Route("GET", "/_control/rules", "control_rules", "control.handle_control_rules_list", DPMOCK),
    Route("DELETE", "/_control/rules", "control_rules_clear", "control.handle_control_rules_clear", DPMOCK),
    Route("DELETE", "/_control/rules/{rule_id}", "control_rule_delete", "control.handle_control_rule_delete", DPMOCK),
    Route("POST", "/_control/shutdown", "control_shutdown", "control.handle_control_shutdown", DPMOCK),
    Route("POST", "/_control/restart", "control_restart", "control.handle_control_restart", DPMOCK),
)

ROUTER = Router(ROUTES)

check_modules(ROUTES)  # a row naming a missing module: "cannot start", not a 500 at its first request
check_catalogue(ROUTES)  # importing dpmock with a catalogue it cannot carry out fails at once
