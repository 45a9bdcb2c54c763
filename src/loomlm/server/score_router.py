"""loomlm's native scoring route, `POST /score` (schemas in `loomlm.protocol.score`).

The route translates only: `loomlm.scoring.score_on_engine` prefills the prompt once and
scores every value in one batch reusing the prompt's cached KV blocks. Errors use the
OpenAI error body (400 bad input, 404 unknown model). The lm-evaluation-harness way
(`POST /v1/completions` with `echo: true, max_tokens: 0, logprobs: 1`) also works, one
request per prompt + value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from loomlm.outputs import json_logprob
from loomlm.protocol.score import ScoredValue, ScoreRequest, ScoreResponse, ScoreUsage
from loomlm.scoring import ScoringResult, score_on_engine
from loomlm.server.errors import BadRequestError, bad_request_on_value_error
from loomlm.server.limits import ServerLimits
from loomlm.server.metrics import ServerMetrics, record_usage
from loomlm.server.openai_router import lora_for_openai_model
from loomlm.server.sse import run_until_disconnect

if TYPE_CHECKING:
    from loomlm.engine.async_engine import AsyncLLMEngine

SCORE_PATH = "/score"


def _clamped(scores) -> list[float]:
    return [json_logprob(score) for score in scores]


def score_response(result: ScoringResult) -> ScoreResponse:
    """A ScoringResult on the wire."""
    values = [ScoredValue(value=value, token_ids=ids, logprobs=_clamped(scores), num_cached_tokens=cached)
              for value, ids, scores, cached in zip(result.continuations, result.value_token_ids,
                                                     result.token_scores, result.num_cached_tokens)]
    usage = ScoreUsage(prompt_tokens=len(result.prompt_token_ids), value_tokens=sum(result.num_value_tokens))
    return ScoreResponse(model=result.model_identifier, prompt_token_ids=result.prompt_token_ids,
                         prompt_logprobs=_clamped(result.prompt_token_scores), values=values, usage=usage)


def build_score_router(engine: AsyncLLMEngine, metrics: ServerMetrics, limits: ServerLimits | None = None
                       ) -> APIRouter:
    """The `POST /score` route for `engine`; `limits` bound each request (default `ServerLimits()`)."""
    router = APIRouter()
    limits = limits or ServerLimits()

    @router.post(SCORE_PATH, response_model=ScoreResponse)
    async def score(body: ScoreRequest, raw_request: Request) -> Response:
        """Score each value after the prompt. Errors: 400 invalid input, 404 unknown model."""
        with bad_request_on_value_error("values"):
            limits.check_count("values", 1 if isinstance(body.values, str) else len(body.values),
                               limits.max_score_values, "values")
        lora = await lora_for_openai_model(engine, limits, body.model)
        try:
            result = await run_until_disconnect(raw_request, score_on_engine(engine, body.prompt, body.values, lora))
        except ValueError as exc:
            raise BadRequestError(str(exc), "values" if "value" in str(exc) else "prompt") from exc
        response = score_response(result)
        # Scoring generates nothing: every scored token counts as a prompt token.
        record_usage(raw_request, metrics, response.usage.prompt_tokens + response.usage.value_tokens, 0)
        return JSONResponse(response.model_dump())

    return router
