"""dbt-duckdb plugin that readies a connection for the lake before dbt-duckdb attaches it.

profiles.yml's ``team`` output lists this module under ``plugins`` and the lake under
``attach``. dbt-duckdb calls the plugin before it attaches: the plugin installs and loads the
extensions from their packages (never from the network), creates the catalog database if it
is missing, and writes the data path the way the catalog records it (keel.lake.attach does
the same for Keel's own connections).

Plugin config: ``extension_dir``, the folder the extensions are installed into. A catalog or
data path left empty takes Keel's defaults (keel.lake.lake_catalog, lake_data_path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dbt.adapters.duckdb.plugins import BasePlugin

from keel.lake import (
    default_extension_dir,
    ensure_catalog_database,
    load_extensions,
    needed_extensions,
    s3_secret,
)

PREFIX = "ducklake:postgres:"


class Plugin(BasePlugin):
    """Loads the lake's extensions and readies its catalog before dbt-duckdb attaches it."""

    def initialize(self, plugin_config: dict[str, Any]) -> None:
        folder = str(plugin_config.get("extension_dir") or "").strip()
        self.extension_dir = Path(folder) if folder else default_extension_dir()

    def _lakes(self) -> list:
        return [
            attachment
            for attachment in (self.creds.attach if self.creds else None) or []
            if attachment.path.lower().startswith(PREFIX)
        ]

    def update_connection_config(self, creds, config: dict[str, Any]) -> None:
        from keel.lake import data_location, lake_catalog, lake_data_path
        from keel.settings import keel_home

        config["autoinstall_known_extensions"] = False
        config["extension_directory"] = str(self.extension_dir)
        for attachment in self._lakes():
            # Left empty (dbt by hand without the variables): Keel's own defaults.
            if not attachment.path[len(PREFIX) :].strip():
                attachment.path = PREFIX + lake_catalog()
            options = attachment.options or {}
            given = str(options.get("data_path") or "").strip()
            options["data_path"] = data_location(given or lake_data_path(keel_home()))
            attachment.options = options

    def configure_connection(self, conn) -> None:
        lakes = self._lakes()
        names = [name for lake in lakes for name in needed_extensions(lake.options["data_path"])]
        load_extensions(conn, tuple(dict.fromkeys(names)), self.extension_dir)
        for lake in lakes:
            if lake.options["data_path"].lower().startswith(("s3://", "s3a://")):
                s3_secret(conn)
            ensure_catalog_database(lake.path[len(PREFIX) :])
