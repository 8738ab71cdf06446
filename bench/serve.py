"""Benchmark: ``keel serve`` against a bare FastAPI app, same client, workers and concurrency.

Both serve one account per ``POST /v1/predict`` from the Redis online store at 127.0.0.1:6379
with the same LightGBM booster, under uvicorn with `WORKERS` workers, loaded by ``wrk``
(`CONNECTIONS` connections, one thread, `DURATION_S` seconds after a `WARMUP_S` warm-up) on
127.0.0.1 only:

- ``keel``: the full request path (API key, Feast features with event times, canary routing on
  `CANARY_SHARE` of accounts, the shadow model on every request, prediction log, metrics).
  Each request names an account not asked before (``cache_hits`` shows it), so the prediction
  cache cannot help.
- ``bare``: `bench/serve_baseline/app.py`, one ``HGETALL`` and the booster, nothing else.
- ``keel_cache_hits``: the same server asked again and again for `HOT_ACCOUNTS` accounts.

The two servers are measured in alternating rounds (`ROUNDS`, medians reported) and each run
also records the server's CPU time per request, which other work on the machine disturbs far
less than throughput and latency do.

Before the load both answer the same accounts, and the champion's scores must be equal: the
run exits non-zero if any differs. ``wrk`` comes from Debian: the run installs it with
``apt-get`` when it is missing and it runs as root, else it says how.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import write_result

WORKERS = 2
CONNECTIONS = 16
DURATION_S = 10
WARMUP_S = 2
ROUNDS = 3
ACCOUNTS = 100_000  # enough that no measured request repeats an account
CANARY_SHARE = 0.1
HOT_ACCOUNTS = 100
CHECKED_ACCOUNTS = 200
GOAL_RPS_RATIO, GOAL_P99_RATIO = 0.8, 1.25

# One thread: the request counter below is per thread, so every request names a new account.
_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = "{key}"
local n = {offset}
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, '{{"account_ids":[' .. ((n % {accounts}) + 1) * 10 .. ']}}')
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"connect":%d,'
    .. '"read":%d,"write":%d,"status":%d,"timeout":%d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def wrk_binary() -> str:
    """The ``wrk`` on the path, installed from Debian first when it is missing and we may."""
    found = shutil.which("wrk")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        print("wrk is missing: apt-get install -y wrk", file=sys.stderr)
        install = ["apt-get", "install", "-y", "wrk"]
        for command in (install, ["apt-get", "update"], install):  # stale lists: update, retry
            subprocess.run(command, capture_output=True, check=False, timeout=600)
            if command is install and shutil.which("wrk"):
                break
        found = shutil.which("wrk")
    if found is None:
        raise SystemExit(
            "wrk is not installed: install it (Debian: apt-get update && apt-get install -y wrk) "
            "and run `make bench-serve` again."
        )
    return found


def run_wrk(url: str, key: str, accounts: int, offset: int, seconds: int, folder: Path) -> dict:
    """One bounded wrk run against ``url``; its throughput, latency and error counts."""
    script = folder / f"load-{offset}-{accounts}.lua"
    script.write_text(_WRK_SCRIPT.format(key=key, offset=offset, accounts=accounts))
    command = [wrk_binary(), "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", "5s"]
    result = subprocess.run(
        [*command, "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    line = next(x for x in result.stdout.splitlines() if x.startswith("WRK "))
    raw = json.loads(line[4:])
    errors = sum(raw[name] for name in ("connect", "read", "write", "status", "timeout"))
    return {
        "rps": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
        "p50_ms": round(raw["p50_us"] / 1000, 3),
        "p99_ms": round(raw["p99_us"] / 1000, 3),
        "requests": raw["requests"],
        "errors": errors,
    }


def server_cpu_seconds(process: subprocess.Popen) -> tuple[float, float]:
    """User and system CPU so far of a server's supervisor, and of it with its workers."""
    import psutil

    total = supervisor = 0.0
    root = psutil.Process(process.pid)
    for member in [root, *root.children(recursive=True)]:
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
        if member.pid == root.pid:
            supervisor = times.user + times.system
    return supervisor, total


def measure(url, key, accounts, offset, process, folder) -> dict:
    """One timed wrk run, with the server's CPU time per request (steady under other load).

    ``keel serve``'s supervisor also runs the release watcher, which judges the canary on the
    prediction log; its share is reported apart.
    """
    supervisor_before, before = server_cpu_seconds(process)
    figures = run_wrk(url, key, accounts, offset, DURATION_S, folder)
    supervisor_after, after = server_cpu_seconds(process)
    requests = max(figures["requests"], 1)
    figures["server_cpu_ms_per_request"] = round((after - before) * 1000 / requests, 3)
    figures["supervisor_cpu_ms_per_request"] = round(
        (supervisor_after - supervisor_before) * 1000 / requests, 3
    )
    return figures


