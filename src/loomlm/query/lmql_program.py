"""LMQL programs (the language of the `lmql` package: decoders, `where`, `from`, scripted prompts)
run by the real `lmql` compiler and interpreter on an in-process loomlm engine.

lmql talks to its models through LMTP clients (`generate`, `score`, `request`, `close`;
lmql 0.7.3, lmql/models/lmtp/lmtp_client.py). `InProcessLMTPClient` is one over a loomlm engine:
the same GENERATE / SCORE semantics as the server's LMTP websocket (`loomlm.server.lmtp`), with no
socket in between. `lmql_model(handle)` wraps a loomlm `Model` handle as an `lmql.LLM`, usable
in `lmql.run(..., model=...)`, `@lmql.query(model=...)` and its `score` / `generate`.

`looks_like_lmql_program` tells an LMQL program from loomlm's template syntax
(`loomlm.query.template`): a program's first statement is a decoder clause (`argmax`,
`sample(...)`, `beam(n=2)`, ...) or a quoted prompt string.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loomlm.server.lmtp import generate_entries, model_info, score_entries

if TYPE_CHECKING:
    from loomlm.background_loop import BackgroundLoop
    from loomlm.engine.async_engine import AsyncLLMEngine
    from loomlm.generation import Model

# LMQL's decoders (lmql/runtime/decoders.py: the @dc.decoder functions).
_DECODERS = ("argmax", "sample", "beam", "beam_var", "var", "best_k", "beam_sample", "inprocess_beam")
_PROGRAM_START = re.compile(r"""^\s*(?:(?:%s)\b|["'])""" % "|".join(_DECODERS))


def looks_like_lmql_program(query: str) -> bool:
    """True when `query`'s first non-blank line starts with an LMQL decoder clause or a quoted string."""
    for line in query.splitlines():
        if line.strip():
            return bool(_PROGRAM_START.match(line))
    return False


class InProcessLMTPClient:
    """lmql's LMTP client interface on a loomlm engine that runs in `loop` (the handle's own event
    loop): lmql calls it from its loop, and the engine's streams are carried across."""

    def __init__(self, engine: AsyncLLMEngine, loop: BackgroundLoop) -> None:
        self.engine = engine
        self.loop = loop

    async def request(self, name: str, payload: dict[str, Any]) -> dict[str, Any]:
        """MODEL_INFO (the only request lmql makes)."""
        return {"model_info": model_info(self.engine)}

    def generate(self, prompt: list[int], **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        """GENERATE: the TOKEN entries of `prompt`'s continuation (`loomlm.server.lmtp.generate_entries`)."""
        return self._stream(generate_entries, {**kwargs, "prompt": prompt})

    def score(self, prompt: list[int], scored_prompt: list[int], **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        """SCORE: one TOKEN entry per scored token (`loomlm.server.lmtp.score_entries`)."""
        return self._stream(score_entries, {"prompt": prompt, "scored": scored_prompt})

    async def _stream(self, entries, data: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        data.pop("model", None)
        request_id = f"lmql-{uuid.uuid4().hex}"
        async for entry in self.loop.stream(entries(self.engine, None, data, request_id)):
            yield entry

    async def close(self) -> None:
        pass  # the engine belongs to the loomlm handle


def export_tokenizer(tokenizer: Any) -> Path:
    """The model's tokenizer saved where `transformers.AutoTokenizer` (and so lmql) can load it:
    under loomlm's cache directory, keyed by a digest of its vocabulary and settings. Returns the
    directory (written once)."""
    from loomlm.models.gguf_loader import cache_root

    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(repr(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())).encode())
    directory = cache_root() / "tokenizers" / digest.hexdigest()[:16]
    if not (directory / "tokenizer_config.json").exists():
        tokenizer.save_pretrained(directory)
    return directory


def lmql_model(handle: Model) -> Any:
    """An `lmql.LLM` running on `handle`'s in-process engine. Raises ValueError for a handle on a
    loomlm server (lmql reaches a server itself: `lmql.model(name, endpoint="HOST:PORT",
    tokenizer=...)`); ImportError without the `lmql` package."""
    from lmql.api.llm import LLM as LMQLModel
    from lmql.models.lmtp.lmtp_dcmodel import lmtp_model

    backend, loop = handle._runtime.backend, handle._runtime.loop
    engine = getattr(backend, "engine", None)
    if engine is None:
        raise ValueError(f"{handle.identifier!r} is a loomlm server: run LMQL programs on it with lmql itself, "
                         "lmql.model(NAME, endpoint='HOST:PORT', tokenizer=...) (loomlm serves LMTP on '/').")
    name = engine.served_model_name
    adapter = lmtp_model(name, inprocess=True, tokenizer=str(export_tokenizer(engine.tokenizer)))
    # lmql builds its in-process client through this factory (lmtp_dcmodel.py); ours needs no process.
    adapter.inprocess_client_constructor_factory = lambda identifier, **kwargs: InProcessLMTPClient(engine, loop)
    return LMQLModel(name, adapter=adapter(), configuration={"loomlm": True})


async def run_lmql_program(program: str, model: Model | str | None, output_writer: Any = None,
                           **kwargs: Any) -> Any:
    """Compile and run `program` with `lmql.run` on loomlm's engine (the handle `model`, None: the
    default). `kwargs` go to `lmql.run` (the program's inputs, decoder overrides). Returns lmql's
    result (`LMQLResult`, or a list of them for decoders returning several).

    Raises ImportError naming the fix when `lmql` is not installed.
    """
    try:
        import lmql
    except ImportError as exc:
        raise ImportError("this query is an LMQL program (it starts with a decoder or a quoted prompt); running "
                          "it needs the lmql package (pip install lmql==0.7.3). loomlm's own template syntax "
                          "(loomlm.query.template) needs no package.") from exc
    from loomlm.generation import as_model

    if output_writer is not None:
        kwargs["output_writer"] = output_writer
    return await lmql.run(program, model=lmql_model(as_model(model)), **kwargs)
