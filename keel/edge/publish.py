"""Publish a bundle that passed its parity check: MLflow artefacts plus registry version tags.

The bundle is logged as artefacts of the version's training run (``edge_bundle/v<version>``),
and the version gets ``keel.bundle.*`` tags: where the bundle is, the manifest's sha256 (which
pins every file through the manifest's own hashes), its variants, sizes and parity figures.
The registry appends an ``attach_bundle`` record to its audit trail.

The publisher is an authenticated identity (`keel.access`) with the ``deployer`` role, checked
before anything is uploaded; a refusal is recorded in the registry's audit trail.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keel.access import Identity
    from keel.registry import ModelRegistry

ARTIFACT_PATH = "edge_bundle"
TAG_URI = "keel.bundle.uri"
TAG_MANIFEST_SHA256 = "keel.bundle.manifest_sha256"
TAG_VARIANTS = "keel.bundle.variants"


class PublishError(RuntimeError):
    """A bundle that may not be attached to a registry version."""


def bundle_tags(
    uri: str, manifest_sha256: str, sizes: Mapping[str, int], parity: Mapping[str, Any]
) -> dict[str, str]:
    """The ``keel.bundle.*`` tags of a published bundle."""
    tags = {
        TAG_URI: uri,
        TAG_MANIFEST_SHA256: manifest_sha256,
        TAG_VARIANTS: ",".join(sizes),
    }
    for variant, size in sizes.items():
        tags[f"keel.bundle.{variant}.bytes"] = str(size)
        result = parity["variants"][variant]
        tags[f"keel.bundle.{variant}.max_abs_diff"] = f"{result['max_abs_diff']:.3g}"
        tags[f"keel.bundle.{variant}.auc_change"] = f"{result['auc_change']:.6g}"
    return tags


def publish_bundle(
    registry: ModelRegistry,
    version: str,
    folder: str | Path,
    parity: Mapping[str, Any],
    sizes: Mapping[str, int],
    publisher: Identity | None = None,
) -> dict[str, str]:
    """Attach a bundle to ``version`` as ``publisher``; refuses one whose parity did not pass.

    ``publisher`` defaults to the caller's identity (`keel.access.authenticate`); a name
    given as text is refused. Returns the tags set on the version.
    """
    from keel.access import Identity, authenticate
    from keel_edge import MANIFEST_FILE, manifest_sha256

    publisher = authenticate() if publisher is None else publisher
    if not isinstance(publisher, Identity):
        raise PublishError(
            f"the publisher must be an authenticated identity, not {publisher!r}: act with "
            "an API key (KEEL_API_KEY) or as your OS user in the local profile"
        )
    if not parity.get("passed"):
        raise PublishError(f"version {version}'s bundle failed its parity check: not published")
    folder = Path(folder)
    manifest_hash = manifest_sha256(folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    number = registry.resolve(version)
    # Checked (and a refusal audited) before any artefact is uploaded to the version's run.
    registry._authorize(publisher, "attach_bundle", number)
    if str(manifest["model"].get("version")) != number:
        raise PublishError(
            f"the bundle in {folder} was built for version {manifest['model'].get('version')}, "
            f"not {number}"
        )
    run_id = registry.client.get_model_version(registry.name, number).run_id
    artifact_path = f"{ARTIFACT_PATH}/v{number}"
    registry.client.log_artifacts(run_id, str(folder), artifact_path=artifact_path)
    tags = bundle_tags(f"runs:/{run_id}/{artifact_path}", manifest_hash, sizes, parity)
    registry.attach_bundle(
        number,
        publisher,
        tags,
        {"manifest_sha256": manifest_hash, "files": manifest["files"], "parity": parity},
    )
    return tags
