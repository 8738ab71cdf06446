"""Price tables: what a CPU hour, a GB-hour of memory, a GPU hour and a GB written cost.

Each profile has one. The defaults are list prices of the kind cloud providers publish
(on-demand, per vCPU, per GB of memory, per GPU, per GB of disk written); put your own in a
JSON file named by ``KEEL_PRICES`` (the same keys, per profile). The local profile prices the
machine as if it were rented, so costs compare across profiles.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from keel.cost.measure import Usage

PRICES_ENV = "KEEL_PRICES"
GB = 1024**3


@dataclass(frozen=True)
class PriceTable:
    """Money per unit of each measured resource."""

    cpu_hour: float
    memory_gb_hour: float
    gpu_hour: float
    written_gb: float
    currency: str = "USD"

    def to_json(self) -> dict:
        return asdict(self)


_MACHINE = PriceTable(cpu_hour=0.04, memory_gb_hour=0.005, gpu_hour=2.5, written_gb=0.01)
DEFAULT_PRICES = {
    "local": _MACHINE,
    # The team's workers run on machines of the same kind, priced the same way.
    "team": _MACHINE,
    "production": PriceTable(cpu_hour=0.05, memory_gb_hour=0.0065, gpu_hour=4.0, written_gb=0.02),
}


class PriceError(ValueError):
    """A price file that cannot be used."""


def price_table(profile: str) -> PriceTable:
    """The profile's prices: ``KEEL_PRICES``'s entry for it when set, else the default."""
    raw = os.environ.get(PRICES_ENV, "").strip()
    if not raw:
        if profile not in DEFAULT_PRICES:
            raise PriceError(f"no price table for profile {profile!r}")
        return DEFAULT_PRICES[profile]
    try:
        entry = json.loads(Path(raw).read_text())[profile]
        names = {field.name for field in fields(PriceTable)}
        unknown = sorted(set(entry) - names)
        if unknown:
            raise PriceError(f"{raw}: unknown price keys {unknown} (known: {sorted(names)})")
        table = PriceTable(**entry)
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise PriceError(
            f"{PRICES_ENV}={raw}: no usable price table for {profile!r} ({error})"
        ) from error
    for name, value in asdict(table).items():
        if name == "currency":
            continue
        # A price that is not a number would only fail later, inside each step's handler.
        if isinstance(value, bool) or not isinstance(value, float | int) or value < 0:
            raise PriceError(f"{raw}: {profile}.{name} must be a number >= 0, not {value!r}")
    return table


def cost(usage: Usage, prices: PriceTable) -> dict[str, float]:
    """The money each resource cost, and the total.

    Memory is billed as its peak held for the step's wall time.
    """
    parts = {
        "cpu": usage.cpu_s / 3600 * prices.cpu_hour,
        "memory": usage.peak_memory_bytes / GB * usage.wall_s / 3600 * prices.memory_gb_hour,
        "gpu": usage.gpu_s / 3600 * prices.gpu_hour,
        "written": usage.bytes_written / GB * prices.written_gb,
    }
    return {**parts, "total": sum(parts.values())}


def resume_savings(
    step_cost: float,
    wall_s: float,
    resumed_from_epoch: int,
    epochs_run: int,
    mean_epoch_seconds: float = 0.0,
) -> float:
    """What a training step resumed from a checkpoint did not spend again.

    The epochs before ``resumed_from_epoch`` ran in an interrupted attempt (a preempted spot
    machine, a killed worker); this attempt skipped them. Each skipped epoch is priced as the
    epochs this attempt ran: their share of its measured cost (by ``mean_epoch_seconds`` of
    its wall time when known), divided by their number.
    """
    ran = epochs_run - resumed_from_epoch
    if resumed_from_epoch <= 0 or ran <= 0 or step_cost <= 0:
        return 0.0
    share = min(1.0, mean_epoch_seconds * ran / wall_s) if mean_epoch_seconds and wall_s else 1.0
    return resumed_from_epoch * step_cost * share / ran
