"""Coalesce Redis commands issued by concurrent requests into one write per event-loop turn.

With hundreds of requests in flight, a command per request per step costs a pooled-connection checkout, a
round trip and redis-py's per-call layers each time. Through redis-py (a StreamReader, read_response
coroutines, a drain per write, a sender task per idle start) a round trip measured p50 0.25 ms and 155 us
of client CPU here, against 0.10 ms and 60 us bare. So this batcher keeps one connection of its own as an
asyncio.Protocol: the commands queued during one loop turn go out packed by hiredis in one transport
write (loop.call_soon), and data_received feeds a hiredis Reader and resolves the waiting futures in
order, synchronously, with no task or stream in between.

- An error reply fails only its own caller, with redis-py's exception class (NoScriptError,
  ResponseError, ...: the Reader builds them with redis-py's parse_error).
- A broken connection, or replies outstanding longer than the pool's socket_timeout, fails every caller
  still waiting (redis ConnectionError / TimeoutError) and drops the connection; the next command
  reconnects, within socket_connect_timeout.
- The connection follows the client's pool: TCP, TLS or unix socket, AUTH, CLIENT SETNAME, SELECT. It
  speaks RESP2, and decodes replies when the client does.
- While the socket's send buffer is full (pause_writing), commands wait in the queue and are written on
  resume_writing; the reply timeout bounds how long.
- aclose() closes the connection; owners call it before closing their Redis client.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import hiredis
from hiredis import pack_command
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.credentials import UsernamePasswordCredentialProvider
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

SUPPORTED = (Connection, SSLConnection, UnixDomainSocketConnection)


class RedisBatch:
    def __init__(self, redis: Redis) -> None:
        pool = redis.connection_pool
        if pool.connection_class not in SUPPORTED:  # e.g. Sentinel: it finds its master its own way
            raise RedisError(f"RedisBatch cannot connect with {pool.connection_class.__name__}")
        # The pool's own connection class reads its arguments (URL parts, TLS, credentials): not connected.
        self._params: AbstractConnection = pool.connection_class(**pool.connection_kwargs)
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._queue: list[bytes] = []  # non-empty: a flush is scheduled, or waits for connect/resume
        self._queued: list[asyncio.Future[Any]] = []
        self._closed = False

    async def execute(self, *command: Any) -> Any:
        return await self.submit(*command)

    def submit(self, *command: Any) -> asyncio.Future[Any]:
        """Queue a command; the future gets its reply (or its error). For callers that coalesce further and
        hand replies out from a done-callback instead of awaiting."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            future.set_exception(RedisConnectionError("RedisBatch is closed"))
            return future
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append(pack_command(command))
        self._queued.append(future)
        return future

    async def aclose(self) -> None:
        """Close the connection. Callers still waiting get a ConnectionError, and so do later commands."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.wait([self._connecting])
        closed = RedisConnectionError("RedisBatch closed")
        _fail(self._queued, closed)
        self._queue, self._queued = [], []
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close(closed)
            await conn.closed

    def _flush(self) -> None:
        if not self._queue:
            return
        conn = self._conn
        if conn is None or not conn.usable:
            if self._connecting is None and not self._closed:
                self._connecting = asyncio.get_running_loop().create_task(self._connect())
            return
        if conn.paused:
            return
        data, futures = b"".join(self._queue), self._queued
        self._queue, self._queued = [], []
        conn.send(data, futures)

    async def _connect(self) -> None:
        try:
            self._conn = await self._open()
        except Exception as exc:  # every command queued for this connection gets the error
            _fail(self._queued, exc)
            self._queue, self._queued = [], []
        finally:
            self._connecting = None
        self._flush()

    async def _open(self) -> _Connection:
        p = self._params
        loop = asyncio.get_running_loop()
        enc = p.encoder
        decode = {"encoding": enc.encoding, "errors": enc.encoding_errors} if enc.decode_responses else {}
        reader = hiredis.Reader(replyError=BaseParser.parse_error, **decode)

        def protocol() -> _Connection:
            return _Connection(reader, p.socket_timeout, self._flush)

        where = p._host_error()
        try:
            async with asyncio.timeout(p.socket_connect_timeout):
                if isinstance(p, UnixDomainSocketConnection):
                    _, conn = await loop.create_unix_connection(protocol, p.path)
                else:
                    assert isinstance(p, Connection)
                    tls = p.ssl_context.get() if isinstance(p, SSLConnection) else None
                    _, conn = await loop.create_connection(protocol, p.host, p.port, ssl=tls)
                    _keepalive(conn, p)
                try:
                    await self._handshake(conn)
                except BaseException:
                    conn.close(RedisConnectionError("connection setup failed"))
                    raise
        except TimeoutError as exc:  # before OSError: the builtin TimeoutError is one
            raise RedisTimeoutError(f"Timeout connecting to Redis at {where}") from exc
        except OSError as exc:
            raise RedisConnectionError(f"Error connecting to Redis at {where}: {exc}") from exc
        return conn

    async def _handshake(self, conn: _Connection) -> None:
        """AUTH, CLIENT SETNAME and SELECT as the pool's connections do, in one round trip."""
        p = self._params
        commands: list[tuple[Any, ...]] = []
        if p.credential_provider or p.username or p.password:
            credentials = p.credential_provider or UsernamePasswordCredentialProvider(p.username, p.password)
            commands.append(("AUTH", *await credentials.get_credentials_async()))
        if p.client_name:
            commands.append(("CLIENT", "SETNAME", p.client_name))
        if int(p.db):
            commands.append(("SELECT", p.db))
        if not commands:
            return
        futures = [asyncio.get_running_loop().create_future() for _ in commands]
        conn.send(b"".join(pack_command(c) for c in commands), futures)
        for reply in await asyncio.gather(*futures, return_exceptions=True):
            if isinstance(reply, BaseException):
                raise reply


