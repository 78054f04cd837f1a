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


def handle_azure_chat(w, req):
    check_api_version(req)
    openai_api.handle_openai_chat(w, req)


def handle_azure_completions(w, req):
    check_api_version(req)
    openai_api.handle_openai_completions(w, req)


def handle_azure_embeddings(w, req):
    check_api_version(req)
    openai_api.handle_openai_embeddings(w, req)


def handle_azure_images(w, req):
    check_api_version(req)
    openai_api.handle_openai_images(w, req)


def handle_azure_responses(w, req):
    check_api_version(req)
    responses_api.handle_openai_responses(w, req)
