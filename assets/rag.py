"""RAG assets: manual pages -> chunks -> embeddings -> index -> evaluation -> published index.

The maths lives in ``keel.rag``. ``documents`` is partitioned by manual section; the rest
work on the whole corpus. An index version is published only after its evaluation passes
the recall@5 gate; ``published_index`` re-reads that verdict itself, because a blocking
check only stops steps of its own run.
"""

import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from keel.files import LOCAL_PROTOCOLS, atomic_write
from keel.rag.corpus import DEFAULT_SOURCE_DIR, SECTIONS
from keel.rag.evaluation import DEFAULT_MAX_RECALL_DROP, DEFAULT_MIN_RECALL_AT_5
from keel.schema import FIRST_DAY
from orchestration.resources import ArtefactStore, MlflowResource

GROUP = "rag"
SECTION_PARTITIONS = dg.StaticPartitionsDefinition(list(SECTIONS))
# Today's partition exists too: the report runs shortly before the day ends.
RAG_DAILY = dg.DailyPartitionsDefinition(start_date=FIRST_DAY, end_offset=1)
CANDIDATE = "candidate.json"


class CorpusConfig(dg.Config):
    """Where the manual pages are read from."""

    source_dir: str = Field(default=str(DEFAULT_SOURCE_DIR), description="man1..man8 root.")
    exclude: list[str] = Field(
        default=["gcloud"], description="Page name prefixes left out (generated references)."
    )


class IndexConfig(dg.Config):
    """How chunks are cut, embedded and indexed; all of it is the index's lineage."""

    max_chars: int = 900
    overlap: int = 150
    embedding_provider: str = "wordllama"
    embedding_model: str = ""
    embedding_url: str = ""
    index_kind: str = "hnsw"
    feast: bool = Field(default=True, description="Also load the chunks into Feast's store.")


class EvaluationConfig(IndexConfig):
    """The index settings to evaluate with, and the recall@5 gate."""

    max_recall_drop: float = DEFAULT_MAX_RECALL_DROP
    min_recall_at_5: float = DEFAULT_MIN_RECALL_AT_5


def rag_store(artefacts: ArtefactStore) -> Path:
    """The RAG folder under the artefact root (a local path: faiss and bm25s need files)."""
    target = artefacts.path("rag", "documents")
    if target.protocol not in LOCAL_PROTOCOLS:
        # target.path of s3://bucket/... is bucket/...: files would land under the working folder.
        raise dg.Failure(
            "the RAG assets need a local artefact folder (faiss and bm25s read and write "
            f"files there); this profile's artefact store is {artefacts.root}"
        )
    return Path(target.path).parent


def _embedder(config: IndexConfig):
    from keel.rag.embeddings import EmbeddingConfig, embedder

    return embedder(
        EmbeddingConfig(config.embedding_provider, config.embedding_model, config.embedding_url)
    )


@dg.asset(partitions_def=SECTION_PARTITIONS, group_name=GROUP, kinds={"parquet"})
def documents(
    context: dg.AssetExecutionContext, config: CorpusConfig, artefacts: ArtefactStore
) -> dg.MaterializeResult:
    """Manual pages of one section rendered to text with their headings; unchanged ones kept."""
    from keel.rag.corpus import check_root
    from keel.rag.pipeline import ingest_section

    root = Path(config.source_dir)
    check_root(root)
    counts = ingest_section(
        root, context.partition_key, rag_store(artefacts), tuple(config.exclude)
    )
    return dg.MaterializeResult(
        metadata={name: dg.MetadataValue.int(value) for name, value in counts.items()}
    )


@dg.asset(deps=[documents], group_name=GROUP, kinds={"parquet"})
def chunks(config: IndexConfig, artefacts: ArtefactStore) -> dg.MaterializeResult:
    """Structure-aware chunks of every ingested page, with section and character offsets."""
    import pandas as pd

    from keel.rag.chunking import ChunkerSettings, chunk_corpus
    from keel.rag.pipeline import stored_documents

    store = rag_store(artefacts)
    pages = stored_documents(store)
    if not pages:
        raise dg.Failure("no documents ingested yet: materialise documents first")
    pieces = chunk_corpus(pages, ChunkerSettings(config.max_chars, config.overlap))
    frame = pd.DataFrame([c.__dict__ for c in pieces])
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write(store / "chunks.parquet", buffer.getvalue())
    return dg.MaterializeResult(
        metadata={
            "chunks": dg.MetadataValue.int(len(pieces)),
            "documents": dg.MetadataValue.int(len(pages)),
            "mean_chars": dg.MetadataValue.float(float(frame["text"].str.len().mean())),
        }
    )


