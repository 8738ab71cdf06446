"""``keel stream``: publish a generated day as events, consume them into Feast, show the lag."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from dataclasses import asdict
from datetime import date

import click

from keel.streaming.consumer import (
    DEFAULT_DURABLE,
    DEFAULT_STREAM,
    DEFAULT_SUBJECT,
    DEFAULT_URL,
    StreamSettings,
)

URL_ENV = "KEEL_NATS_URL"


def stream_settings(url: str, stream: str, subject: str, durable: str, batch: int = 1_000):
    """Settings whose state and offline files live in the data folder ($KEEL_HOME)."""
    from keel.settings import KeelPaths
    from keel.streaming.features import OFFLINE_FOLDER

    home = KeelPaths.current().home
    return StreamSettings(
        state_path=home / "streaming" / f"{durable}.sqlite",
        offline_dir=home / OFFLINE_FOLDER,
        url=url,
        stream=stream,
        subject=subject,
        durable=durable,
        batch=batch,
    )


def _options(command):
    for option in reversed(
        [
            click.option("--url", default=lambda: os.environ.get(URL_ENV, DEFAULT_URL)),
            click.option("--stream", "stream_name", default=DEFAULT_STREAM, show_default=True),
            click.option("--subject", default=DEFAULT_SUBJECT, show_default=True),
        ]
    ):
        command = option(command)
    return command


@click.group()
def stream() -> None:
    """Streaming features: account events through NATS JetStream into Feast."""


@stream.command()
@_options
@click.option("--day", "days", multiple=True, required=True, help="Day to publish (repeatable).")
@click.option("--accounts", type=int, default=None, help="Accounts (default: the data folder's).")
@click.option("--seed", type=int, default=None, help="Seed (default: the data folder's).")
@click.option("--rate", type=float, default=None, help="Events per second (default: no limit).")
def publish(
    url: str,
    stream_name: str,
    subject: str,
    days: tuple[str, ...],
    accounts: int | None,
    seed: int | None,
    rate: float | None,
) -> None:
    """Publish the generator's transactions of each day, in time order."""
    from keel.generator import GeneratorConfig, recorded_config
    from keel.settings import KeelPaths
    from keel.streaming.events import publish_days

    config = recorded_config(KeelPaths.current().generated) or GeneratorConfig()
    overrides = {k: v for k, v in {"accounts": accounts, "seed": seed}.items() if v is not None}
    config = GeneratorConfig.from_dict({**json.loads(config.to_json()), **overrides})
    try:
        chosen = [date.fromisoformat(day) for day in days]
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--day") from None
    counts = asyncio.run(publish_days(url, stream_name, subject, config, chosen, rate))
    click.echo(json.dumps(counts, indent=2))


@stream.command()
@_options
@click.option("--durable", default=DEFAULT_DURABLE, show_default=True)
@click.option("--batch", default=1_000, show_default=True, help="Messages per fetch.")
@click.option("--idle-exit", type=float, default=None, help="Stop after this many idle seconds.")
def consume(
    url: str, stream_name: str, subject: str, durable: str, batch: int, idle_exit: float | None
) -> None:
    """Keep the streaming features current until stopped (SIGTERM, Ctrl-C) or idle."""
    from keel.features import open_store
    from keel.streaming.consumer import consume as run_consumer
    from keel.streaming.consumer import register_stream_features

    settings = stream_settings(url, stream_name, subject, durable, batch)
    store = open_store()
    register_stream_features(store)

    async def run():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        return await run_consumer(settings, store, stop=stop, idle_exit_s=idle_exit)

    stats = asyncio.run(run())
    figures = {k: v for k, v in asdict(stats).items() if k != "freshness_s"}
    click.echo(json.dumps({**figures, **stats.freshness()}, indent=2))


@stream.command()
@_options
@click.option("--durable", default=DEFAULT_DURABLE, show_default=True)
def status(url: str, stream_name: str, subject: str, durable: str) -> None:
    """The consumer's lag (unacknowledged messages) and freshness, as JSON."""
    from keel.streaming.lag import consumer_lag, log_progress

    settings = stream_settings(url, stream_name, subject, durable)
    lag = asyncio.run(consumer_lag(url, stream_name, durable))
    click.echo(json.dumps({**lag, **log_progress(settings.state_path)}, indent=2))


if __name__ == "__main__":
    stream()
