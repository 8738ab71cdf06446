"""Settings of ``keel serve``: one dataclass, read from ``KEEL_SERVE_*`` environment variables.

uvicorn starts each worker by importing the app factory, so the CLI hands its options to the
workers through the environment (`ServeSettings.to_env`) and every worker reads them back
(`ServeSettings.from_env`). Defaults are the local profile's: the Keel home's Feast store and
MLflow registry, keys in ``$KEEL_HOME/serve/api_keys.db``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from keel import schema
from keel.settings import KeelPaths, SettingsError, active_profile

ENV_PREFIX = "KEEL_SERVE_"
MAX_BATCH = 1_000
# "reject": a request naming an account the online store does not know gets 404 and nothing
# is scored; "null": it gets 200 with score null and found false for those accounts.
UNKNOWN_POLICIES = ("reject", "null")
# What `ServeSettings.bundle` takes: "" serves native models, else that edge-bundle variant.
BUNDLE_VARIANTS = ("", "fp32", "int8")


def serve_dir(paths: KeelPaths | None = None) -> Path:
    """``$KEEL_HOME/serve``: API keys and the metrics folder of ``keel serve``."""
    return (paths or KeelPaths.current()).home / "serve"


def default_keys_file(paths: KeelPaths | None = None) -> Path:
    """``$KEEL_HOME/serve/api_keys.db``: the hashed API keys."""
    return serve_dir(paths) / "api_keys.db"


@dataclass(frozen=True)
class ServeSettings:
    """How the serving app finds its stores, models and keys, and how it behaves.

    Attributes:
        feast_config: The Feast yaml in ``feature_repo/`` (default: the active profile's).
        feast_overrides: Settings merged over that yaml (a project name, a Redis online store).
        feature_service: The feature service the models read.
        registry: `keel.registry.RegistryConfig` fields; empty means the local registry.
        poll_seconds: How often workers look for alias changes in the registry.
        keys_file: SQLite file of hashed API keys.
        auth: Whether requests need an API key (off only for local experiments).
        log_dir: Prediction log folder; empty means ``$KEEL_HOME/artefacts/prediction_log``.
        cache_entries: Prediction cache size per worker; 0 turns the cache off.
        unknown_entities: Default policy for accounts without features (`UNKNOWN_POLICIES`).
        shadow_queue: Shadow jobs waiting per worker (to run after their response) before new
            ones are dropped.
        bundle: ``fp32`` or ``int8``: serve each version's published edge bundle instead of
            its native model (``keel.edge.serving``; ``int8`` takes FP32 where a bundle has no
            INT8 graph); empty serves the native models.
    """

    feast_config: str = ""
    feast_overrides: dict[str, Any] = field(default_factory=dict)
    feature_service: str = schema.FEATURE_SERVICE
    registry: dict[str, Any] = field(default_factory=dict)
    poll_seconds: float = 2.0
    keys_file: str = ""
    auth: bool = True
    log_dir: str = ""
    cache_entries: int = 100_000
    unknown_entities: str = "reject"
    shadow_queue: int = 1_000
    bundle: str = ""

    def __post_init__(self) -> None:
        if self.unknown_entities not in UNKNOWN_POLICIES:
            raise SettingsError(
                f"unknown_entities={self.unknown_entities!r}; use one of {UNKNOWN_POLICIES}."
            )
        if self.bundle not in BUNDLE_VARIANTS:
            raise SettingsError(f"bundle={self.bundle!r}; use one of {BUNDLE_VARIANTS}.")
        if self.cache_entries < 0 or self.shadow_queue < 1 or self.poll_seconds <= 0:
            raise SettingsError("cache_entries >= 0, shadow_queue >= 1 and poll_seconds > 0.")

    def resolved_feast_config(self) -> str:
        from keel.features import PROFILE_CONFIG_FILES

        return self.feast_config or PROFILE_CONFIG_FILES[active_profile()]

    def resolved_keys_file(self) -> Path:
        return Path(self.keys_file) if self.keys_file else default_keys_file()

    def resolved_log_dir(self) -> Path:
        from keel.serving.prediction_log import default_log_dir

        return Path(self.log_dir) if self.log_dir else default_log_dir()

    def model_loader(self):  # -> Callable[[str], model] | None
        """``version -> model`` for the deployments: None loads native models."""
        if not self.bundle:
            return None
        from keel.edge.serving import bundle_loader

        return bundle_loader(self.registry_config(), self.bundle)

    def registry_config(self):  # -> keel.registry.RegistryConfig
        from keel.registry import RegistryConfig

        return RegistryConfig(**self.registry) if self.registry else RegistryConfig.local()

    def to_env(self) -> dict[str, str]:
        """``KEEL_SERVE_<FIELD>`` variables that `from_env` reads back (JSON values)."""
        return {f"{ENV_PREFIX}{k.upper()}": json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServeSettings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for item in fields(cls):
            raw = environ.get(f"{ENV_PREFIX}{item.name.upper()}")
            if raw is None:
                continue
            try:
                values[item.name] = json.loads(raw)
            except json.JSONDecodeError:
                values[item.name] = raw  # a bare string such as a path
        return cls(**values)
