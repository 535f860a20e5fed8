"""Everything in one process: the encoders and shards of a serve config behind the service, for a single machine
(`retriever serve --local`), tests, and the one-process baseline of the serving benchmark."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from retriever.serving.catalog import ServedModel
from retriever.serving.encoder import Encoded, ServedEncoder
from retriever.serving.schema import ModelInfo
from retriever.serving.shard import ServedShard, ShardHit


class LocalBackend:
    def __init__(self, models: Sequence[ServedModel]) -> None:
        self.models = {model.name: model for model in models}
        self.encoders = {
            model.name: ServedEncoder.load(model.name, model.encoder_dir, model.config.query_max_length)
            for model in models
        }
        self.shards = {
            model.name: {
                name: ServedShard(name, folder, expected_encoder_sha256=model.fingerprint, corpus=model.config.corpus)
                for name, folder in model.shards.items()
            }
            for model in models
        }

    def catalog(self) -> dict[str, ModelInfo]:
        return {name: model.info() for name, model in self.models.items()}

    async def encode(self, model: str, texts: list[str], kind: str) -> Encoded:
        return await asyncio.to_thread(self.encoders[model].encode, texts, kind)  # type: ignore[arg-type]

    async def search_shard(
        self, model: str, shard: str, encoded: Encoded, k: int, explain: bool, text: bool
    ) -> list[list[ShardHit]]:
        served = self.shards[model][shard]
        return await asyncio.to_thread(served.search, encoded, k, explain=explain, text=text)

    async def term_texts(self, model: str, term_ids: list[int]) -> list[str]:
        return self.encoders[model].term_texts(term_ids)
