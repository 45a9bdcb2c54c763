"""Embeddings: OpenAI's `POST /v1/embeddings` and LoRAX's `POST /embed`, one engine call each.

The engine pools the served model's final hidden states (`LLM.embed`, `loomlm.pooling_params`);
these routes translate. OpenAI (its API reference; vLLM's `serving_embedding.py`): `input` a
string, a list of strings, a list of token ids or a list of those; `encoding_format` "float" or
"base64" (little-endian float32 bytes, what the `openai` client asks for by default); `dimensions`
only the model's own (400 otherwise); `usage` counts prompt tokens; `model` may name an adapter.
LoRAX (lorax-client's `Client.embed`): `{"inputs": str}` -> `{"embeddings": [float]}`, errors
in LoRAX's body.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import uuid
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from loomlm.pooling_params import PoolingParams
from loomlm.server.errors import BadRequestError, TGIError, bad_request_on_value_error
from loomlm.server.limits import ServerLimits
from loomlm.server.metrics import ServerMetrics, record_usage
from loomlm.server.openai_router import lora_for_openai_model, prompt_batch
from loomlm.server.sse import run_until_disconnect

if TYPE_CHECKING:
    from loomlm.engine.async_engine import AsyncLLMEngine

EMBED_PATH = "/embed"  # LoRAX's route (its error body: register it with the TGI paths)


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`; unknown fields (`user`) are ignored."""

    model_config = ConfigDict(extra="ignore")

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    # vLLM extras
    truncate_prompt_tokens: int | None = None
    normalize: bool | None = None


class LoRAXEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str


def _base64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: the float32 values, little-endian, base64 text."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def build_embeddings_router(engine: AsyncLLMEngine, metrics: ServerMetrics, limits: ServerLimits | None = None
                            ) -> APIRouter:
    """The embedding routes for `engine`; `limits` bound each request (default `ServerLimits()`)."""
    router = APIRouter()
    limits = limits or ServerLimits()

    async def embed_all(raw_request: Request, prompts: list[str | list[int]], pooling: PoolingParams,
                        lora) -> list:
        request_id = f"embd-{uuid.uuid4().hex}"
        work = asyncio.gather(*(engine.embed(prompt, pooling, f"{request_id}-{i}", lora)
                                for i, prompt in enumerate(prompts)))
        return await run_until_disconnect(raw_request, work)

    @router.post("/v1/embeddings", response_model=None)
    async def create_embedding(body: EmbeddingRequest, raw_request: Request):
        """OpenAI's embeddings. Errors: 400 invalid input, 404 unknown model."""
        prompts = prompt_batch(body.input)
        if not prompts or any(not prompt for prompt in prompts):
            raise BadRequestError("input must be a non-empty string or token list, or a list of them.", "input")
        with bad_request_on_value_error("input"):
            limits.check_count("input", len(prompts), limits.max_prompts_per_request, "inputs")
        lora = await lora_for_openai_model(engine, limits, body.model)
        keep = body.truncate_prompt_tokens
        if keep is not None:  # vLLM's: the last `keep` tokens of each prompt (tokenized off the event loop)
            if keep < 1:
                raise BadRequestError("truncate_prompt_tokens must be at least 1.", "truncate_prompt_tokens")
            prompts = [(p if isinstance(p, list) else await asyncio.to_thread(engine.tokenizer.encode, p))[-keep:]
                       for p in prompts]
        try:
            pooling = PoolingParams(normalize=body.normalize, dimensions=body.dimensions)
            results = await embed_all(raw_request, prompts, pooling, lora)
        except ValueError as exc:
            raise BadRequestError(str(exc), "dimensions" if "dimensions" in str(exc) else "input") from exc
        prompt_tokens = sum(len(r.prompt_token_ids) for r in results)
        record_usage(raw_request, metrics, prompt_tokens, 0)
        data: list[dict[str, Any]] = [
            {"object": "embedding", "index": i,
             "embedding": _base64(r.outputs.embedding) if body.encoding_format == "base64" else r.outputs.embedding}
            for i, r in enumerate(results)]
        model = lora.lora_name if lora is not None else engine.served_model_name
        return JSONResponse({"id": f"embd-{uuid.uuid4().hex}", "object": "list", "data": data, "model": model,
                             "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})

    @router.post(EMBED_PATH, response_model=None)
    async def lorax_embed(body: LoRAXEmbedRequest, raw_request: Request):
        """LoRAX's embed: `{"inputs"}` -> `{"embeddings"}`. Errors in LoRAX's body (422 bad input)."""
        if not body.inputs:
            raise TGIError("`inputs` cannot be empty", 422, "validation")
        try:
            (result,) = await embed_all(raw_request, [body.inputs], PoolingParams(), None)
        except ValueError as exc:
            raise TGIError(str(exc), 422, "validation") from exc
        record_usage(raw_request, metrics, len(result.prompt_token_ids), 0)
        return JSONResponse({"embeddings": result.outputs.embedding})

    return router
