"""What `keel serve` scores with: the models behind the registry's deployment aliases.

The served models follow MLflow aliases on the registered model: ``champion`` answers,
``canary`` answers a sticky share of entities (the share is a registered-model tag),
``shadow`` scores the same requests off the response path, and ``blue``/``green`` are the two
slots of a blue-green release (the live slot is the one the champion alias points at; the other
is kept loaded so a switch is instant). A background thread polls the aliases every few
seconds, loads and warms any new version off the request path, then swaps one immutable
`Snapshot` in a single assignment, so a request sees either the old set or the new one.

A version that fails to load, to warm, or (for arms that answer clients) to show an approval
never takes traffic; when the registry is unreachable the last good snapshot keeps serving.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from keel.registry import RegistryConfig

log = logging.getLogger(__name__)

CHAMPION, CANARY, SHADOW, BLUE, GREEN = "champion", "canary", "shadow", "blue", "green"
SLOTS = (BLUE, GREEN)
DEPLOYMENT_ALIASES = (CANARY, SHADOW, *SLOTS)
# Registered-model tags that carry the release settings next to the aliases.
TAG_CANARY_SHARE = "keel.canary_share"
TAG_CANARY_STARTED_AT = "keel.canary_started_at"
TAG_LIVE_SLOT = "keel.live_slot"
DEFAULT_POLL_SECONDS = 2.0
# A version that failed to load is tried again after this long (a flaky artefact store).
RETRY_FAILED_AFTER_S = 60.0
_BUCKETS = 1 << 64


class ServingModelError(RuntimeError):
    """A served model that cannot answer: it failed to load, or its output is unusable."""


def entity_bucket(account_id: int, salt: str) -> float:
    """A stable number in [0, 1) per entity and salt: the same in every worker and process."""
    digest = hashlib.blake2b(f"{salt}:{int(account_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _BUCKETS


@dataclass(frozen=True)
class LoadedModel:
    """One registered version, loaded and warmed, as one arm of the service."""

    version: str
    arm: str
    model: Any = field(repr=False)  # keel.training.RiskModel
    family: str = ""
    load_seconds: float = 0.0

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.model.feature_names)

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """P(default) per row of ``frame``; raises `ServingModelError` on unusable output."""
        import numpy as np

        scores = np.asarray(self.model.predict_proba(frame), dtype=np.float64)
        if scores.shape != (len(frame),):
            raise ServingModelError(
                f"version {self.version} returned {scores.shape} scores for {len(frame)} rows"
            )
        if not np.isfinite(scores).all():
            raise ServingModelError(f"version {self.version} returned non-finite scores")
        return scores

    def as_arm(self, arm: str) -> LoadedModel:
        return LoadedModel(self.version, arm, self.model, self.family, self.load_seconds)


@dataclass(frozen=True)
class Snapshot:
    """The models serving at one moment; replaced whole, never changed in place."""

    champion: LoadedModel
    canary: LoadedModel | None = None
    canary_share: float = 0.0
    shadow: LoadedModel | None = None
    live_slot: str = ""
    standby: LoadedModel | None = None  # the other blue-green slot, warm for a switch
    aliases: Mapping[str, str] = field(default_factory=dict)
    loaded_at: str = ""

    def arm_for(self, account_id: int) -> str:
        """``canary`` for a sticky share of entities while a canary runs, else ``champion``."""
        if self.canary is None or self.canary_share <= 0.0:
            return CHAMPION
        bucket = entity_bucket(account_id, self.canary.version)
        return CANARY if bucket < self.canary_share else CHAMPION

    def model_for(self, arm: str) -> LoadedModel:
        if arm == CANARY and self.canary is not None:
            return self.canary
        return self.champion

    def versions(self) -> dict[str, str]:
        """Arm -> version of every loaded arm."""
        arms = {CHAMPION: self.champion, CANARY: self.canary, SHADOW: self.shadow}
        return {arm: model.version for arm, model in arms.items() if model is not None}


@dataclass(frozen=True)
class RegistryView:
    """The registry's deployment state: aliases and the release tags of the registered model."""

    aliases: Mapping[str, str]
    canary_share: float
    live_slot: str

    @classmethod
    def from_model(cls, aliases: Mapping[str, Any], tags: Mapping[str, str]) -> RegistryView:
        try:
            share = float(tags.get(TAG_CANARY_SHARE, "0") or 0)
        except ValueError:
            share = 0.0
        return cls(
            aliases={str(k): str(v) for k, v in aliases.items()},
            canary_share=min(max(share, 0.0), 1.0),
            live_slot=tags.get(TAG_LIVE_SLOT, ""),
        )


