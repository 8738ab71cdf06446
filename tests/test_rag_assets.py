"""The rag assets on the shipped slice: gate, registry, cache invalidation, guardrails."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import dagster as dg
import numpy as np
import pytest

from assets import rag
from keel.rag.cache import AnswerCache
from keel.rag.corpus import SLICE_DIR
from keel.rag.generation import strip_secrets

INDEX_ASSETS = [
    rag.chunks,
    rag.embeddings,
    rag.vector_index,
    rag.retrieval_evaluation,
    rag.published_index,
    rag.answers,
    rag.recall_at_5_gate,
]


def _run_config(max_chars: int = 900, overlap: int = 150, min_recall: float = 0.6):
    index = rag.IndexConfig(max_chars=max_chars, overlap=overlap)
    return dg.RunConfig(
        ops={
            "chunks": index,
            "embeddings": index,
            "vector_index": index,
            "retrieval_evaluation": rag.EvaluationConfig(
                max_chars=max_chars, overlap=overlap, min_recall_at_5=min_recall
            ),
        }
    )


@pytest.fixture
def resources(keel_home):
    from orchestration.profiles import resources_for

    local = resources_for("local")
    return {"artefacts": local["artefacts"], "mlflow": local["mlflow"]}


def _ingest(resources):
    for section in ("man2", "man7"):
        result = dg.materialize(
            [rag.documents],
            partition_key=section,
            resources=resources,
            run_config=dg.RunConfig(ops={"documents": rag.CorpusConfig(source_dir=str(SLICE_DIR))}),
        )
        assert result.success


@pytest.mark.slow
def test_pipeline_publishes_a_gated_registered_index_and_refuses_a_worse_one(resources):
    from mlflow import MlflowClient

    from keel.rag.engine import EngineSettings, RagEngine
    from keel.rag.registry import REGISTERED_NAME

    _ingest(resources)
    first = dg.materialize(INDEX_ASSETS, resources=resources, run_config=_run_config())
    assert first.success
    answered = first.asset_materializations_for_node("answers")[0].metadata
    assert answered["cache_hit_rate"].value == 0.5 and answered["tokens_saved"].value > 0
    assert answered["answered_share"].value > 0.8
    store = rag.rag_store(resources["artefacts"])
    published = json.loads((store / "published.json").read_text())
    checks = first.get_asset_check_evaluations()
    assert [c.passed for c in checks] == [True]
    assert published["recall_at_5"] >= 0.8
    client = MlflowClient(tracking_uri=resources["mlflow"].tracking_uri)
    registered = client.get_model_version_by_alias(REGISTERED_NAME, "published")
    assert registered.tags["index_version"] == published["version"]
    assert registered.tags["lineage.chunker_settings.max_chars"] == "900"
    assert len(registered.tags["lineage.corpus_hash"]) == 64
    assert len(registered.tags["lineage.embedding_model_hash"]) == 64

    engine = RagEngine(EngineSettings(store=str(store)))
    question = "Which signals cannot be caught, blocked or ignored?"
    answer = engine.ask(question)
    assert not answer["refused"] and answer["citations"]
    assert answer["index_version"] == published["version"]
    assert engine.ask(question)["cache"] == "exact"
    # A different index version (smaller chunks) passes its gate; the cache starts afresh.
    second = dg.materialize(
        INDEX_ASSETS, resources=resources, run_config=_run_config(max_chars=700, overlap=120)
    )
    assert second.success
    newer = json.loads((store / "published.json").read_text())
    assert newer["version"] != published["version"]
    again = engine.ask(question)
    assert again["cache"] == "miss" and again["index_version"] == newer["version"]
    assert engine.cache.stats.invalidations == 1
    # Tiny chunks cut answers apart: the blocking check fails and nothing downstream runs
    # (the floor is lowered so that the comparison with the published index decides).
    broken = dg.materialize(
        INDEX_ASSETS,
        resources=resources,
        run_config=_run_config(max_chars=60, overlap=0, min_recall=0.0),
        raise_on_error=False,
    )
    assert not broken.success
    failed = [c for c in broken.get_asset_check_evaluations() if not c.passed]
    assert failed and "recall@5 fell" in (failed[0].description or "")
    assert json.loads((store / "published.json").read_text())["version"] == newer["version"]
    # A separate run of the publishing step re-reads the verdict and refuses too.
    alone = dg.materialize([rag.published_index], resources=resources, raise_on_error=False)
    assert not alone.success
    assert len(client.search_model_versions(f"name='{REGISTERED_NAME}'")) == 2

    day = datetime.now(UTC).strftime("%Y-%m-%d")
    engine.ask("How do I bake sourdough bread?")
    report = dg.materialize(
        [rag.rag_monitoring], partition_key=day, resources=resources
    ).asset_materializations_for_node("rag_monitoring")[0]
    assert report.metadata["questions"].value == 4
    assert report.metadata["unanswered_share"].value == pytest.approx(0.25)
    assert report.metadata["cache_hit_rate"].value == pytest.approx(0.25)


def test_reingesting_the_same_pages_changes_nothing(resources):
    _ingest(resources)
    store = rag.rag_store(resources["artefacts"])
    before = {p.name: p.read_bytes() for p in (store / "documents").iterdir()}
    result = dg.materialize(
        [rag.documents],
        partition_key="man7",
        resources=resources,
        run_config=dg.RunConfig(ops={"documents": rag.CorpusConfig(source_dir=str(SLICE_DIR))}),
    )
    metadata = result.asset_materializations_for_node("documents")[0].metadata
    assert metadata["unchanged"].value == 12 and metadata["new"].value == 0
    assert {p.name: p.read_bytes() for p in (store / "documents").iterdir()} == before


def test_an_object_store_artefact_root_is_refused_not_written_under_the_working_folder(
    tmp_path,
):
    from orchestration.resources import ArtefactStore

    with pytest.raises(dg.Failure, match=r"need a local artefact folder.*s3://bucket/keel"):
        rag.rag_store(ArtefactStore(root="s3://bucket/keel"))
    assert rag.rag_store(ArtefactStore(root=str(tmp_path))) == tmp_path / "rag"


def test_cache_is_per_index_version_and_semantic_above_threshold():
    cache = AnswerCache(threshold=0.9)
    a = np.array([1.0, 0.0], dtype=np.float32)
    near = np.array([0.95, np.sqrt(1 - 0.95**2)], dtype=np.float32)
    far = np.array([0.0, 1.0], dtype=np.float32)
    body = {"answer": "x", "usage": {"prompt_tokens": 100, "completion_tokens": 20}}
    assert cache.get("v1", "What is a pipe?", a) is None
    cache.put("v1", "What is a pipe?", a, body)
    assert cache.get("v1", "what is a  PIPE", far)[1] == "exact"
    assert cache.get("v1", "pipes, what are they", near)[1] == "semantic"
    assert cache.get("v1", "something else", far) is None
    assert cache.get("v2", "What is a pipe?", a) is None
    assert len(cache) == 0 and cache.stats.invalidations == 1
    assert cache.stats.as_dict()["tokens_saved"] == 240


def test_secrets_are_stripped_and_ordinary_text_kept():
    text = (
        "Use key AKIAABCDEFGHIJKLMNOP and password: hunter22 or sk-abcdefghijklmnopqrstuvwx; "
        "the read end is opened with O_RDONLY."
    )
    clean, removed = strip_secrets(text)
    assert removed == 3
    assert "AKIA" not in clean and "hunter22" not in clean and "sk-abc" not in clean
    assert "the read end is opened with O_RDONLY." in clean
    key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----"
    assert strip_secrets(f"before {key} after") == ("before [removed] after", 1)
    assert strip_secrets("A pipe has a read end and a write end.") == (
        "A pipe has a read end and a write end.",
        0,
    )


def test_daily_report_counts_refusals_and_hits_and_sees_query_drift():
    from keel.rag.monitoring import daily_report

    rng = np.random.default_rng(0)
    corpus = rng.normal(1.0, 1.0, size=(300, 8)).astype(np.float32)
    records = [
        {
            "refused": i % 4 == 0,
            "cache": "exact" if i % 2 else "miss",
            "tokens": 10,
            "latency_ms": 1.0,
        }
        for i in range(40)
    ]
    same = daily_report(records, rng.normal(1.0, 1.0, size=(40, 8)).astype(np.float32), corpus)
    assert same["unanswered_share"] == 0.25 and same["cache_hit_rate"] == 0.5
    assert same["tokens_saved"] == 200
    away = np.tile([3.0, -3.0], 4)
    shifted = daily_report(records, rng.normal(away, 1.0, size=(40, 8)).astype(np.float32), corpus)
    assert not same["embedding_drift"]["distance"]["drifted"]
    assert shifted["embedding_drift"]["distance"]["drifted"]
    assert shifted["embedding_drift"]["model"]["drifted"]
    few = daily_report(records[:5], np.zeros((5, 8), dtype=np.float32), corpus)
    assert few["embedding_drift"] is None


def test_index_versions_are_registered_once_with_their_lineage(tmp_path):
    from mlflow import MlflowClient

    from keel.rag.registry import REGISTERED_NAME, register_index
    from orchestration.resources import MlflowResource

    mlflow = MlflowResource(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        registry_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_location=str(tmp_path / "artifacts"),
    )
    experiment = mlflow.configure("keel-rag")
    manifest = {
        "version": "abc123",
        "lineage": {"corpus_hash": "c" * 64, "chunker_settings": {"max_chars": 900}},
    }
    first = register_index(mlflow.tracking_uri, experiment, manifest, {"recall_at_5": 0.9})
    again = register_index(mlflow.tracking_uri, experiment, manifest, {"recall_at_5": 0.9})
    client = MlflowClient(tracking_uri=mlflow.tracking_uri)
    assert first == again
    assert len(client.search_model_versions(f"name='{REGISTERED_NAME}'")) == 1
    version = client.get_model_version_by_alias(REGISTERED_NAME, "published")
    assert version.version == first
    assert version.tags["lineage.corpus_hash"] == "c" * 64
    assert version.tags["lineage.chunker_settings.max_chars"] == "900"


def test_sensor_asks_for_the_sections_whose_pages_changed(tmp_path):
    import gzip
    import shutil

    source = tmp_path / "man"
    shutil.copytree(SLICE_DIR, source)
    sensor = rag.manual_pages_sensor(rag.CorpusConfig(source_dir=str(source)), name="test_pages")
    instance = dg.DagsterInstance.ephemeral()
    context = dg.build_sensor_context(instance=instance)
    first = sensor(context)
    assert sorted(r.partition_key for r in first) == ["man2", "man7"]
    assert first[0].run_config["ops"]["documents"]["config"]["source_dir"] == str(source)
    context = dg.build_sensor_context(instance=instance, cursor=context.cursor)
    assert isinstance(sensor(context), dg.SkipReason)
    page = source / "man2" / "fork.2.gz"
    page.write_bytes(gzip.compress(gzip.decompress(page.read_bytes()) + b".PP\nMore.\n"))
    context = dg.build_sensor_context(instance=instance, cursor=context.cursor)
    assert [r.partition_key for r in sensor(context)] == ["man2"]