def _stored_chunks(store: Path):
    import pandas as pd

    from keel.rag.chunking import Chunk

    return [Chunk(**row) for row in pd.read_parquet(store / "chunks.parquet").to_dict("records")]


@dg.asset(deps=[chunks], group_name=GROUP, kinds={"numpy"})
def embeddings(config: IndexConfig, artefacts: ArtefactStore) -> dg.MaterializeResult:
    """One vector per chunk; vectors of unchanged chunk texts come from the vector cache."""
    import numpy as np

    from keel.rag.pipeline import embed_chunks

    store = rag_store(artefacts)
    model = _embedder(config)
    vectors, computed = embed_chunks(_stored_chunks(store), model, store / "vector_cache")
    buffer = io.BytesIO()
    np.save(buffer, vectors)
    atomic_write(store / "embeddings.npy", buffer.getvalue())
    return dg.MaterializeResult(
        metadata={
            "vectors": dg.MetadataValue.int(len(vectors)),
            "computed": dg.MetadataValue.int(computed),
            "reused": dg.MetadataValue.int(len(vectors) - computed),
            "model": dg.MetadataValue.text(model.name),
            "model_hash": dg.MetadataValue.text(model.model_hash[:16]),
        }
    )


@dg.asset(deps=[embeddings], group_name=GROUP, kinds={"faiss"})
def vector_index(config: IndexConfig, artefacts: ArtefactStore) -> dg.MaterializeResult:
    """A candidate index version (faiss HNSW + BM25) named by the hash of its lineage."""
    import numpy as np

    from keel.rag.chunking import ChunkerSettings
    from keel.rag.index import IndexSettings, build_index, version_of
    from keel.rag.pipeline import atomic_json, lineage, stored_documents

    store = rag_store(artefacts)
    settings = ChunkerSettings(config.max_chars, config.overlap)
    index_settings = IndexSettings(kind=config.index_kind)
    made_of = lineage(stored_documents(store), settings, _embedder(config), index_settings)
    version = version_of(made_of)
    manifest = build_index(
        store / "index" / version,
        _stored_chunks(store),
        np.load(store / "embeddings.npy"),
        made_of,
        index_settings,
    )
    feast_rows = 0
    if config.feast:
        from keel.rag.feature_store import write_chunks

        feast_rows = write_chunks(store / "feast", store / "index" / version)["rows"]
    atomic_json(store / CANDIDATE, {"version": version})
    return dg.MaterializeResult(
        metadata={
            "version": dg.MetadataValue.text(version),
            "feast_rows": dg.MetadataValue.int(feast_rows),
            "chunks": dg.MetadataValue.int(manifest["chunks"]),
            "corpus_hash": dg.MetadataValue.text(made_of["corpus_hash"][:16]),
            "embedding_model_hash": dg.MetadataValue.text(made_of["embedding_model_hash"][:16]),
        }
    )


def evaluate_version(store: Path, version: str, config: IndexConfig) -> dict[str, Any]:
    """recall@k and MRR of one index version on the labelled questions (hybrid retrieval)."""
    from keel.rag.evaluation import evaluate, load_questions
    from keel.rag.index import Index

    index = Index(store / "index" / version)
    model = _embedder(config)

    def retrieve(question: str, k: int):
        return [h.chunk for h in index.search(question, model.embed([question])[0], k)]

    return evaluate(load_questions(), retrieve)


