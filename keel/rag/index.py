"""Index versions: chunks, their vectors, a faiss index and a BM25 index in one folder.

An index version is named by the hash of what made it (corpus hash, chunker settings,
embedding model hash, index settings), so rebuilding from the same inputs gives the same
version. The folder holds ``chunks.parquet`` (text and offsets), ``vectors.npy``,
``vectors.faiss``, ``bm25/`` and ``manifest.json``; the manifest is written last, so a
folder without one is an unfinished build and is never loaded.

Retrieval: ``vector`` (faiss HNSW over inner products of normalised vectors), ``bm25``
(bm25s), or ``hybrid`` (the two rankings fused by reciprocal rank).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from keel.files import atomic_write
from keel.rag.chunking import Chunk

MODES = ("vector", "bm25", "hybrid")
MANIFEST = "manifest.json"
# Reciprocal rank fusion's constant: 60 is the value of the paper that proposed it.
RRF_K = 60


class IndexVersionError(RuntimeError):
    """An index version is missing, unfinished or does not match its manifest."""


@dataclass(frozen=True)
class IndexSettings:
    """faiss HNSW parameters; ``kind='flat'`` searches exhaustively."""

    kind: str = "hnsw"
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128

    def __post_init__(self) -> None:
        if self.kind not in ("hnsw", "flat"):
            raise ValueError(f"index kind must be 'hnsw' or 'flat', got {self.kind!r}")


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk and its score (cosine for vector search, fused rank otherwise)."""

    chunk: Chunk
    score: float
    similarity: float


def version_of(lineage: dict[str, Any]) -> str:
    """The version name of an index made of ``lineage``."""
    return hashlib.sha256(json.dumps(lineage, sort_keys=True).encode()).hexdigest()[:16]


def _faiss_index(vectors: np.ndarray, settings: IndexSettings):
    import faiss

    dimension = vectors.shape[1]
    if settings.kind == "flat":
        index = faiss.IndexFlatIP(dimension)
    else:
        index = faiss.IndexHNSWFlat(dimension, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.ef_construction
        index.hnsw.efSearch = settings.ef_search
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def _tokens(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


def build_index(
    folder: Path,
    chunks: list[Chunk],
    vectors: np.ndarray,
    lineage: dict[str, Any],
    settings: IndexSettings | None = None,
) -> dict[str, Any]:
    """Write one index version into ``folder``; returns its manifest."""
    import bm25s
    import faiss
    import pandas as pd

    settings = settings or IndexSettings()
    if len(chunks) != len(vectors) or not chunks:
        raise IndexVersionError(
            f"{len(chunks)} chunks but {len(vectors)} vectors: nothing consistent"
        )
    manifest = {
        "version": folder.name,
        "chunks": len(chunks),
        "dimension": int(vectors.shape[1]),
        "index_settings": asdict(settings),
        "lineage": lineage,
    }
    text = json.dumps(manifest, indent=2, sort_keys=True)
    held = folder / MANIFEST
    if held.is_file() and json.loads(held.read_text()) == json.loads(text):
        # The same lineage makes the same files: a finished version (perhaps the one being
        # served) is kept, not rewritten under its readers.
        return json.loads(text)
    folder.mkdir(parents=True, exist_ok=True)
    held.unlink(missing_ok=True)
    pd.DataFrame([asdict(c) for c in chunks]).to_parquet(folder / "chunks.parquet", index=False)
    np.save(folder / "vectors.npy", vectors.astype(np.float32))
    faiss.write_index(_faiss_index(vectors, settings), str(folder / "vectors.faiss"))
    bm25 = bm25s.BM25()
    bm25.index(_tokens([c.embedding_text() for c in chunks]), show_progress=False)
    bm25.save(str(folder / "bm25"))
    atomic_write(held, text)
    return manifest


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-k by inner product: the reference the index is measured against."""
    scores = queries @ vectors.T
    top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


class Index:
    """A loaded index version: search by vector, BM25 or both."""

    def __init__(self, folder: Path) -> None:
        import bm25s
        import faiss
        import pandas as pd

        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise IndexVersionError(f"{folder} holds no finished index version (no {MANIFEST})")
        self.folder = folder
        self.manifest = json.loads(manifest_path.read_text())
        self.version: str = self.manifest["version"]
        frame = pd.read_parquet(folder / "chunks.parquet")
        self.chunks = [Chunk(**row) for row in frame.to_dict("records")]
        self.vectors = np.load(folder / "vectors.npy")
        self.faiss = faiss.read_index(str(folder / "vectors.faiss"))
        if hasattr(self.faiss, "hnsw"):
            self.faiss.hnsw.efSearch = self.manifest["index_settings"]["ef_search"]
        self.bm25 = bm25s.BM25.load(str(folder / "bm25"))
        if not len(self.chunks) == len(self.vectors) == self.faiss.ntotal:
            raise IndexVersionError(
                f"{folder}: {len(self.chunks)} chunks, {len(self.vectors)} vectors, "
                f"{self.faiss.ntotal} indexed; rebuild this version"
            )
        # One query at a time per index: bm25s is not documented as safe across threads.
        self._bm25_lock = threading.Lock()

    def vector_ids(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.faiss.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return ids, scores

    def bm25_ids(self, query: str, k: int) -> list[int]:
        """The ``k`` best BM25 matches with a score above zero, best first."""
        tokens = _tokens([query])[0]
        with self._bm25_lock:
            scores = self.bm25.get_scores(tokens) if tokens else np.zeros(0)
        # Only chunks sharing a word with the query can rank. Of those, keep every one scoring
        # at least the k-th best (ties included), then order by score and position: the same
        # result as a stable sort of all of them, without sorting thousands.
        matched = np.flatnonzero(scores)
        values = scores[matched]
        if len(matched) > k:
            kth = np.partition(values, len(values) - k)[len(values) - k]
            keep = values >= kth
            matched, values = matched[keep], values[keep]
        return [int(i) for i in matched[np.lexsort((matched, -values))[:k]]]

    def search(self, query: str, query_vector: np.ndarray, k: int = 5, mode: str = "hybrid"):
        """The top ``k`` chunks for one query; ``similarity`` is always the cosine."""
        if mode not in MODES:
            raise ValueError(f"retrieval mode must be one of {MODES}, got {mode!r}")
        depth = k if mode == "vector" else max(4 * k, 20)
        ranked: dict[int, float] = {}
        if mode in ("vector", "hybrid"):
            ids, scores = self.vector_ids(query_vector[None, :], depth)
            for rank, (i, score) in enumerate(zip(ids[0], scores[0], strict=True)):
                if i >= 0:
                    ranked[int(i)] = float(score) if mode == "vector" else 1.0 / (RRF_K + rank)
        if mode in ("bm25", "hybrid"):
            for rank, i in enumerate(self.bm25_ids(query, depth)):
                ranked[i] = ranked.get(i, 0.0) + 1.0 / (RRF_K + rank)
        best = sorted(ranked.items(), key=lambda item: -item[1])[:k]
        return [
            Hit(self.chunks[i], score, float(self.vectors[i] @ query_vector)) for i, score in best
        ]
