"""`import loomlm.lorax as lorax`: LoRAX's client names, with LoRAX's checks (lorax-client 0.6's
`lorax.types` / `lorax.errors`), compared name for name with the real package."""

from __future__ import annotations

import lorax as real_lorax
import pytest

import loomlm.lorax as lorax


def test_names_match_the_lorax_package():
    for name in ("Client", "AsyncClient", "MergedAdapters", "errors", "types"):
        assert hasattr(lorax, name)
    for name in ("Response", "StreamResponse", "Details", "StreamDetails", "Token", "InputToken",
                 "AlternativeToken", "BestOfSequence", "FinishReason", "MergedAdapters", "ResponseFormat",
                 "ResponseFormatType"):
        assert hasattr(real_lorax.types, name) and hasattr(lorax.types, name), name
    real_errors = {n for n in dir(real_lorax.errors) if n.endswith("Error")}
    assert real_errors <= {n for n in dir(lorax.errors) if n.endswith("Error")}
    from loomlm.lorax.types import Response  # the submodule imports as LoRAX's does

    assert Response is lorax.Response


def test_finish_reason_members_are_loraxs():
    for member in real_lorax.types.FinishReason:
        ours = getattr(lorax.FinishReason, member.name)
        assert ours.value == member.value and ours == member.value


@pytest.mark.parametrize("kwargs", [
    {"ids": [], "weights": [], "density": 1.0},
    {"ids": ["a", "b"], "weights": [1.0], "density": 1.0},
    {"ids": ["a"], "weights": [1.0], "density": 1.5},
    {"ids": ["a"], "weights": [1.0], "density": 1.0, "merge_strategy": "svd"},
    {"ids": ["a"], "weights": [1.0], "density": 1.0, "majority_sign_method": "mean"},
])
def test_merged_adapters_are_checked_when_made(kwargs):
    with pytest.raises(real_lorax.errors.ValidationError):
        real_lorax.MergedAdapters(**kwargs)
    with pytest.raises(lorax.errors.ValidationError):
        lorax.MergedAdapters(**kwargs)


def test_response_format_speaks_schema_on_the_wire():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    ours = lorax.ResponseFormat(type="json_object", schema=schema)
    theirs = real_lorax.types.ResponseFormat(type="json_object", schema=schema)
    assert ours.model_dump(by_alias=True) == theirs.model_dump(by_alias=True)