@dg.asset(deps=[vector_index], group_name=GROUP, kinds={"python"})
def retrieval_evaluation(
    config: EvaluationConfig, artefacts: ArtefactStore
) -> dg.MaterializeResult:
    """The candidate index's recall@k and MRR, and its gate verdict against the published one."""
    from keel.rag.evaluation import recall_gate
    from keel.rag.pipeline import atomic_json, published

    store = rag_store(artefacts)
    version = json.loads((store / CANDIDATE).read_text())["version"]
    result = evaluate_version(store, version, config)
    current = published(store)
    passed, reason = recall_gate(
        result["recall_at_5"],
        current.get("recall_at_5") if current else None,
        config.max_recall_drop,
        config.min_recall_at_5,
    )
    summary = {
        **{k: v for k, v in result.items() if k != "ranks"},
        "version": version,
        "published_version": current["version"] if current else None,
        "gate_passed": passed,
        "gate_reason": reason,
    }
    atomic_json(store / "index" / version / "evaluation.json", summary)
    return dg.MaterializeResult(
        metadata={
            "version": dg.MetadataValue.text(version),
            **{
                key: dg.MetadataValue.float(float(value))
                for key, value in summary.items()
                if key.startswith(("recall_at_", "mrr_at_"))
            },
            "gate_passed": dg.MetadataValue.bool(passed),
            "gate_reason": dg.MetadataValue.text(reason),
        }
    )


@dg.asset_check(asset=retrieval_evaluation, blocking=True)
def recall_at_5_gate(artefacts: ArtefactStore) -> dg.AssetCheckResult:
    """recall@5 did not fall more than the allowed bound below the published index's."""
    store = rag_store(artefacts)
    version = json.loads((store / CANDIDATE).read_text())["version"]
    summary = json.loads((store / "index" / version / "evaluation.json").read_text())
    return dg.AssetCheckResult(
        passed=bool(summary["gate_passed"]),
        description=summary["gate_reason"],
        metadata={"version": version, "recall_at_5": float(summary["recall_at_5"])},
    )


@dg.asset(deps=[retrieval_evaluation], group_name=GROUP, kinds={"mlflow"})
def published_index(artefacts: ArtefactStore, mlflow: MlflowResource) -> dg.MaterializeResult:
    """The index version answers come from, registered with its lineage once it passed its gate."""
    from keel.rag.pipeline import publish
    from keel.rag.registry import EXPERIMENT, register_index

    store = rag_store(artefacts)
    version = json.loads((store / CANDIDATE).read_text())["version"]
    folder = store / "index" / version
    summary = json.loads((folder / "evaluation.json").read_text())
    if not summary["gate_passed"] or summary["version"] != version:
        raise dg.Failure(
            f"index {version} failed its gate, not published: {summary['gate_reason']}"
        )
    manifest = json.loads((folder / "manifest.json").read_text())
    experiment = mlflow.configure(EXPERIMENT)
    with mlflow.write_lock():
        registered = register_index(mlflow.tracking_uri, experiment, manifest, summary)
    publish(
        store,
        {
            "version": version,
            "recall_at_5": summary["recall_at_5"],
            "registered_version": registered,
            "published_at": datetime.now(UTC).isoformat(),
        },
    )
    return dg.MaterializeResult(
        metadata={
            "version": dg.MetadataValue.text(version),
            "registered_version": dg.MetadataValue.text(str(registered)),
            "recall_at_5": dg.MetadataValue.float(float(summary["recall_at_5"])),
        }
    )


@dg.asset(deps=[published_index], group_name=GROUP, kinds={"python"})
def answers(artefacts: ArtefactStore) -> dg.MaterializeResult:
    """The labelled questions answered from the published index, twice: answers and cache use."""
    from keel.rag.engine import EngineSettings, RagEngine
    from keel.rag.evaluation import load_questions

    store = rag_store(artefacts)
    engine = RagEngine(EngineSettings(store=str(store)), log_dir=store / "answer_runs")
    questions = load_questions()
    first = [engine.ask(q.question) for q in questions]
    for q in questions:
        engine.ask(q.question)
    cited = [a for a in first if not a["refused"]]
    stats = engine.cache.stats.as_dict()
    return dg.MaterializeResult(
        metadata={
            "questions": dg.MetadataValue.int(len(questions)),
            "answered_share": dg.MetadataValue.float(len(cited) / len(questions)),
            "cache_hit_rate": dg.MetadataValue.float(stats["hit_rate"]),
            "tokens_saved": dg.MetadataValue.int(stats["tokens_saved"]),
            "cost_saved_usd": dg.MetadataValue.float(stats["cost_saved_usd"]),
            "example": dg.MetadataValue.md(
                f"**{questions[0].question}**\n\n{first[0]['answer']}\n\n"
                + "\n".join(f"- [{c['n']}] {c['chunk_id']}" for c in first[0]["citations"])
            ),
        }
    )


