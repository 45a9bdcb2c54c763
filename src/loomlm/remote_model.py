"""A loomlm server as the backend of a `loomlm.Model` handle (`loomlm.model("http://host:port")`).

The whole HTTP path of the Generations API is this one class: `generate` is
`POST {url}/v1/completions` (the decoder's fields from `Decoder.completion_fields`;
`stream` the same with `stream: true`), `score` is loomlm's native `POST {url}/score`
(`loomlm.protocol.score`), and a query's chat prompt is rendered by the server's
`POST /tokenize`. The server
runs the same engine code as a local handle, so both give the same results. Error
answers become exceptions: 4xx -> ValueError (bad input, unknown model), other statuses
-> RuntimeError, an unreachable server -> ConnectionError; each with the server's message.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pydantic

from loomlm.client.errors import error_message
from loomlm.decoders import Decoder
from loomlm.generation import PartialCompletion
from loomlm.protocol.score import ScoreResponse
from loomlm.scoring import ScoringResult, normalize_values


class RemoteModel:
    """Generation and scoring on a loomlm server at `base_url` (http:// or https://).

    Args:
        base_url: the server's root URL (a trailing `/v1`, as OpenAI clients take it, is dropped).
        model: the served model's name or an adapter id (None: the served model).
        api_key: sent as `Authorization: Bearer <key>` (servers started with --api-key).
        timeout: seconds per request (None: no limit).

    An `httpx.AsyncClient` is made on first use in the calling event loop: use one
    instance from one loop (the Model handle runs it in its private loop).
    """

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout: float | None = 600.0) -> None:
        # An OpenAI client's base URL (ending in /v1) names the same server.
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = timeout
        self._client: httpx.AsyncClient | None = None

    @property
    def identifier(self) -> str:
        return self.base_url if self.model is None else f"{self.base_url} ({self.model})"

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self._timeout)
        return self._client

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self.client.post(path, json=body)
        except httpx.TransportError as exc:
            raise ConnectionError(f"cannot reach the loomlm server at {self.base_url}: {exc}") from exc
        return self._payload(path, response)

    def _payload(self, path: str, response: httpx.Response) -> dict[str, Any]:
        """The JSON object of a successful answer; an exception for an error (see the module docstring)."""
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.is_success and isinstance(payload, dict):
            return payload
        message = error_message(payload) or response.text or response.reason_phrase
        error = ValueError if 400 <= response.status_code < 500 else RuntimeError
        raise error(f"{self.base_url}{path} answered {response.status_code}: {message}")

    async def generate(self, prompt: str | list[int], decoder: Decoder) -> list[str]:
        """The completions (generated text only) of `prompt`, `decoder.n` of them."""
        body = {"prompt": prompt, "model": self.model, **decoder.completion_fields()}
        payload = await self._post("/v1/completions", body)
        choices = sorted(payload["choices"], key=lambda choice: choice["index"])
        return [choice["text"] for choice in choices]

    async def stream(self, prompt: str | list[int], decoder: Decoder) -> AsyncIterator[PartialCompletion]:
        """One completion as it grows, from the streamed `POST /v1/completions` (SSE)."""
        body = {"prompt": prompt, "model": self.model, "stream": True, "stream_options": {"include_usage": True},
                **decoder.completion_fields()}
        text, num_chunks, finish_reason = "", 0, None
        try:
            async with self.client.stream("POST", "/v1/completions", json=body) as response:
                if not response.is_success:
                    await response.aread()
                    self._payload("/v1/completions", response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data:"):])
                    if "error" in chunk:
                        raise RuntimeError(f"{self.base_url}/v1/completions failed: {error_message(chunk)}")
                    if chunk.get("usage"):
                        # The last chunk: the exact token count (a chunk may carry several tokens).
                        yield PartialCompletion(text, chunk["usage"]["completion_tokens"], finish_reason)
                        return
                    for choice in chunk.get("choices", []):
                        text += choice.get("text", "")
                        finish_reason = choice.get("finish_reason") or finish_reason
                        num_chunks += 1
                        yield PartialCompletion(text, num_chunks, finish_reason)
        except httpx.TransportError as exc:
            raise ConnectionError(f"cannot reach the loomlm server at {self.base_url}: {exc}") from exc

    async def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The token ids of `messages` in the server's chat template, the last message left open
        (vLLM's `POST /tokenize` with `continue_final_message`)."""
        payload = await self._post("/tokenize", {"model": self.model, "messages": messages,
                                                 "add_generation_prompt": False, "continue_final_message": True})
        return payload["tokens"]

    async def score(self, prompt: str, values: list[str]) -> ScoringResult:
        """Each value scored after `prompt` by the server's `POST /score`."""
        values = normalize_values(values)
        payload = await self._post("/score", {"prompt": prompt, "values": values, "model": self.model})
        try:
            answer = ScoreResponse.model_validate(payload)
        except pydantic.ValidationError as exc:
            raise RuntimeError(f"{self.base_url}/score sent an unexpected answer: {exc}") from exc
        return ScoringResult(
            prompt=prompt, continuations=[v.value for v in answer.values], model_identifier=answer.model,
            prompt_token_ids=answer.prompt_token_ids, value_token_ids=[v.token_ids for v in answer.values],
            prompt_token_scores=np.array(answer.prompt_logprobs, dtype=np.float64),
            token_scores=[np.array(v.logprobs, dtype=np.float64) for v in answer.values],
            num_cached_tokens=[v.num_cached_tokens for v in answer.values])

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

