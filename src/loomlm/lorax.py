"""LoRAX's Python client under its own names: code written for predibase/lorax's `lorax` package
(lorax-client 0.6) runs on loomlm with `import loomlm.lorax as lorax`.

`lorax.Client` / `lorax.AsyncClient` (LoRAX's signatures, `loomlm.client`), `lorax.MergedAdapters`
validated when it is made (as `lorax.types.MergedAdapters`' validators), `lorax.errors` (LoRAX's
exception names) and `lorax.types` with LoRAX's response and request type names: `Response`,
`StreamResponse`, `Details`, `StreamDetails`, `Token`, `InputToken`, `AlternativeToken`,
`BestOfSequence`, `FinishReason` (members `Length`, `EndOfSequenceToken`, `StopSequence`),
`ResponseFormat` / `ResponseFormatType`. Torch-free.
"""

from __future__ import annotations

import sys
import types as _module_types
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from loomlm.client import AsyncClient, Client
from loomlm.client import errors as errors
from loomlm.client.generate import check_merged_adapters
from loomlm.protocol.tgi import (
    AlternativeToken,
    BestOfSequence,
    Details,
    FinishReason,
    InputToken,
    MergedAdaptersSpec,
    StreamDetails,
    StreamResponse,
    Token,
)
from loomlm.protocol.tgi import GenerateResponse as Response


class MergedAdapters(MergedAdaptersSpec):
    """LoRAX's `merged_adapters` (ids, weights, merge_strategy, density, majority_sign_method),
    checked when made as `lorax.types.MergedAdapters` is.

    Raises `errors.ValidationError`: empty ids or weights, their lengths differ, an unknown
    merge_strategy or majority_sign_method, or a density outside [0, 1].
    """

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        check_merged_adapters(self)


class ResponseFormatType(str, Enum):
    json_object = "json_object"


class ResponseFormat(BaseModel):
    """LoRAX's structured-output request: `{"type": "json_object", "schema": {...}}` (`schema_spec`
    in Python, `schema` on the wire)."""

    model_config = ConfigDict(use_enum_values=True, populate_by_name=True)

    type: ResponseFormatType
    schema_spec: dict[str, Any] = Field(alias="schema")


# `lorax.types`, as a submodule of this one (`from loomlm.lorax.types import Response` works too).
types = _module_types.ModuleType(f"{__name__}.types", "LoRAX's type names (see loomlm.lorax).")
for _name in ("AlternativeToken", "BestOfSequence", "Details", "FinishReason", "InputToken", "MergedAdapters",
              "Response", "ResponseFormat", "ResponseFormatType", "StreamDetails", "StreamResponse", "Token"):
    setattr(types, _name, globals()[_name])
sys.modules[types.__name__] = types
sys.modules[f"{__name__}.errors"] = errors

__all__ = [
    "AlternativeToken",
    "AsyncClient",
    "BestOfSequence",
    "Client",
    "Details",
    "FinishReason",
    "InputToken",
    "MergedAdapters",
    "Response",
    "ResponseFormat",
    "ResponseFormatType",
    "StreamDetails",
    "StreamResponse",
    "Token",
    "errors",
    "types",
]
