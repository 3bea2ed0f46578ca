"""Issue 4 benchmark: the provider HTTP path against the fake provider server on loopback.

The fake server runs in its own process (`llm-worker fake-server`) answering after --latency-ms (1 s). For a
fixed time each client keeps --in-flight requests (1000) going; we print completed requests/s and the
client process's CPU time per request (time.process_time() / completed):

  a provider/aiohttp   OpenAIProvider.compare() as the worker runs it: payload, one POST on the provider's
                       aiohttp.ClientSession (HttpEndpoint + AiohttpSender), pydantic parse, answer validation
  b provider/httpx     the same provider on httpx's default transport (HttpxSender; pool raised)
  c raw httpx          bare httpx.AsyncClient POST of the same bytes, default transport (pool raised)
  d client+aiohttp     bare httpx.AsyncClient POST on the httpx-aiohttp transport (the issue's suggestion)
  e raw aiohttp        bare aiohttp.ClientSession POST of the same bytes (the floor)
  f provider/httpx-aio the same provider on the httpx-aiohttp transport without httpx.AsyncClient
                       (HttpxSender over httpx_aiohttp.AiohttpTransport); only when named in --only

  E2E worker/http     one `llm-worker run` process with OPENAI_BASE_URL at the fake server and
                       MAX_IN_FLIGHT=--in-flight: --e2e-n pre-loaded requests, Kafka in -> HTTP -> Kafka out;
                       results/s from first to last result and the worker's CPU per result over that span
  E2E worker/mock     the same on the mock provider at --latency-ms: the CPU difference is the HTTP path

Usage: python bench/bench_http.py [--seconds 15] [--in-flight 1000] [--latency-ms 1000] [--only a,c,E2E]
       [--uvloop]  (the client on uvloop, as `llm-worker run` is; asyncio's default loop otherwise)
Other processes on the machine share the CPUs; the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import uvloop
from httpx_aiohttp import AiohttpTransport
from pydantic import SecretStr

from contracts import ProviderName
from worker.providers import build_provider
from worker.providers.base import DEFAULT_SYSTEM_PROMPT, ComparisonCall
from worker.providers.http import HttpEndpoint, HttpxSender
from worker.providers.openai import OpenAIProvider
from worker.settings import ProviderSettings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for bench.bench_worker, when run as a script
MODEL = "gpt-4.1-mini"
SERVER_PID: list[int] = []  # the fake server process, for its CPU time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_fake_server(port: int, latency_ms: float) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "fake-server",
            "--port",
            str(port),
            "--latency-ms",
            str(latency_ms),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # "fake provider server on ..." once it listens
    return proc


def the_call(i: int) -> ComparisonCall:
    return ComparisonCall(
        provider="openai",
        model=MODEL,
        system_prompt=DEFAULT_SYSTEM_PROMPT,
        user_prompt=f"Compare.\n\nEssay A: the first essay {i}.\n\nEssay B: the second essay {i}.",
    )


async def measure(name: str, one: Callable[[int], Awaitable[None]], seconds: float, in_flight: int) -> None:
    from bench.bench_worker import _cpu_s

    """Keep `in_flight` calls running for `seconds`; count the ones that finish."""
    done = failed = 0
    end = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def lane() -> None:
        nonlocal done, failed
        while time.perf_counter() < end:
            try:
                await one(next(counter))
                done += 1
            except Exception:
                failed += 1

    server_cpu0 = _cpu_s(SERVER_PID[0]) if SERVER_PID else 0.0
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(in_flight)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    server_cpu = (_cpu_s(SERVER_PID[0]) if SERVER_PID else 0.0) - server_cpu0
    per_req_ms = cpu / done * 1000 if done else float("nan")
    print(
        f"{name:<18} {done / wall:8.0f} req/s  {per_req_ms:6.3f} ms CPU/req  "
        f"({done} ok, {failed} failed in {wall:.1f} s; fake server {server_cpu / max(done, 1) * 1000:.3f} ms "
        f"CPU/req; load {os.getloadavg()[0]:.2f})",
        flush=True,
    )


async def run(args: argparse.Namespace, base_url: str) -> None:
    settings = ProviderSettings(
        openai_api_key=SecretStr("sk-bench"),
        openai_base_url=f"{base_url}/v1",
        http_max_connections=args.in_flight,
    )
    probe = build_provider(ProviderName.OPENAI, settings)
    assert isinstance(probe, OpenAIProvider)
    body = json.dumps(probe.build_payload(the_call(0))).encode()
    headers = {"authorization": "Bearer sk-bench", "content-type": "application/json"}
    limits = httpx.Limits(max_connections=args.in_flight, max_keepalive_connections=args.in_flight)
    only = set(args.only.split(",")) if args.only else None

    if only is None or "a" in only:
        provider = build_provider(ProviderName.OPENAI, settings)
        assert provider is not None

        async def via_provider(i: int) -> None:
            await provider.compare(the_call(i))

        await measure("provider/aiohttp", via_provider, args.seconds, args.in_flight)
        await provider.aclose()

    if only is None or "b" in only:
        timeout = {"connect": 5.0, "read": 60.0, "write": 60.0, "pool": 60.0}
        sender = HttpxSender(httpx.AsyncHTTPTransport(limits=limits), headers, timeout)
        endpoint = HttpEndpoint(sender, f"{base_url}/v1")
        plain = OpenAIProvider("openai", MODEL, endpoint)

        async def via_plain_provider(i: int) -> None:
            await plain.compare(the_call(i))

        await measure("provider/httpx", via_plain_provider, args.seconds, args.in_flight)
        await plain.aclose()

    if only is None or "c" in only:
        async with httpx.AsyncClient(limits=limits, timeout=60) as raw:
            url = f"{base_url}/v1/chat/completions"

            async def via_httpx(i: int) -> None:
                response = await raw.post(url, content=body, headers=headers)
                response.raise_for_status()

            await measure("raw httpx", via_httpx, args.seconds, args.in_flight)

    if only is None or "d" in only:
        transport = AiohttpTransport(limits=limits)
        async with httpx.AsyncClient(transport=transport, timeout=60) as wrapped:
            url = f"{base_url}/v1/chat/completions"

            async def via_client_aiohttp(i: int) -> None:
                response = await wrapped.post(url, content=body, headers=headers)
                response.raise_for_status()

            await measure("client+aiohttp", via_client_aiohttp, args.seconds, args.in_flight)

    if only is None or "e" in only:
        connector = aiohttp.TCPConnector(limit=args.in_flight)
        async with aiohttp.ClientSession(connector=connector) as session:
            url = f"{base_url}/v1/chat/completions"

            async def via_aiohttp(i: int) -> None:
                async with session.post(url, data=body, headers=headers) as response:
                    response.raise_for_status()
                    await response.read()

            await measure("raw aiohttp", via_aiohttp, args.seconds, args.in_flight)

    if only is not None and "f" in only:
        timeout = {"connect": 5.0, "read": 60.0, "write": 60.0, "pool": 60.0}
        sender = HttpxSender(AiohttpTransport(limits=limits), headers, timeout)
        wrapped_provider = OpenAIProvider("openai", MODEL, HttpEndpoint(sender, f"{base_url}/v1"))

        async def via_wrapped_provider(i: int) -> None:
            await wrapped_provider.compare(the_call(i))

        await measure("provider/httpx-aio", via_wrapped_provider, args.seconds, args.in_flight)
        await wrapped_provider.aclose()


async def end_to_end(base_url: str, n: int, in_flight: int, mock_ms: float | None = None) -> None:
    """With `mock_ms`, the same worker run on the mock provider at that latency instead of HTTP: the
    difference in worker CPU per request is what the HTTP path costs inside the worker."""
    from bench.bench_worker import Topology, _cpu_s, _payloads, _produce_all, _reader, _start, _stop

    topo = Topology()
    await topo.create()
    await _produce_all(topo.topics.comparison_request, _payloads(n))
    reader = await _reader(topo.topics.comparison_result)
    env = {
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": f"{base_url}/v1",
        "OPENAI_DEFAULT_MODEL": MODEL,
        "DEFAULT_PROVIDER": "openai",
        "MAX_IN_FLIGHT": str(in_flight),
        "HTTP_MAX_CONNECTIONS": str(in_flight),
    }
    label = "E2E worker/http"
    if mock_ms is not None:
        env.update(DEFAULT_PROVIDER="mock", MOCK_LATENCY_MS=str(mock_ms))
        label = "E2E worker/mock"
    proc = _start("worker", topo, env)
    try:
        seen = ok = 0
        first = last = cpu_first = cpu_last = 0.0
        deadline = time.monotonic() + 300
        while seen < n and time.monotonic() < deadline:
            batch = await reader.getmany(timeout_ms=200)
            records = [r for rs in batch.values() for r in rs]
            if records:
                now, cpu = time.perf_counter(), _cpu_s(proc.pid)
                if not first:
                    first, cpu_first = now, cpu
                last, cpu_last = now, cpu
                seen += len(records)
                ok += sum(1 for r in records if b'"winner":"Essay' in r.value)
        # Answered results only: a failure is not throughput (a run with failures says so below).
        rate = (ok - 1) / (last - first) if ok > 1 and last > first else 0.0
        cpu_ms = (cpu_last - cpu_first) / max(1, seen - 1) * 1000
        print(
            f"{label:<18} {rate:8.0f} req/s  {cpu_ms:6.3f} ms worker CPU/req (whole path)  "
            f"({seen}/{n} results, {ok} answered; load {os.getloadavg()[0]:.2f})",
            flush=True,
        )
    finally:
        _stop(proc)
        await reader.stop()
        await topo.forget_keys()  # its idempotency records (24 h TTL), as bench_worker does


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--in-flight", type=int, default=1000)
    parser.add_argument("--latency-ms", type=float, default=1000.0)
    parser.add_argument("--only", default="", help="subset of a,b,c,d,e,f,E2E (see the docstring)")
    parser.add_argument("--uvloop", action="store_true", help="run the clients on uvloop")
    parser.add_argument("--e2e-n", type=int, default=15000)
    args = parser.parse_args()
    port = free_port()
    server = start_fake_server(port, args.latency_ms)
    SERVER_PID.append(server.pid)
    print(
        f"fake server latency {args.latency_ms:.0f} ms, {args.in_flight} in flight, "
        f"{args.seconds:.0f} s each, {os.cpu_count()} CPUs, {'uvloop' if args.uvloop else 'asyncio'} loop",
        flush=True,
    )
    try:
        run_loop = uvloop.run if args.uvloop else asyncio.run
        run_loop(run(args, f"http://127.0.0.1:{port}"))
        if not args.only or "E2E" in args.only.split(","):
            from bench.bench_worker import _CREATED, _delete_topics

            asyncio.run(end_to_end(f"http://127.0.0.1:{port}", args.e2e_n, args.in_flight))
            asyncio.run(end_to_end("", args.e2e_n, args.in_flight, mock_ms=args.latency_ms))
            # Once both runs are done: deleted after the first, its logs' deletion slowed the second.
            asyncio.run(_delete_topics(_CREATED))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
