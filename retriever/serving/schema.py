"""The HTTP API's request and response bodies (pydantic; they are the OpenAPI schema at `/docs`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

MAX_K = 1000
ModelName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class Request(BaseModel):
    # Strict types: "10" is not a number and 1 is not a boolean; unknown fields are refused, not ignored.
    model_config = ConfigDict(extra="forbid")


class SearchRequest(Request):
    query: StrictStr = Field(description="the query text (not empty; at most the configured number of characters)")
    k: StrictInt = Field(10, ge=1, le=MAX_K, description="hits to return")
    model: ModelName | list[ModelName] = Field(
        description="a served model's name, or several names: their rankings fused with reciprocal rank fusion"
    )
    explain: StrictBool = Field(False, description="sparse models: the matched terms of every hit")
    text: StrictBool = Field(False, description="return each hit's passage text (models served with a corpus)")

    @property
    def model_names(self) -> list[str]:
        """The model or models asked, as a list."""
        return [self.model] if isinstance(self.model, str) else list(self.model)


class Term(BaseModel):
    term: str = Field(description="the vocabulary term as text")
    weight: float = Field(description="query weight x document weight: the term's share of the score")


class Hit(BaseModel):
    docid: str
    score: float
    text: str | None = None
    terms: list[Term] | None = None


class SearchResponse(BaseModel):
    hits: list[Hit]
    model: str | list[str]
    took_ms: float
    partial: bool = Field(description="true when some shards did not answer: their documents are missing")
    missing_shards: list[str] = Field(default_factory=list)


class EncodeRequest(Request):
    texts: list[StrictStr] = Field(min_length=1, description="texts to encode (at most the configured number)")
    kind: Literal["query", "passage"] = "query"
    model: ModelName


class EncodeResponse(BaseModel):
    model: str
    paradigm: Literal["dense", "sparse"]
    vectors: list[list[float]] | None = Field(None, description="dense: one vector per text")
    terms: list[dict[str, float]] | None = Field(None, description="sparse: one {term: weight} per text")


class ModelInfo(BaseModel):
    name: str
    paradigm: Literal["dense", "sparse"]
    encoder: str
    index_kind: str
    documents: int
    shards: list[str]
    texts: bool = Field(description="whether hits can carry passage texts")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer: what was wrong and how to fix it."""

    detail: str


class Health(BaseModel):
    status: Literal["ok"]
    models: list[str]
