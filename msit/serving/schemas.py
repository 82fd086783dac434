"""Request and response bodies of the HTTP API (pydantic: wrong types get a 422 naming the field)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Id = StrictStr | StrictInt  # raw ids as in the scene logs: 7 and "7" are one id
ContextValue = StrictStr | StrictInt | StrictFloat | list[StrictStr]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class HistoryEvent(_Body):
    item_id: Id
    scenario: StrictStr
    label: Literal[0, 1] = 1
    timestamp: StrictInt = Field(ge=0, description="seconds since the epoch")


class ScoreRequest(_Body):
    user_id: Id
    scenario: StrictStr = Field(description="the target scene")
    candidates: list[Id] = Field(description="item ids to score (at most the server's max_candidates)")
    history: list[HistoryEvent] | None = Field(
        None, description="the user's past events; omitted: the server's history store ([] means none)")
    context: dict[StrictStr, ContextValue] | None = None
    timestamp: StrictInt | None = Field(None, ge=0, description="the request's moment (default: now)")
    explain: StrictBool = False


class RecommendRequest(_Body):
    user_id: Id
    scenario: StrictStr
    k: StrictInt = Field(10, ge=1, le=1000)
    exclude_seen: StrictBool = True
    context: dict[StrictStr, ContextValue] | None = None
    timestamp: StrictInt | None = Field(None, ge=0)


class ScoredItem(BaseModel):
    item_id: str
    score: float
    explanation: dict | None = None


class ScoreResponse(BaseModel):
    model_version: str
    scores: list[ScoredItem]


class RecommendResponse(BaseModel):
    model_version: str
    items: list[ScoredItem]
    catalogue_size: int
