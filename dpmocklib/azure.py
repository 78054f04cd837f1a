"""Azure OpenAI: the deployments paths and their api-version, Azure's keys and errors, and the content filter
results Azure adds to answers; OpenAI's own engine (openai_api, responses_api) answers."""

import re

from .base import HTTPError
from . import openai_api, responses_api

#: What Azure's default content filter says of a prompt or an answer that passed it.
FILTERS = {name: {"filtered": False, "severity": "safe"} for name in ("hate", "self_harm", "sexual", "violence")}
PROMPT_FILTERS = [{"prompt_index": 0, "content_filter_results": FILTERS}]
_VERSION = re.compile(r"(?:20[2-9][0-9]-[01][0-9]-[0-3][0-9](?:-preview)?|preview|latest)\Z")


def check_api_version(req):
    """A deployments path needs ?api-version= (without it Azure finds no resource); an unknown one is a 400."""
    version = req.arg("api-version")
    if version is None:
        raise HTTPError(404, "Resource not found", "404")
    if not _VERSION.match(version):
        raise HTTPError(400, "API version not supported", "BadRequest")


def _needs_api_version(handler):
    """``handler`` behind Azure's api-version check (the deployments paths and /openai/responses)."""
    def handle(w, req):
        check_api_version(req)
        handler(w, req)
    handle.__doc__ = "%s, on Azure's path (api-version checked first)" % handler.__name__
    return handle


handle_azure_chat = _needs_api_version(openai_api.handle_openai_chat)
handle_azure_completions = _needs_api_version(openai_api.handle_openai_completions)
handle_azure_embeddings = _needs_api_version(openai_api.handle_openai_embeddings)
handle_azure_images = _needs_api_version(openai_api.handle_openai_images)
handle_azure_responses = _needs_api_version(responses_api.handle_openai_responses)
