"""Request and response bodies of the HTTP API (pydantic: wrong types get a 422 naming the field).

Every field is bounded: strings must be encodable as UTF-8 (JSON's `\\ud800` escapes allow lone UTF-16
surrogates, which no id, scene or feature value can be), timestamps fit int64 seconds, numbers are finite.
The number of history events is capped by the server (`max_history`), candidates by `max_candidates`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

INT64_MAX = 2**63 - 1


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"must be UTF-8 text: a lone UTF-16 surrogate at position {e.start}") from None
    return value


Text = Annotated[StrictStr, AfterValidator(_utf8)]
Id = Text | StrictInt  # raw ids as in the scene logs: 7 and "7" are one id
Finite = Annotated[StrictFloat, Field(allow_inf_nan=False)]  # NaN, Infinity (Python's JSON reads them) refused
ContextValue = Text | StrictInt | Finite | list[Text]
Timestamp = Annotated[StrictInt, Field(ge=0, le=INT64_MAX, description="seconds since the epoch (int64)")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class HistoryEvent(_Body):
    item_id: Id
    scenario: Text
    label: Literal[0, 1] = 1
    timestamp: Timestamp


class Event(_Body):
    """One event of a user, as a scene log row holds it: appended to the user's sequence in the history store."""

    user_id: Id
    item_id: Id
    scenario: Text
    label: Literal[0, 1]
    timestamp: Timestamp
    context: dict[Text, ContextValue] | None = Field(
        None, description="validated as in a score request; not stored (a history holds no context)"
    )
    event_id: Id | None = Field(None, description="an event id seen before for this user is skipped (retries are safe)")


class EventsRequest(_Body):
    events: list[Event] = Field(description="at most the server's max_events; all applied, or none if one is bad")


class EventsResponse(BaseModel):
    applied: int
    duplicates: int


class ScoreRequest(_Body):
    user_id: Id
    scenario: Text = Field(description="the target scene")
    candidates: list[Id] = Field(description="item ids to score (at most the server's max_candidates)")
    history: list[HistoryEvent] | None = Field(
        None,
        description="the user's past events (at most the server's max_history); omitted: the server's "
        "history store ([] means none)",
    )
    context: dict[Text, ContextValue] | None = None
    timestamp: Timestamp | None = Field(None, description="the request's moment, seconds (default: now; 0 is 1970)")
    explain: StrictBool = False


class RecommendRequest(_Body):
    user_id: Id
    scenario: Text
    k: StrictInt = Field(10, ge=1, le=1000)
    exclude_seen: StrictBool = True
    context: dict[Text, ContextValue] | None = None
    timestamp: Timestamp | None = Field(None, description="the request's moment, seconds (default: now; 0 is 1970)")


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