def model_artifacts_uri(client: Any, model_name: str, version: str) -> str:
    """Where a registered version's MLflow model folder lives (logged model or run artefacts)."""
    source = client.get_model_version(model_name, version).source
    if source.startswith("models:/m-"):
        source = client.get_logged_model(source.removeprefix("models:/")).artifact_location
    return source


def load_registered_model(registry_config: RegistryConfig, version: str) -> Any:
    """The Keel model of a registered version (LightGBM or PyTorch), through MLflow."""
    import tempfile

    import mlflow

    from keel.tracking import load_logged_model

    # Resolve with this registry's client rather than MLflow's process-wide tracking URI.
    client = mlflow.MlflowClient(
        tracking_uri=registry_config.tracking_uri, registry_uri=registry_config.registry_uri
    )
    source = model_artifacts_uri(client, registry_config.model_name, version)
    with tempfile.TemporaryDirectory(prefix="keel-serve-model-") as scratch:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=scratch, tracking_uri=registry_config.tracking_uri
        )
        return load_logged_model(local)


def warm_frame(feature_names: tuple[str, ...], rows: int) -> pd.DataFrame:
    """A plausible frame of model features: the first category of each vocabulary, else 0."""
    import pandas as pd

    from keel.training import CATEGORY_VOCABULARIES

    columns = {
        name: [CATEGORY_VOCABULARIES[name][0]] * rows
        if name in CATEGORY_VOCABULARIES
        else [float(n % 7) for n in range(rows)]
        for name in feature_names
    }
    return pd.DataFrame(columns)


def _load_and_warm(loader: Callable[[str], Any], version: str) -> LoadedModel:
    started = time.perf_counter()
    model = loader(version)
    loaded = LoadedModel(version, CHAMPION, model, getattr(model, "family", ""), 0.0)
    # Both scoring paths (one row, a batch) run once before the version answers anyone.
    for rows in (1, 128):
        loaded.predict(warm_frame(loaded.feature_names, rows))
    return LoadedModel(
        version, CHAMPION, model, loaded.family, round(time.perf_counter() - started, 3)
    )


