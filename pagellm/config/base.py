"""The base of every config section: unknown keys fail, names are checked against registries."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import AfterValidator, BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def one_of(kind: str, names: Sequence[str]) -> AfterValidator:
    """A string field that must name one of `names` (a registry's declared names)."""
    def check(value: str) -> str:
        if value not in names:
            raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(names)}")
        return value

    return AfterValidator(check)