class _Connection(asyncio.Protocol):
    """One connection: writes packed commands and hands the replies to the waiting futures in order."""

    def __init__(self, reader: hiredis.Reader, timeout_s: float | None, on_writable: Callable[[], None]):
        self.reader = reader
        self.timeout_s = timeout_s
        self.on_writable = on_writable  # the batcher's flush: the queue may go out now (or reconnect)
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.usable = False  # connected, in step with Redis, not closing
        self.paused = False
        self.loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._progress_at = 0.0  # last time a reply arrived, or the first one was awaited
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        self.usable = True

    def send(self, data: bytes, futures: list[asyncio.Future[Any]]) -> None:
        assert self.transport is not None
        if not self.waiting:
            self._progress_at = self.loop.time()
            if self.timeout_s and self._timer is None:
                self._timer = self.loop.call_at(self._progress_at + self.timeout_s, self._check_timeout)
        self.waiting.extend(futures)
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        try:
            while (reply := self.reader.gets()) is not False:
                future = waiting.popleft()
                if future.done():  # its caller gave up (cancelled)
                    continue
                if isinstance(reply, Exception):  # an error reply, as redis-py's exception
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked for
            self.drop(RedisConnectionError(f"Redis protocol error: {exc!r}"))
            return
        self._progress_at = self.loop.time()

    def _check_timeout(self) -> None:
        """Replies outstanding with nothing arriving for timeout_s: out of step, so drop the socket. One timer
        per timeout_s at most, re-armed from the last progress, instead of one per command."""
        self._timer = None
        if not self.waiting or not self.usable or self.timeout_s is None:
            return
        due = self._progress_at + self.timeout_s
        if self.loop.time() < due:
            self._timer = self.loop.call_at(due, self._check_timeout)
            return
        self.drop(RedisTimeoutError(f"no reply from Redis within {self.timeout_s} s"))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.on_writable()

    def drop(self, exc: Exception) -> None:
        """Fail every waiting caller and abort the connection; the next command reconnects."""
        self.close(exc, abort=True)

    def close(self, exc: Exception, abort: bool = False) -> None:
        """Fail every waiting caller; unless aborted, what is written still reaches Redis, then the socket
        closes."""
        self.usable = False
        _fail(self.waiting, exc)
        self.waiting.clear()
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        if self._timer is not None:
            self._timer.cancel()
        lost = RedisConnectionError("Connection to Redis lost")
        lost.__cause__ = exc
        _fail(self.waiting, lost)
        self.waiting.clear()
        self.closed.set_result(None)
        self.on_writable()  # commands still queued go out on a new connection


def _keepalive(conn: _Connection, p: Connection) -> None:
    sock = conn.transport.get_extra_info("socket") if conn.transport is not None else None
    if sock is not None and p.socket_keepalive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        options: dict[int, int | bytes] = p.socket_keepalive_options  # type: ignore[assignment]
        for option, value in options.items():
            sock.setsockopt(socket.SOL_TCP, option, value)


def _fail(futures: list[asyncio.Future[Any]] | deque[asyncio.Future[Any]], exc: Exception) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc)
