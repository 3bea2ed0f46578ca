"""RedisBatch on the real Redis: concurrent callers share writes, errors stay with their caller, a broken
or silent connection fails its waiting callers and the next command reconnects, and the connection
follows the client's pool (db, AUTH, client name, unix socket, TLS)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)
from redis.retry import Retry

from tests.conftest import REDIS_URL, free_port
from worker.redis_batch import RedisBatch

pytestmark = pytest.mark.connected


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def batch(redis: Redis) -> AsyncIterator[RedisBatch]:
    batch = RedisBatch(redis)
    yield batch
    await batch.aclose()


async def test_concurrent_commands_each_get_their_own_reply(
    prefix: str, redis: Redis, batch: RedisBatch
) -> None:
    try:
        await asyncio.gather(*(batch.execute("SET", f"{prefix}:{i}", i) for i in range(300)))
        values = await asyncio.gather(*(batch.execute("GET", f"{prefix}:{i}") for i in range(300)))
        assert values == [str(i).encode() for i in range(300)]
    finally:
        await redis.delete(*[f"{prefix}:{i}" for i in range(300)])


async def test_a_failing_command_fails_only_its_caller(prefix: str, redis: Redis, batch: RedisBatch) -> None:
    try:
        await redis.set(f"{prefix}:s", "text")
        ok, bad, unknown_script, after = await asyncio.gather(
            batch.execute("GET", f"{prefix}:s"),
            batch.execute("INCR", f"{prefix}:s"),
            batch.execute("EVALSHA", "0" * 40, 0),
            batch.execute("STRLEN", f"{prefix}:s"),
            return_exceptions=True,
        )
        assert ok == b"text" and after == 4
        assert type(bad) is ResponseError
        assert isinstance(unknown_script, NoScriptError)  # redis-py's class, as worker/limits.py expects
        with pytest.raises(ResponseError):
            await batch.execute("HGET", f"{prefix}:s", "field")
    finally:
        await redis.delete(f"{prefix}:s")


async def test_killed_connection_fails_its_waiting_callers_and_the_next_command_reconnects(
    prefix: str, redis: Redis, batch: RedisBatch
) -> None:
    first_id = await batch.execute("CLIENT", "ID")
    waiting = batch.submit("BLPOP", f"{prefix}:never", 10)
    await asyncio.sleep(0)  # one loop turn: it is written, so the kill finds it waiting
    await redis.client_kill_filter(_id=str(first_id))
    with pytest.raises(RedisConnectionError):
        await waiting
    assert await batch.execute("CLIENT", "ID") != first_id


async def test_replies_later_than_the_socket_timeout_fail_and_the_next_command_reconnects(
    prefix: str,
) -> None:
    redis = Redis.from_url(REDIS_URL, socket_timeout=0.2)
    batch = RedisBatch(redis)
    try:
        first_id = await batch.execute("CLIENT", "ID")
        started = time.monotonic()
        blocked = batch.submit("BLPOP", f"{prefix}:never", 5)
        queued_behind = batch.submit("PING")
        for waiting in (blocked, queued_behind):
            with pytest.raises(RedisTimeoutError):
                await waiting
        assert 0.2 <= time.monotonic() - started < 1.0
        assert await batch.execute("CLIENT", "ID") != first_id
    finally:
        await batch.aclose()
        await redis.aclose()


async def test_unreachable_redis_fails_every_caller_quickly() -> None:
    redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    batch = RedisBatch(redis)
    try:
        started = time.monotonic()
        replies = await asyncio.gather(*(batch.execute("PING") for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, RedisConnectionError) for r in replies)
        assert time.monotonic() - started < 0.5
        with pytest.raises(RedisError):  # and again: each command tries to connect
            await batch.execute("PING")
    finally:
        await batch.aclose()
        await redis.aclose()


async def test_commands_land_in_the_database_the_client_selects(prefix: str, redis: Redis) -> None:
    db3 = Redis.from_url(REDIS_URL.rsplit("/", 1)[0] + "/3")
    batch = RedisBatch(db3)
    try:
        await batch.execute("SET", f"{prefix}:db", "three")
        assert await db3.get(f"{prefix}:db") == b"three"
        assert await redis.get(f"{prefix}:db") is None
    finally:
        await db3.delete(f"{prefix}:db")
        await batch.aclose()
        await db3.aclose()


async def test_replies_are_decoded_when_the_client_decodes(redis: Redis) -> None:
    decoding = Redis.from_url(REDIS_URL, decode_responses=True)
    batch = RedisBatch(decoding)
    try:
        assert await batch.execute("ECHO", "é") == "é"
    finally:
        await batch.aclose()
        await decoding.aclose()


async def test_large_commands_wait_out_a_full_send_buffer(
    prefix: str, redis: Redis, batch: RedisBatch
) -> None:
    value = b"x" * (4 << 20)
    keys = [f"{prefix}:big{i}" for i in range(8)]
    try:
        await asyncio.gather(*(batch.execute("SET", k, value) for k in keys))  # 32 MB in one turn
        assert await asyncio.gather(*(batch.execute("STRLEN", k) for k in keys)) == [len(value)] * 8
    finally:
        await redis.delete(*keys)


async def test_closing_fails_waiting_and_later_commands(prefix: str, redis: Redis) -> None:
    batch = RedisBatch(redis)
    await batch.execute("PING")
    waiting = batch.submit("BLPOP", f"{prefix}:never", 10)
    await batch.aclose()
    with pytest.raises(RedisConnectionError):
        await waiting
    with pytest.raises(RedisConnectionError):
        await batch.execute("PING")


def _until_answering(admin: SyncRedis, proc: subprocess.Popen[bytes]) -> None:
    try:
        for _ in range(100):
            assert proc.poll() is None, "redis-server exited"
            try:
                admin.ping()
                return
            except (RedisError, OSError):
                time.sleep(0.05)  # the server is starting
        raise AssertionError("redis-server did not answer")
    finally:
        admin.close()


@pytest.fixture
def private_redis() -> Iterator[Path]:
    """A redis-server of our own on a unix socket with a password and a second ACL user."""
    assert shutil.which("redis-server"), "redis-server is not installed"
    with tempfile.TemporaryDirectory(prefix="rb") as tmp:  # short: unix socket paths are limited
        sock = Path(tmp) / "redis.sock"
        options = ["--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"]
        users = ["--requirepass", "secret", "--user", "app", "on", ">apppass", "~*", "+@all"]
        proc = subprocess.Popen(
            ["redis-server", *options, *users],
            stdout=subprocess.DEVNULL,
        )
        try:
            admin = SyncRedis(unix_socket_path=str(sock), password="secret", retry=Retry(NoBackoff(), 0))
            _until_answering(admin, proc)
            yield sock
        finally:
            proc.terminate()
            proc.wait(5)


async def test_unix_socket_auth_db_and_client_name_come_from_the_pool(private_redis: Path) -> None:
    redis = Redis.from_url(f"unix://app:apppass@{private_redis}?db=2&client_name=batcher")
    batch = RedisBatch(redis)
    try:
        assert await batch.execute("ACL", "WHOAMI") == b"app"
        assert await batch.execute("CLIENT", "GETNAME") == b"batcher"
        await batch.execute("SET", "k", "v")
        assert await redis.get("k") == b"v"  # the pool's own connections use db 2 too
        assert b" db=2 " in await batch.execute("CLIENT", "INFO")
    finally:
        await batch.aclose()
        await redis.aclose()


async def test_a_wrong_password_fails_with_an_authentication_error(private_redis: Path) -> None:
    redis = Redis(unix_socket_path=str(private_redis), password="wrong")
    batch = RedisBatch(redis)
    try:
        with pytest.raises(AuthenticationError):
            await batch.execute("PING")
    finally:
        await batch.aclose()
        await redis.aclose()


@pytest.fixture
def tls_redis() -> Iterator[tuple[int, Path]]:
    """A redis-server of our own serving only TLS, with a certificate from a throw-away CA."""
    assert shutil.which("redis-server") and shutil.which("openssl"), "redis-server and openssl are needed"
    with tempfile.TemporaryDirectory(prefix="rbtls") as tmp:
        d = Path(tmp)
        (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": True, "cwd": d}
        req = ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        subprocess.run([*req, "-x509", "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=ca"], **quiet)
        subprocess.run([*req, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1"], **quiet)
        sign = ["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-extfile", "san.ext", "-days", "1"]
        subprocess.run(["openssl", "x509", "-req", "-in", "srv.csr", *sign, "-out", "srv.crt"], **quiet)
        port = free_port()
        tls = ["--tls-port", str(port), "--tls-cert-file", str(d / "srv.crt"), "--tls-key-file"]
        tls += [str(d / "srv.key"), "--tls-ca-cert-file", str(d / "ca.crt"), "--tls-auth-clients", "no"]
        proc = subprocess.Popen(
            ["redis-server", "--port", "0", *tls, "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        try:
            ca = str(d / "ca.crt")
            admin = SyncRedis("127.0.0.1", port, ssl=True, ssl_ca_certs=ca, retry=Retry(NoBackoff(), 0))
            _until_answering(admin, proc)
            yield port, d / "ca.crt"
        finally:
            proc.terminate()
            proc.wait(5)


async def test_tls_connection_comes_from_the_pool_and_verifies_the_server(
    tls_redis: tuple[int, Path],
) -> None:
    port, ca = tls_redis
    redis = Redis.from_url(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}")
    batch = RedisBatch(redis)
    try:
        await batch.execute("SET", "over-tls", "yes")
        assert await redis.get("over-tls") == b"yes"
        assert await batch.execute("GET", "over-tls") == b"yes"
    finally:
        await batch.aclose()
        await redis.aclose()
    untrusting = Redis.from_url(f"rediss://127.0.0.1:{port}/0")  # system CAs only: not ours
    batch = RedisBatch(untrusting)
    try:
        with pytest.raises(RedisConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await batch.execute("PING")
    finally:
        await batch.aclose()
        await untrusting.aclose()
