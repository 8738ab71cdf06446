"""Releases of ``keel serve``: canary, shadow, blue-green slots, and the canary's judge.

Every action moves registry aliases through `keel.registry.ModelRegistry.deploy`, which writes
the audit record first and then the aliases, under the registry's lock; the serving workers
(`keel.serving.deployments`) follow the aliases within seconds.

`evaluate_release` is the one function that judges a running canary: the watcher in the
``keel serve`` supervisor (`ReleaseWatcher`) and the Dagster sensor both call it. It is
idempotent: a rollback or promotion happens only while the canary alias still points at the
judged version, so the second caller finds nothing to do. The canary's guardrail policy is
stored on the registry when it starts, so every judge applies the same bars.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel.serving.deployments import (
    BLUE,
    CANARY,
    CHAMPION,
    GREEN,
    SHADOW,
    SLOTS,
    TAG_CANARY_SHARE,
    TAG_CANARY_STARTED_AT,
    TAG_LIVE_SLOT,
)
from keel.serving.guardrails import BREACHED, PROMOTE, GuardrailPolicy, Verdict

if TYPE_CHECKING:
    import pandas as pd

    from keel.access import Identity
    from keel.registry import AuditRecord, ModelRegistry, RegistryConfig
    from keel.serving.log_tail import PredictionLogTail

log = logging.getLogger(__name__)

TAG_CANARY_POLICY = "keel.canary_policy"
CANARY_TAGS = (TAG_CANARY_SHARE, TAG_CANARY_STARTED_AT, TAG_CANARY_POLICY)
WATCHER = "keel-release-watcher"
DEFAULT_CANARY_SHARE = 0.1
DEFAULT_WATCH_SECONDS = 10.0


class ReleaseError(RuntimeError):
    """A release step that cannot be carried out as asked."""


@dataclass(frozen=True)
class ReleaseState:
    """What the registry says is deployed."""

    champion: str | None
    canary: str | None
    canary_share: float
    canary_started_at: str
    canary_policy: GuardrailPolicy | None
    shadow: str | None
    live_slot: str
    slots: dict[str, str | None]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["canary_policy"] = asdict(self.canary_policy) if self.canary_policy else None
        return data


@dataclass(frozen=True)
class ReleaseOutcome:
    """What one evaluation of the release did."""

    action: str  # none, unmanaged, collecting, healthy, rolled_back, promoted, already_handled
    verdict: Verdict | None
    record: AuditRecord | None = None


def policy_from_json(text: str) -> GuardrailPolicy:
    """The guardrail policy stored with a canary (unknown keys from newer code are ignored)."""
    known = {f.name for f in fields(GuardrailPolicy)}
    return GuardrailPolicy(**{k: v for k, v in json.loads(text).items() if k in known})


def release_state(registry: ModelRegistry) -> ReleaseState:
    """The champion, canary (share, start, policy), shadow and slots, as the registry has them."""
    aliases, tags = registry.deployment_state()
    policy = tags.get(TAG_CANARY_POLICY)
    live = tags.get(TAG_LIVE_SLOT, "")
    return ReleaseState(
        champion=aliases.get(CHAMPION),
        canary=aliases.get(CANARY),
        canary_share=float(tags.get(TAG_CANARY_SHARE, 0) or 0),
        canary_started_at=tags.get(TAG_CANARY_STARTED_AT, ""),
        canary_policy=policy_from_json(policy) if policy else None,
        shadow=aliases.get(SHADOW),
        live_slot=live,
        slots={slot: aliases.get(slot) for slot in SLOTS},
    )


# -- canary ------------------------------------------------------------------------------------


def start_canary(
    registry: ModelRegistry,
    version: str,
    actor: str,
    share: float = DEFAULT_CANARY_SHARE,
    policy: GuardrailPolicy | None = None,
    auto_approve: bool = False,
    reason: str = "",
) -> AuditRecord:
    """Send a sticky ``share`` of entities to ``version``, judged by ``policy``.

    A canary answers clients, so it must be approved first; under the auto-approve policy the
    start approves a version that passed every gate.
    """
    from keel.registry import AUTO_APPROVER, ApprovalError

    if not 0.0 < share < 1.0:
        raise ReleaseError(f"a canary share lies strictly between 0 and 1, got {share}")
    number = registry.resolve(version)
    state = release_state(registry)
    if number == state.champion:
        raise ReleaseError(f"version {number} is the champion already: nothing to canary")
    if state.canary and state.canary != number:
        raise ReleaseError(
            f"version {state.canary} is the canary already: stop it first (keel release "
            "canary-stop) or let its guardrails decide"
        )
    if auto_approve:
        try:
            registry.require_approved(number)
        except ApprovalError:
            registry.approve(number, AUTO_APPROVER, "auto-approve policy: every gate passed")
    policy = policy or GuardrailPolicy()
    record = registry.deploy(
        "canary_start",
        actor,
        reason or f"canary of version {number} on {share:.0%} of entities",
        from_version=state.champion,
        to_version=number,
        aliases={CANARY: number},
        tags={
            TAG_CANARY_SHARE: f"{share:g}",
            TAG_CANARY_STARTED_AT: datetime.now(UTC).isoformat(),
            TAG_CANARY_POLICY: json.dumps(asdict(policy), sort_keys=True),
        },
        expect={CANARY: state.canary},
        approved=(number,),
        details={"share": share, "policy": asdict(policy)},
    )
    if record is None:
        raise ReleaseError("the canary changed while starting; look at keel release status")
    return record


def stop_canary(
    registry: ModelRegistry,
    actor: str,
    reason: str,
    action: str = "canary_stop",
    version: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditRecord | None:
    """Take the canary (``version``, or whichever runs) off traffic; None when none runs."""
    canary = version or release_state(registry).canary
    if canary is None:
        return None
    return registry.deploy(
        action,
        actor,
        reason,
        from_version=canary,
        aliases={CANARY: None},
        tags=dict.fromkeys(CANARY_TAGS),
        expect={CANARY: canary},
        details=details,
    )


# -- shadow and blue-green ---------------------------------------------------------------------


def set_shadow(
    registry: ModelRegistry, version: str | None, actor: str, reason: str = ""
) -> AuditRecord | None:
    """Let ``version`` score every request off the response path (None stops the shadow)."""
    current = release_state(registry).shadow
    if version is None:
        if current is None:
            return None
        return registry.deploy(
            "shadow_clear",
            actor,
            reason or "shadow stopped",
            from_version=current,
            aliases={SHADOW: None},
        )
    number = registry.resolve(version)
    return registry.deploy(
        "shadow_set",
        actor,
        reason or f"version {number} scores every request in the shadow",
        from_version=current,
        to_version=number,
        aliases={SHADOW: number},
    )


def _live_slot(state: ReleaseState) -> str:
    if state.live_slot in SLOTS:
        return state.live_slot
    holding = [slot for slot, version in state.slots.items() if version == state.champion]
    return holding[0] if holding else BLUE


def assign_slot(
    registry: ModelRegistry, slot: str, version: str, actor: str, reason: str = ""
) -> AuditRecord:
    """Put ``version`` into the idle slot (warmed by every worker, ready for a switch)."""
    if slot not in SLOTS:
        raise ReleaseError(f"{slot!r} is not a slot; use {BLUE} or {GREEN}")
    number = registry.resolve(version)
    state = release_state(registry)
    live = _live_slot(state)
    if slot == live and state.live_slot:
        raise ReleaseError(f"{slot} is the live slot; load the idle one, then switch")
    aliases: dict[str, str | None] = {slot: number}
    tags: dict[str, str | None] = {}
    if not state.live_slot and state.champion:
        # The first slot assignment puts the champion in the other slot, which becomes live.
        other = GREEN if slot == BLUE else BLUE
        aliases[other] = state.champion
        tags[TAG_LIVE_SLOT] = other
    record = registry.deploy(
        "slot_set",
        actor,
        reason or f"version {number} loaded into the {slot} slot",
        from_version=state.slots.get(slot),
        to_version=number,
        aliases=aliases,
        tags=tags,
        approved=(number,),
        details={"slot": slot},
    )
    assert record is not None  # no expectation was set, so the step always happens
    return record


def switch(
    registry: ModelRegistry, actor: str, reason: str = "", to_slot: str | None = None
) -> AuditRecord:
    """Make the idle slot live in one step (the champion alias moves); again to switch back."""
    state = release_state(registry)
    live = _live_slot(state)
    target = to_slot or (GREEN if live == BLUE else BLUE)
    if target not in SLOTS:
        raise ReleaseError(f"{target!r} is not a slot; use {BLUE} or {GREEN}")
    version = state.slots.get(target)
    if not version:
        raise ReleaseError(f"the {target} slot is empty: keel release slot {target} VERSION")
    if version == state.champion:
        raise ReleaseError(f"the {target} slot (version {version}) is live already")
    record = registry.deploy(
        "switch",
        actor,
        reason or f"switch from {live} to {target}",
        from_version=state.champion,
        to_version=version,
        aliases={live: state.champion} if state.champion else {},
        tags={TAG_LIVE_SLOT: target},
        expect={CHAMPION: state.champion, target: version},
        promote=version,
        details={"from_slot": live, "to_slot": target},
    )
    if record is None:
        raise ReleaseError("the slots changed while switching; look at keel release status")
    return record


# -- judging the canary --------------------------------------------------------------------------


def set_guardrail_gauge(verdict: Verdict) -> None:
    """GUARDRAIL_STATE for the canary arm: 1 per guardrail the last judged canary breached.

    A rolled-back canary's breaches stay visible until the next canary is judged.
    """
    from keel.serving.metrics import GUARDRAIL_STATE

    names = ("error_rate", "p99_latency_ms", "score_psi", "auc")
    breached = {c.name for c in verdict.breaches}
    for name in names:
        GUARDRAIL_STATE.labels(arm=CANARY, guardrail=name).set(1.0 if name in breached else 0.0)


def post_alert(webhook_url: str, payload: dict[str, Any]) -> bool:
    """POST an alert to the monitoring webhook (logged when none is set); True when sent."""
    if not webhook_url:
        log.warning("no alert webhook configured; alert: %s", payload.get("text", ""))
        return False
    import requests

    try:
        response = requests.post(webhook_url, json=payload, timeout=10)
        response.raise_for_status()
    except requests.RequestException as error:
        # The rollback already happened; a lost alert must not undo or block it.
        log.error("alert webhook %s failed: %s", webhook_url, error)
        return False
    return True


def evaluate_release(
    registry: ModelRegistry,
    log_dir: str | Path,
    *,
    actor: Identity | str = WATCHER,
    webhook_url: str = "",
    labels: pd.DataFrame | None = None,
    now: datetime | None = None,
    tail: PredictionLogTail | None = None,
) -> ReleaseOutcome:
    """Judge the running canary on the prediction log; roll it back or promote it.

    Args:
        registry: The registry holding the canary alias and its policy.
        log_dir: The prediction log folder that every serving worker writes.
        actor: Who acts, for the audit trail.
        webhook_url: Where a rollback alert goes (the monitoring webhook).
        labels: ``account_id`` and ``label`` of entities whose outcome is known.
        now: The end of the window (default: now).
        tail: A log reader kept between calls, so that each call parses only the lines
            logged since the last (default: the whole log since the start, read afresh).
    """
    from keel.serving.guardrails import TAG_SCORE_HISTOGRAM, evaluate_canary
    from keel.serving.log_tail import PredictionLogTail

    state = release_state(registry)
    if state.canary is None or state.champion is None:
        return ReleaseOutcome("none", None)
    if not state.canary_started_at:
        # An alias moved by hand carries no start time or policy: nothing to judge it by.
        log.warning("canary v%s was not started by keel release; not judged", state.canary)
        return ReleaseOutcome("unmanaged", None)
    started = datetime.fromisoformat(state.canary_started_at)
    policy = state.canary_policy or GuardrailPolicy()
    now = now or datetime.now(UTC)
    tail = tail or PredictionLogTail()
    frame = tail.read(log_dir, started, keep_from=now - timedelta(minutes=policy.window_minutes))
    histogram = registry.client.get_model_version(registry.name, state.canary).tags.get(
        TAG_SCORE_HISTOGRAM
    )
    verdict = evaluate_canary(
        frame,
        state.canary,
        state.champion,
        started,
        policy,
        now=now,
        labels=labels,
        expected_scores=json.loads(histogram) if histogram else None,
        canary_rows_before=tail.dropped_rows(CANARY, state.canary),
    )
    set_guardrail_gauge(verdict)
    if verdict.state == BREACHED:
        record = stop_canary(
            registry,
            actor,
            f"guardrail breach: {verdict.summary()}",
            action="canary_rollback",
            version=state.canary,
            details=verdict.to_dict(),
        )
        if record is None:
            return ReleaseOutcome("already_handled", verdict)
        post_alert(
            webhook_url,
            {
                "text": f"Keel canary version {state.canary} rolled back: {verdict.summary()}",
                "model": registry.name,
                "canary_version": state.canary,
                "champion_version": state.champion,
                "audit_record": record.id,
                "evidence": verdict.to_dict(),
            },
        )
        return ReleaseOutcome("rolled_back", verdict, record)
    if verdict.state == PROMOTE:
        record = registry.deploy(
            "canary_pass",
            actor,
            f"canary held: {verdict.summary()}",
            from_version=state.champion,
            to_version=state.canary,
            aliases={CANARY: None},
            tags=dict.fromkeys(CANARY_TAGS),
            expect={CANARY: state.canary, CHAMPION: state.champion},
            promote=state.canary,
            details=verdict.to_dict(),
        )
        if record is None:
            return ReleaseOutcome("already_handled", verdict)
        return ReleaseOutcome("promoted", verdict, record)
    return ReleaseOutcome(verdict.state, verdict)


def _new_tail() -> PredictionLogTail:
    from keel.serving.log_tail import PredictionLogTail

    return PredictionLogTail()


class ReleaseWatcher:
    """Judges the canary every few seconds in a daemon thread (the ``keel serve`` supervisor)."""

    def __init__(
        self,
        registry_config: RegistryConfig,
        log_dir: str | Path,
        interval_s: float = DEFAULT_WATCH_SECONDS,
        webhook_url: str = "",
        api_key: str = "",
    ) -> None:
        self.registry_config = registry_config
        self.log_dir = log_dir
        self.interval_s = interval_s
        self.webhook_url = webhook_url
        # The watcher's own key (keel.team.keys): it acts as its service identity, not as
        # whoever started ``keel serve``; without one it acts as the process.
        self.api_key = api_key
        self.last_outcome: ReleaseOutcome | None = None
        self.last_error = ""
        self.tail = _new_tail()  # each check parses only the lines logged since the last
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_once(self) -> ReleaseOutcome:
        from keel.access import authenticate
        from keel.registry import ModelRegistry

        actor = authenticate(key=self.api_key) if self.api_key else WATCHER
        registry = ModelRegistry(self.registry_config)
        try:
            outcome = evaluate_release(
                registry, self.log_dir, actor=actor, webhook_url=self.webhook_url, tail=self.tail
            )
        finally:
            registry.close()
        if outcome.action in ("rolled_back", "promoted"):
            log.warning("release: %s (%s)", outcome.action, outcome.verdict.summary())
        self.last_outcome = outcome
        return outcome

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_once()
                self.last_error = ""
            except Exception as error:  # the watcher outlives a registry outage
                self.last_error = f"{type(error).__name__}: {error}"
                log.warning("release watcher: %s", self.last_error)

    def start(self) -> ReleaseWatcher:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="keel-release", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
