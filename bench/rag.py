"""RAG over the installed manual pages: indexing speed, retrieval latency and recall.

Candidate: the faiss HNSW index (and hybrid retrieval) that serving uses. Baseline, side by
side on the same vectors and queries: exact brute-force search. ``recall_vs_exact`` is the
share of the exact top 5 that the index returns; below 0.95 the run fails. Queries are the
labelled questions plus the opening words of randomly drawn chunks. The cached-answer
latency compares asking the labelled questions a second time with the first time; the run
fails if a cached answer differs from the one first given.

Environment: ``KEEL_BENCH_RAG_ROOT`` (default /usr/share/man), ``KEEL_BENCH_RAG_QUERIES``,
``KEEL_BENCH_RAG_KEEP`` (a folder to build in and keep, for looking at the index afterwards).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import Stopwatch, peak_rss_mb, require_same_answers, write_result

EXCLUDE = ("gcloud",)
K = 5


def _percentiles(samples: list[float]) -> tuple[float, float]:
    values = np.asarray(samples) * 1000
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def main() -> None:
    from keel.rag.chunking import ChunkerSettings
    from keel.rag.corpus import SECTIONS, check_root
    from keel.rag.embeddings import embedder
    from keel.rag.engine import EngineSettings, RagEngine
    from keel.rag.evaluation import evaluate, load_questions
    from keel.rag.index import Index, IndexSettings, exact_search
    from keel.rag.pipeline import build_version, ingest_section, publish, stored_documents

    root = Path(os.environ.get("KEEL_BENCH_RAG_ROOT", "/usr/share/man"))
    extra_queries = int(os.environ.get("KEEL_BENCH_RAG_QUERIES", "500"))
    check_root(root)
    model = embedder()
    questions = load_questions()
    keep = os.environ.get("KEEL_BENCH_RAG_KEEP")
    with tempfile.TemporaryDirectory(prefix="keel-bench-rag-") as folder:
        store = Path(keep or folder)
        ingest, build = Stopwatch(), Stopwatch()
        with ingest.time():
            for section in SECTIONS:
                ingest_section(root, section, store, EXCLUDE)
        documents = stored_documents(store)
        settings, index_settings = ChunkerSettings(), IndexSettings()
        with build.time():
            manifest = build_version(store, documents, model, settings, index_settings)
        index = Index(store / "index" / manifest["version"])
        chunks = len(index.chunks)

        rng = np.random.default_rng(0)
        drawn = rng.choice(chunks, size=min(extra_queries, chunks), replace=False)
        texts = [q.question for q in questions] + [
            " ".join(index.chunks[i].text.split()[:12]) for i in drawn
        ]
        vectors = model.embed(texts)
        exact = exact_search(index.vectors, vectors, K)
        found, _ = index.vector_ids(vectors, K)
        recall_vs_exact = float(
            np.mean([len(set(a) & set(b)) / K for a, b in zip(exact, found, strict=True)])
        )
        timings: dict[str, list[float]] = {"vector": [], "exact": [], "hybrid": [], "bm25": []}
        for text, vector in zip(texts, vectors, strict=True):
            for mode in ("vector", "hybrid", "bm25"):
                start = time.perf_counter()
                index.search(text, vector, K, mode)
                timings[mode].append(time.perf_counter() - start)
            start = time.perf_counter()
            exact_search(index.vectors, vector[None, :], K)
            timings["exact"].append(time.perf_counter() - start)
        embed_times = []
        for text in texts[:200]:
            start = time.perf_counter()
            model.embed([text])
            embed_times.append(time.perf_counter() - start)
        latency = {mode: _percentiles(samples) for mode, samples in timings.items()}

        labelled = {}
        for mode in ("vector", "bm25", "hybrid"):

            def retrieve(question: str, k: int, mode: str = mode):
                return [
                    h.chunk for h in index.search(question, model.embed([question])[0], k, mode)
                ]

            labelled[mode] = evaluate(questions, retrieve)

        publish(store, {"version": index.version})
        engine = RagEngine(EngineSettings(store=str(store)))
        first, second, same = [], [], True
        for question in questions:
            start = time.perf_counter()
            answer = engine.ask(question.question)
            first.append(time.perf_counter() - start)
            start = time.perf_counter()
            again = engine.ask(question.question)
            second.append(time.perf_counter() - start)
            if not answer["refused"]:
                same &= again["cache"] == "exact" and again["answer"] == answer["answer"]
        uncached, cached = _percentiles(first), _percentiles(second)

    present = {d.doc_id for d in documents}
    figures = {
        "chunks_indexed_per_s": round(chunks / build.seconds, 1),
        "documents_ingested_per_s": round(len(documents) / ingest.seconds, 1),
        "recall_vs_exact": round(recall_vs_exact, 4),
        "retrieval_p50_ms": round(latency["hybrid"][0], 3),
        "retrieval_p99_ms": round(latency["hybrid"][1], 3),
        "vector_p50_ms": round(latency["vector"][0], 3),
        "vector_p99_ms": round(latency["vector"][1], 3),
        "bm25_p99_ms": round(latency["bm25"][1], 3),
        "exact_p50_ms": round(latency["exact"][0], 3),
        "exact_p99_ms": round(latency["exact"][1], 3),
        "vector_p99_vs_exact": round(latency["vector"][1] / latency["exact"][1], 3),
        "query_embedding_p99_ms": round(_percentiles(embed_times)[1], 3),
        "labelled_recall_at_5": round(labelled["hybrid"]["recall_at_5"], 4),
        "labelled_recall_at_5_vector": round(labelled["vector"]["recall_at_5"], 4),
        "labelled_recall_at_5_bm25": round(labelled["bm25"]["recall_at_5"], 4),
        "labelled_mrr_at_10": round(labelled["hybrid"]["mrr_at_10"], 4),
        "answer_p50_ms": round(uncached[0], 3),
        "cached_answer_p50_ms": round(cached[0], 3),
        "cached_answer_p99_ms": round(cached[1], 3),
        "cached_vs_uncached_p50": round(cached[0] / uncached[0], 4),
        "cache": engine.cache.stats.as_dict(),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "params": {
            "corpus_root": str(root),
            "excluded_prefixes": list(EXCLUDE),
            "documents": len(documents),
            "chunks": chunks,
            "chunker": manifest["lineage"]["chunker_settings"],
            "index": manifest["index_settings"],
            "embedding_model": manifest["lineage"]["embedding_model"],
            "k": K,
            "queries": len(texts),
            "labelled_questions": len(questions),
            "ingest_s": round(ingest.seconds, 2),
            "build_s": round(build.seconds, 2),
            "cpus": os.cpu_count(),
        },
    }
    write_result("rag", figures)
    require_same_answers(
        "rag",
        {
            "index_recall_vs_exact_at_least_0.95": recall_vs_exact >= 0.95,
            "labelled_pages_in_corpus": all(q.doc_id in present for q in questions),
            "cached_answers_same_as_first": same,
        },
    )


if __name__ == "__main__":
    main()