@dg.asset(partitions_def=RAG_DAILY, group_name=GROUP, kinds={"evidently"})
def rag_monitoring(
    context: dg.AssetExecutionContext, config: IndexConfig, artefacts: ArtefactStore
) -> dg.MaterializeResult:
    """One day's questions: embedding drift against the corpus, unanswered share, cache hits."""
    from keel.rag.engine import ASK_LOG_DIRNAME, read_ask_log
    from keel.rag.index import Index
    from keel.rag.monitoring import daily_report
    from keel.rag.pipeline import atomic_json, published

    store = rag_store(artefacts)
    current = published(store)
    if current is None:
        raise dg.Failure("no published index to monitor")
    day = context.partition_key
    records = read_ask_log(store / ASK_LOG_DIRNAME, day)
    index = Index(store / "index" / current["version"])
    vectors = _embedder(config).embed([r["question"] for r in records])
    report = {"day": day, **daily_report(records, vectors, index.vectors)}
    atomic_json(store / "reports" / f"{day}.json", report)
    drift = report["embedding_drift"] or {}
    return dg.MaterializeResult(
        metadata={
            "questions": dg.MetadataValue.int(report["questions"]),
            "unanswered_share": dg.MetadataValue.float(report["unanswered_share"]),
            "cache_hit_rate": dg.MetadataValue.float(report["cache_hit_rate"]),
            "drift_distance": dg.MetadataValue.float(drift.get("distance", {}).get("score", 0.0)),
            "drift_model_auc": dg.MetadataValue.float(drift.get("model", {}).get("score", 0.0)),
        }
    )


documents_job = dg.define_asset_job("rag_documents", selection=[documents])
index_job = dg.define_asset_job(
    "rag_index",
    selection=dg.AssetSelection.assets(
        chunks, embeddings, vector_index, retrieval_evaluation, published_index, answers
    ),
)
monitoring_job = dg.define_asset_job("rag_monitoring_daily", selection=[rag_monitoring])


def _section_fingerprint(root: Path, section: str, exclude: tuple[str, ...]) -> str:
    import hashlib

    from keel.rag.corpus import page_files

    stamps = "\n".join(
        f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in page_files(root, section, exclude)
    )
    return hashlib.sha256(stamps.encode()).hexdigest()[:16]


def manual_pages_sensor(corpus: CorpusConfig, name: str = "new_manual_pages"):
    """A sensor that re-ingests a section of ``corpus`` when a page in it changed."""

    @dg.sensor(name=name, job=documents_job, minimum_interval_seconds=300)
    def sensor(context: dg.SensorEvaluationContext):
        """Ingest a manual section again when a page in it was added, changed or removed."""
        root, exclude = Path(corpus.source_dir), tuple(corpus.exclude)
        if not root.is_dir():
            return dg.SkipReason(f"{root} does not exist")
        seen = json.loads(context.cursor) if context.cursor else {}
        current = {
            s: _section_fingerprint(root, s, exclude) for s in SECTIONS if (root / s).is_dir()
        }
        changed = [s for s, stamp in current.items() if seen.get(s) != stamp]
        context.update_cursor(json.dumps(current))
        if not changed:
            return dg.SkipReason("no manual section changed")
        return [
            dg.RunRequest(
                run_key=f"{s}-{current[s]}",
                partition_key=s,
                run_config=dg.RunConfig(ops={"documents": corpus}),
            )
            for s in changed
        ]

    return sensor


new_manual_pages = manual_pages_sensor(CorpusConfig())


RAG_JOBS = [documents_job, index_job, monitoring_job]
RAG_SENSORS = [new_manual_pages]
RAG_SCHEDULES = [
    dg.ScheduleDefinition(job=index_job, cron_schedule="30 3 * * *", name="rag_index_daily"),
    dg.build_schedule_from_partitioned_job(monitoring_job, hour_of_day=23, minute_of_hour=50),
]
