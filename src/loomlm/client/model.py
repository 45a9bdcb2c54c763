"""`Model`: Scale LLM Engine's model-endpoint calls (`llmengine.Model.get` / `list`) for a loomlm server.

Source: scaleapi/llm-engine `clients/python/llmengine/model.py`: `Model.get(model)` reads
`GET v1/llm/model-endpoints/{model}`, `Model.list()` reads `GET v1/llm/model-endpoints`. A loomlm
server serves one model and the adapters it has loaded, so the calls that deploy or change
endpoints (`create`, `update`, `delete`, `download`) raise NotImplementedError. Torch-free.
"""

from __future__ import annotations

from contextlib import closing
from typing import Any
from urllib.parse import quote

from loomlm.client.core import ApiRequest, validated
from loomlm.client.llmengine import request_headers_for, resolve_base_url
from loomlm.client.transport import SyncTransport
from loomlm.protocol.llmengine import GetLLMEndpointResponse, ListLLMEndpointsResponse

MODEL_TIMEOUT_S = 60
MODEL_ENDPOINTS_PATH = "v1/llm/model-endpoints"


class Model:
    """The server's model endpoints (`llmengine.Model`'s read calls). The server and key are found
    as `Completion`'s (`base_url`, `$LOOMLM_BASE_URL`, `$LLM_ENGINE_BASE_PATH`; `api_key`, ...)."""

    @classmethod
    def get(cls, model: str, *, base_url: str | None = None, api_key: str | None = None) -> GetLLMEndpointResponse:
        """The endpoint `model` (the served model, or an adapter the server has loaded).

        Raises NotFoundError (404) for another name; LoomlmClientError for other error answers.
        """
        return validated(GetLLMEndpointResponse, _get(f"{MODEL_ENDPOINTS_PATH}/{quote(model, safe='')}",
                                                      base_url, api_key), 200)

    @classmethod
    def list(cls, *, base_url: str | None = None, api_key: str | None = None) -> ListLLMEndpointsResponse:
        """Every endpoint: the served model and the adapters loaded so far."""
        return validated(ListLLMEndpointsResponse, _get(MODEL_ENDPOINTS_PATH, base_url, api_key), 200)

    @classmethod
    def create(cls, *args: Any, **kwargs: Any) -> Any:
        """Not supported (also `update`, `delete`, `download`). Raises NotImplementedError."""
        raise NotImplementedError("a loomlm server serves the model it was started with: start "
                                  "`loomlm serve MODEL` instead of Model.create")

    update = delete = download = create


def _get(path: str, base_url: str | None, api_key: str | None) -> Any:
    headers = request_headers_for(api_key, None)
    with closing(SyncTransport(resolve_base_url(base_url), headers, timeout=MODEL_TIMEOUT_S)) as transport:
        return transport.request_json(ApiRequest("GET", path, None))
