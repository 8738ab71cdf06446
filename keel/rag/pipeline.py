"""From documents to a finished index version, as plain functions the assets call in turn.

Layout under the RAG root (an artefact folder)::

    documents/<section>.parquet   rendered pages of one corpus section, with content hashes
    vector_cache/<model>.parquet  vectors by hash of the embedded text, reused across builds
    index/<version>/              one index version (see keel.rag.index)
    published.json                the version serving answers from, once it passed its gate
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from keel.files import atomic_write
from keel.rag.chunking import Chunk, ChunkerSettings, chunk_corpus
from keel.rag.corpus import (
    Document,
    Section,
    doc_id_for,
    document_from_bytes,
    page_files,
    read_source,
)
from keel.rag.corpus import content_hash as hash_bytes
from keel.rag.embeddings import Embedder
from keel.rag.index import IndexSettings, build_index, version_of

PUBLISHED = "published.json"
Chunker = Callable[[list[Document], ChunkerSettings], list[Chunk]]


def atomic_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    atomic_write(path, json.dumps(payload, indent=2, sort_keys=True))


def _write_parquet(frame, path: Path) -> None:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write(path, buffer.getvalue())


def _rows(documents: list[Document]) -> list[dict[str, Any]]:
    return [
        {
            "doc_id": d.doc_id,
            "title": d.title,
            "text": d.text,
            "content_hash": d.content_hash,
            "sections": json.dumps([asdict(s) for s in d.sections]),
        }
        for d in documents
    ]


def _documents(frame) -> list[Document]:
    return [
        Document(
            doc_id=row["doc_id"],
            title=row["title"],
            text=row["text"],
            content_hash=row["content_hash"],
            sections=tuple(Section(**s) for s in json.loads(row["sections"])),
        )
        for row in frame.to_dict("records")
    ]


def ingest_section(
    source_root: Path, section: str, store: Path, exclude: tuple[str, ...] = ()
) -> dict[str, int]:
    """Render the pages of one section into ``store/documents/<section>.parquet``.

    A page whose source bytes hash as before keeps its stored rendering without being
    parsed again; pages gone from the source are dropped. Returns the counts by outcome.
    """
    import pandas as pd

    target = store / "documents" / f"{section}.parquet"
    previous: dict[str, Document] = {}
    if target.exists():
        previous = {d.doc_id: d for d in _documents(pd.read_parquet(target))}
    counts = {"new": 0, "changed": 0, "unchanged": 0, "aliases_skipped": 0}
    documents = []
    for path in page_files(source_root, section, exclude):
        doc_id = doc_id_for(source_root, path)
        source = read_source(path)
        digest = hash_bytes(source)
        old = previous.get(doc_id)
        if old is not None and old.content_hash == digest:
            counts["unchanged"] += 1
            documents.append(old)
            continue
        document = document_from_bytes(doc_id, source)
        if document is None:
            counts["aliases_skipped"] += 1
            continue
        counts["changed" if old is not None else "new"] += 1
        documents.append(document)
    counts["removed"] = len(set(previous) - {d.doc_id for d in documents})
    counts["documents"] = len(documents)
    if counts["new"] or counts["changed"] or counts["removed"] or not target.exists():
        frame = pd.DataFrame(
            _rows(documents), columns=["doc_id", "title", "text", "content_hash", "sections"]
        )
        _write_parquet(frame, target)
    return counts


def stored_documents(store: Path) -> list[Document]:
    """Every ingested document, sorted by id."""
    import pandas as pd

    files = sorted((store / "documents").glob("*.parquet"))
    documents = [d for f in files for d in _documents(pd.read_parquet(f))]
    return sorted(documents, key=lambda d: d.doc_id)


def corpus_hash(documents: list[Document]) -> str:
    """One hash over every document id and content hash."""
    digest = hashlib.sha256()
    for document in sorted(documents, key=lambda d: d.doc_id):
        digest.update(f"{document.doc_id}\0{document.content_hash}\n".encode())
    return digest.hexdigest()


def embed_chunks(
    chunks: list[Chunk], embedder: Embedder, cache_dir: Path | None = None
) -> tuple[np.ndarray, int]:
    """Vectors of ``chunks`` in order, and how many had to be computed (the rest were cached)."""
    import pandas as pd

    texts = [c.embedding_text() for c in chunks]
    keys = [hashlib.sha256(t.encode()).hexdigest()[:32] for t in texts]
    cached: dict[str, np.ndarray] = {}
    cache_file = cache_dir / f"{embedder.model_hash[:16]}.parquet" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        frame = pd.read_parquet(cache_file)
        cached = dict(zip(frame["key"], frame["vector"], strict=True))
    missing = sorted({k for k in keys if k not in cached})
    if missing:
        position = {k: i for i, k in enumerate(keys)}
        fresh = embedder.embed([texts[position[k]] for k in missing])
        cached.update(zip(missing, fresh, strict=True))
    vectors = (
        np.stack([np.asarray(cached[k], dtype=np.float32) for k in keys])
        if keys
        else (np.zeros((0, embedder.dimension), dtype=np.float32))
    )
    if cache_file is not None and missing:
        live = set(keys)
        kept = {k: v for k, v in cached.items() if k in live}
        frame = pd.DataFrame({"key": list(kept), "vector": [list(v) for v in kept.values()]})
        _write_parquet(frame, cache_file)
    return vectors, len(missing)


def lineage(
    documents: list[Document],
    settings: ChunkerSettings,
    embedder: Embedder,
    index_settings: IndexSettings,
    chunker_name: str = "structure-aware",
) -> dict[str, Any]:
    """What an index version is made of; its hash is the version."""
    return {
        "corpus_hash": corpus_hash(documents),
        "documents": len(documents),
        "chunker": chunker_name,
        "chunker_settings": asdict(settings),
        "embedding_model": embedder.name,
        "embedding_model_hash": embedder.model_hash,
        "index_settings": asdict(index_settings),
    }


def build_version(
    store: Path,
    documents: list[Document],
    embedder: Embedder,
    settings: ChunkerSettings | None = None,
    index_settings: IndexSettings | None = None,
    chunker: Chunker = chunk_corpus,
    chunker_name: str = "structure-aware",
) -> dict[str, Any]:
    """Chunk, embed and index ``documents`` as one version under ``store/index``."""
    settings = settings or ChunkerSettings()
    index_settings = index_settings or IndexSettings()
    chunks = chunker(documents, settings)
    vectors, computed = embed_chunks(chunks, embedder, store / "vector_cache")
    made_of = lineage(documents, settings, embedder, index_settings, chunker_name)
    version = version_of(made_of)
    manifest = build_index(store / "index" / version, chunks, vectors, made_of, index_settings)
    manifest["vectors_computed"] = computed
    return manifest


def published(store: Path) -> dict[str, Any] | None:
    """The published version's record (version, recall@5, when), or None before the first."""
    path = store / PUBLISHED
    return json.loads(path.read_text()) if path.exists() else None


def publish(store: Path, record: dict[str, Any]) -> None:
    """Make ``record['version']`` the version answers come from."""
    atomic_json(store / PUBLISHED, record)