def median_run(runs: list[dict]) -> dict:
    """Median of each figure over the rounds, plus every round as measured."""
    import statistics

    keys = [k for k in runs[0] if k != "rounds"]
    result = {k: round(statistics.median(run[k] for run in runs), 3) for k in keys}
    result["errors"] = sum(run["errors"] for run in runs)
    result["requests"] = sum(run["requests"] for run in runs)
    result["rounds"] = runs
    return result


def start_bare(world, model_dir: Path, port: int, log_file: Path) -> subprocess.Popen:
    from keel import features
    from keel.mirrors.feast_online_reader import OnlineFeatureReader

    with _home(world):
        store = features.open_store(overrides=world.feast_overrides)
        prefix = OnlineFeatureReader(store, "default_risk_v1")._key_prefix
    environment = {
        **os.environ,
        "BENCH_BARE_MODEL_DIR": str(model_dir),
        "BENCH_BARE_KEY_PREFIX": prefix.hex(),
        "BENCH_BARE_PROJECT": world.project,
        "BENCH_BARE_REDIS": "127.0.0.1:6379",
    }
    command = [sys.executable, "-m", "uvicorn", "bench.serve_baseline.app:app", "--port", str(port)]
    return subprocess.Popen(
        [*command, "--workers", str(WORKERS), "--log-level", "warning", "--no-access-log"],
        env=environment,
        stdout=log_file.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _home(world):
    from tests.serving_support import keel_home_env

    return keel_home_env(world.home)


def wait_http(url: str, process: subprocess.Popen, timeout: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server behind {url} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout} s")


def compare_scores(keel_url: str, bare_url: str, key: str, world) -> dict:
    """Both services' scores for the same champion-arm accounts; they must be equal."""
    import httpx

    compared, differences, worst = 0, 0, 0.0
    with httpx.Client(timeout=10) as client:
        for account_id in world.account_ids[-CHECKED_ACCOUNTS:]:
            body = {"account_ids": [account_id]}
            ours = client.post(keel_url, json=body, headers={"X-API-Key": key}).json()
            answer = ours["predictions"][0]
            if answer["arm"] != "champion":
                continue  # the bare app knows only the champion
            theirs = client.post(bare_url, json=body).json()["scores"][0]
            compared += 1
            gap = abs(answer["score"] - theirs)
            worst = max(worst, gap)
            differences += gap > 1e-12
    return {"accounts": compared, "differences": differences, "max_abs_difference": worst}


def metric_total(url: str, name: str) -> float:
    import httpx

    from tests.serving_support import metric_value

    return metric_value(httpx.get(url, timeout=10).text, name)


def main() -> None:
    import httpx
    import redis

    from keel.registry import ModelRegistry
    from keel.serving.auth import KeyStore
    from keel.serving.deployments import load_registered_model
    from keel.serving.guardrails import GuardrailPolicy
    from keel.serving.release import set_shadow, start_canary
    from keel.settings import KeelPaths
    from keel.training import save_risk_model
    from tests.serving_support import (
        build_world,
        delete_redis_project,
        free_port,
        start_server,
        stop_server,
        wait_ready,
    )

    wrk_binary()
    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping()
    except redis.exceptions.ConnectionError as error:
        raise SystemExit(
            "Redis is not reachable on 127.0.0.1:6379: start it (Debian: apt-get install "
            "redis-server && redis-server --daemonize yes) and run the benchmark again."
        ) from error
    folder = Path(tempfile.mkdtemp(prefix="keel-bench-serve-"))
    world = build_world(KeelPaths(folder / "keel-home"), "redis", accounts=ACCOUNTS)
    processes: list[subprocess.Popen] = []
    try:
        with _home(world), ModelRegistry(world.registry_config()) as registry:
            # The two bench models differ on purpose; the canary must keep serving throughout
            # (the release watcher still judges it every few seconds).
            lenient = GuardrailPolicy(
                max_psi=100.0,
                max_p99_ratio=100.0,
                min_p99_excess_ms=10_000.0,
                promote_after_requests=10**9,
                promote_after_minutes=10**6,
            )
            start_canary(
                registry, world.challenger, actor="bench", share=CANARY_SHARE, policy=lenient
            )
            set_shadow(registry, world.challenger, actor="bench")
        key = KeyStore(world.serve_settings().resolved_keys_file()).add("bench", ["predict"])
        model_dir = save_risk_model(
            load_registered_model(world.registry_config(), world.champion), folder / "champion"
        )
        keel_port, bare_port = free_port(), free_port()
        server_log = folder / "servers.log"
        keel_server = start_server(world, keel_port, workers=WORKERS, log_file=server_log)
        processes.append(keel_server)
        bare = start_bare(world, model_dir, bare_port, server_log)
        processes.append(bare)
        wait_ready(keel_port, keel_server, timeout=600)
        keel_url = f"http://127.0.0.1:{keel_port}/v1/predict"
        bare_url = f"http://127.0.0.1:{bare_port}/v1/predict"
        wait_http(f"http://127.0.0.1:{bare_port}/docs", bare)
        ready = httpx.get(f"http://127.0.0.1:{keel_port}/readyz", timeout=10).json()
        if set(ready["models"]) != {"champion", "canary", "shadow"}:
            raise SystemExit(f"keel serve is not running canary and shadow: {ready}")
        keel_readyz = f"http://127.0.0.1:{keel_port}/readyz"
        same = compare_scores(keel_url, bare_url, key, world)

        # Unique accounts per request from here: the first CHECKED_ACCOUNTS were asked already.
        cycle = ACCOUNTS - CHECKED_ACCOUNTS
        metrics_url = f"http://127.0.0.1:{keel_port}/metrics"
        targets = {"bare": (bare_url, bare), "keel": (keel_url, keel_server)}
        stride = (cycle - 10_000) // ROUNDS  # each round's accounts; the last 10,000 warm up
        for url, _ in targets.values():
            run_wrk(url, key, cycle, cycle - 10_000, WARMUP_S, folder)
        runs: dict[str, list[dict]] = {"bare": [], "keel": [], "keel_cache_hits": []}
        hits_before = metric_total(metrics_url, "keel_serve_cache_hits_total")
        # Rounds alternate between the servers, so that a busy moment of the machine (other
        # work on the same cores) falls on both sides alike; the medians are reported.
        for round_number in range(ROUNDS):
            offset = round_number * stride
            for name, (url, process) in targets.items():
                runs[name].append(measure(url, key, cycle, offset, process, folder))
        keel_hits = metric_total(metrics_url, "keel_serve_cache_hits_total") - hits_before
        run_wrk(keel_url, key, HOT_ACCOUNTS, 0, WARMUP_S, folder)
        for _ in range(ROUNDS):
            runs["keel_cache_hits"].append(
                measure(keel_url, key, HOT_ACCOUNTS, 0, keel_server, folder)
            )
        figures = {name: median_run(name_runs) for name, name_runs in runs.items()}
        figures["keel"]["cache_hits"] = keel_hits
        metrics_text = httpx.get(f"http://127.0.0.1:{keel_port}/metrics", timeout=10).text
        models_at_end = httpx.get(keel_readyz, timeout=10).json()["models"]
    finally:
        for process in processes:
            stop_server(process)
        delete_redis_project(world.project)
    from tests.serving_support import metric_value

    keel, bare = figures["keel"], figures["bare"]
    result = {
        "keel": keel,
        "bare": bare,
        "keel_cache_hits": figures["keel_cache_hits"],
        "rps_ratio_vs_bare": round(keel["rps"] / bare["rps"], 3),
        "p99_ratio_vs_bare": round(keel["p99_ms"] / bare["p99_ms"], 3),
        "cache_hit_rps_ratio_vs_bare": round(figures["keel_cache_hits"]["rps"] / bare["rps"], 3),
        "cpu_ratio_vs_bare": round(
            keel["server_cpu_ms_per_request"] / bare["server_cpu_ms_per_request"], 3
        ),
        "goal_met": keel["rps"] / bare["rps"] >= GOAL_RPS_RATIO
        and keel["p99_ms"] / bare["p99_ms"] <= GOAL_P99_RATIO,
        "same_scores": same,
        "shadow_predictions": metric_value(
            metrics_text, "keel_serve_shadow_predictions_total", version=world.challenger
        ),
        "shadow_dropped": metric_value(metrics_text, "keel_serve_shadow_dropped_total"),
        "models_at_end": models_at_end,
        "params": {
            "workers": WORKERS,
            "connections": CONNECTIONS,
            "wrk_threads": 1,
            "duration_s": DURATION_S,
            "rounds": ROUNDS,
            "warmup_s": WARMUP_S,
            "accounts": ACCOUNTS,
            "canary_share": CANARY_SHARE,
            "shadow": True,
            "hot_accounts": HOT_ACCOUNTS,
            "cpu_count": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
    }
    write_result("serve", result)
    shutil.rmtree(folder, ignore_errors=True)
    if same["differences"] or not same["accounts"]:
        print("keel serve and the bare app gave different scores", file=sys.stderr)
        raise SystemExit(1)
    if any(figures[name]["errors"] for name in figures):
        print("some requests failed under load", file=sys.stderr)
        raise SystemExit(1)
