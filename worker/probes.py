"""Operator endpoints on METRICS_PORT: /metrics (Prometheus), /live, /ready (JSON)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker import metrics

Readiness = Callable[[], Awaitable[dict[str, Any]]]


async def start_probe_server(host: str, port: int, readiness: Readiness) -> web.AppRunner:
    """Serve the endpoints until the returned runner is cleaned up. /ready answers 200 when healthy or
    degraded (still serving, from the local cache layer) and 503 while starting."""

    async def metrics_text(_: web.Request) -> web.Response:
        metrics.flush()
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def live(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def ready(_: web.Request) -> web.Response:
        report = await readiness()
        return web.json_response(report, status=503 if report.get("status") == "starting" else 200)

    app = web.Application()
    app.router.add_get("/metrics", metrics_text)
    app.router.add_get("/live", live)
    app.router.add_get("/ready", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
