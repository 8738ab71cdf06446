"""Chunks and their vectors as a Feast feature view, for storage, lookup and lineage.

Feast 0.67's vector retrieval (``retrieve_online_documents_v2``) cannot serve on this
platform: its SQLite online store loads sqlite-vec only under Python 3.10 (we run 3.11, and
this interpreter's sqlite3 cannot load extensions at all), its Redis store has no document
retrieval, and its PostgreSQL store needs the ``vector`` extension, which the PostgreSQL we
start lacks. So the feature view holds the chunks (text, page, section, offsets, vector,
index version) in Feast's online store, where a chunk is looked up by id like any entity,
and nearest-neighbour search runs in the faiss index of the same index version.
`vector_search_error` tries Feast's retrieval and says why it failed, for the benchmark.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from keel.files import atomic_write

FEATURE_VIEW = "rag_chunks"
PROJECT = "keel_rag"


def _objects(parquet: Path, dimension: int):
    from feast import Entity, FeatureView, Field, FileSource, ValueType
    from feast.types import Array, Float32, Int64, String

    chunk = Entity(name="chunk", join_keys=["chunk_id"], value_type=ValueType.STRING)
    source = FileSource(
        name="rag_chunks_source", path=str(parquet), timestamp_field="event_timestamp"
    )
    view = FeatureView(
        name=FEATURE_VIEW,
        entities=[chunk],
        schema=[
            Field(name="chunk_id", dtype=String),
            Field(name="doc_id", dtype=String),
            Field(name="section", dtype=String),
            Field(name="start", dtype=Int64),
            Field(name="end", dtype=Int64),
            Field(name="text", dtype=String),
            Field(name="index_version", dtype=String),
            Field(
                name="embedding",
                dtype=Array(Float32),
                vector_index=True,
                vector_search_metric="COSINE",
                vector_length=dimension,
            ),
        ],
        source=source,
        online=True,
        description="Chunks of the manual pages with their vectors, per index version.",
    )
    return chunk, view


def open_store(folder: Path, vector_enabled: bool = True):
    """A Feast store of its own in ``folder``: file registry, SQLite online, file offline."""
    from feast import FeatureStore
    from feast.infra.online_stores.sqlite import SqliteOnlineStoreConfig
    from feast.repo_config import RepoConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = RepoConfig(
        project=PROJECT,
        registry=str(folder / "registry.db"),
        provider="local",
        online_store=SqliteOnlineStoreConfig(
            path=str(folder / "online.db"), vector_enabled=vector_enabled
        ),
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
    )
    return FeatureStore(config=config)


def write_chunks(folder: Path, index_folder: Path) -> dict[str, Any]:
    """Apply the feature view over one index version's chunks and load them online."""
    import pandas as pd

    frame = pd.read_parquet(index_folder / "chunks.parquet")
    vectors = np.load(index_folder / "vectors.npy")
    frame = frame.drop(columns=["title"]).assign(
        embedding=list(vectors),
        index_version=index_folder.name,
        event_timestamp=pd.Timestamp.now(tz="UTC"),
    )
    parquet = folder / "chunks.parquet"
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write(parquet, buffer.getvalue())
    store = open_store(folder)
    store.apply(list(_objects(parquet, vectors.shape[1])))
    store.write_to_online_store(FEATURE_VIEW, frame)
    return {"rows": len(frame), "feature_view": FEATURE_VIEW, "project": PROJECT}


def lookup(folder: Path, chunk_ids: list[str]) -> dict[str, list[Any]]:
    """Chunks by id from the online store."""
    store = open_store(folder)
    features = [f"{FEATURE_VIEW}:{name}" for name in ("doc_id", "section", "text", "index_version")]
    return store.get_online_features(
        features=features, entity_rows=[{"chunk_id": c} for c in chunk_ids]
    ).to_dict()


def vector_search_error(folder: Path, query: np.ndarray, k: int = 5) -> str | None:
    """None if Feast's own vector retrieval answers on this machine, else its error."""
    store = open_store(folder)
    try:
        store.retrieve_online_documents_v2(
            features=[f"{FEATURE_VIEW}:text", f"{FEATURE_VIEW}:embedding"],
            query=[float(x) for x in query],
            top_k=k,
        ).to_df()
    except Exception as error:  # any failure is the answer: Feast cannot search here
        return f"{type(error).__name__}: {error}"
    return None