class Deployments:
    """Keeps the served models in step with the registry's aliases, off the request path.

    Args:
        registry_config: Where the MLflow registry is.
        poll_seconds: How often the aliases are read.
        load_model: ``version -> model`` (default: the registered Keel model through MLflow);
            any object with ``feature_names`` and ``predict_proba(frame)`` works.
    """

    def __init__(
        self,
        registry_config: RegistryConfig,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        load_model: Callable[[str], Any] | None = None,
    ) -> None:
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be positive, got {poll_seconds}")
        self.config = registry_config
        self.poll_seconds = poll_seconds
        self._loader = load_model or (lambda v: load_registered_model(registry_config, v))
        self._snapshot: Snapshot | None = None
        self._models: dict[str, LoadedModel] = {}
        self._failed: dict[str, tuple[float, str]] = {}
        self._client = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refresh_lock = threading.Lock()
        self.last_error: str = ""
        self.last_poll_ok: float | None = None
        self.polls = 0

    # -- what the app reads ------------------------------------------------------------------

    @property
    def current(self) -> Snapshot | None:
        return self._snapshot

    @property
    def ready(self) -> bool:
        return self._snapshot is not None

    def failed_versions(self) -> dict[str, str]:
        """Versions that failed to load or warm, with why (they take no traffic)."""
        return {version: reason for version, (_, reason) in self._failed.items()}

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, wait_s: float = 0.0) -> Deployments:
        """Start polling in a daemon thread; wait up to ``wait_s`` for the first snapshot."""
        if self._thread is not None:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="keel-deployments", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + wait_s
        while not self.ready and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.poll_seconds)

    # -- one poll ----------------------------------------------------------------------------------

    def _registry_view(self) -> RegistryView:
        from mlflow import MlflowClient

        if self._client is None:
            self._client = MlflowClient(
                tracking_uri=self.config.tracking_uri, registry_uri=self.config.registry_uri
            )
        model = self._client.get_registered_model(self.config.model_name)
        return RegistryView.from_model(model.aliases, model.tags)

    def _approved(self, version: str) -> str:
        """Why ``version`` may not answer clients (the audit log's verdict), or empty."""
        from keel.registry import ApprovalError, ModelRegistry

        with ModelRegistry(self.config) as registry:
            try:
                registry.require_approved(version)
            except ApprovalError as error:
                return str(error)
        return ""

    def _champion_moved_outside_keel(self, version: str) -> str:
        """Why the champion alias may not be followed (the audit log put it elsewhere), or empty."""
        from keel.registry import ModelRegistry

        with ModelRegistry(self.config) as registry:
            audited = registry.audited_champion()
        if audited == version:
            return ""
        return (
            f"the {CHAMPION} alias points at version {version}, but the audit log made version "
            f"{audited or 'none'} the champion: the alias was moved outside Keel"
        )

    def _model(self, version: str | None, needs_approval: bool) -> LoadedModel | None:
        """The loaded model of ``version``, loading it now if needed; None if it cannot serve."""
        if not version:
            return None
        if version in self._models:
            return self._models[version]
        failed_at, _ = self._failed.get(version, (None, ""))
        if failed_at is not None and time.monotonic() - failed_at < RETRY_FAILED_AFTER_S:
            return None
        try:
            refusal = self._approved(version) if needs_approval else ""
            if refusal:
                raise ServingModelError(refusal)
            loaded = _load_and_warm(self._loader, version)
        except Exception as error:  # any failure keeps the version off traffic
            reason = f"{type(error).__name__}: {error}"
            self._failed[version] = (time.monotonic(), reason)
            log.error("version %s cannot serve and takes no traffic: %s", version, reason)
            return None
        self._failed.pop(version, None)
        self._models[version] = loaded
        log.info("loaded and warmed version %s in %.2f s", version, loaded.load_seconds)
        return loaded

    def refresh(self) -> bool:
        """Read the aliases once and swap in a new snapshot if they changed; False on failure."""
        with self._refresh_lock:
            self.polls += 1
            try:
                view = self._registry_view()
            except Exception as error:  # the last good snapshot keeps serving
                self.last_error = f"registry unreachable: {type(error).__name__}: {error}"
                log.warning("%s; serving the last good snapshot", self.last_error)
                return False
            try:
                snapshot = self._build(view)
            except Exception as error:  # a registry error mid-load: same rule
                self.last_error = f"registry read failed: {type(error).__name__}: {error}"
                log.warning("%s; serving the last good snapshot", self.last_error)
                return False
            self.last_poll_ok = time.time()
            if snapshot is not None and snapshot != self._snapshot:
                self._snapshot = snapshot
                log.info("serving %s", snapshot.versions())
            return True

    def _build(self, view: RegistryView) -> Snapshot | None:
        aliases = view.aliases
        previous = self._snapshot
        champion_version = aliases.get(CHAMPION)
        champion = None
        # Checked when the alias moves: a champion alias moved by hand is not followed.
        moved = previous is None or champion_version != previous.champion.version
        refusal = self._champion_moved_outside_keel(champion_version) if moved else ""
        if refusal:
            self.last_error = refusal
            log.error("%s; it takes no traffic", refusal)
        else:
            champion = self._model(champion_version, needs_approval=True)
        if champion is None:
            if previous is None:
                self.last_error = refusal or self._why_no_champion(aliases)
                return None
            champion = previous.champion  # the new champion cannot serve: keep the old one
        canary_version = aliases.get(CANARY)
        canary = None
        if canary_version and canary_version != champion.version and view.canary_share > 0:
            canary = self._model(canary_version, needs_approval=True)
        shadow_version = aliases.get(SHADOW)
        shadow = None
        if shadow_version and shadow_version != champion.version:
            shadow = self._model(shadow_version, needs_approval=False)
        standby = None
        for slot in SLOTS:
            version = aliases.get(slot)
            if version and version != champion.version:
                standby = self._model(version, needs_approval=True)
        keep = {champion.version} | {m.version for m in (canary, shadow, standby) if m is not None}
        if previous is not None:
            keep.add(previous.champion.version)
        for version in list(self._models):
            if version not in keep:
                del self._models[version]
        candidate = Snapshot(
            champion=champion.as_arm(CHAMPION),
            canary=canary.as_arm(CANARY) if canary else None,
            canary_share=view.canary_share if canary else 0.0,
            shadow=shadow.as_arm(SHADOW) if shadow else None,
            live_slot=view.live_slot,
            standby=standby.as_arm("standby") if standby else None,
            aliases=dict(aliases),
            loaded_at=previous.loaded_at if previous else "",
        )
        if previous is not None and _same(previous, candidate):
            return previous
        return Snapshot(**{**candidate.__dict__, "loaded_at": datetime.now(UTC).isoformat()})

    def _why_no_champion(self, aliases: Mapping[str, str]) -> str:
        version = aliases.get(CHAMPION)
        if not version:
            return f"{self.config.model_name} has no {CHAMPION} alias yet"
        return (
            f"{CHAMPION} version {version} cannot serve: {self._failed.get(version, ('', '?'))[1]}"
        )


def _same(a: Snapshot, b: Snapshot) -> bool:
    def key(s: Snapshot):
        return (
            s.versions(),
            s.canary_share,
            s.live_slot,
            s.standby.version if s.standby else None,
            dict(s.aliases),
        )

    return key(a) == key(b)
