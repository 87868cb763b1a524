"""A small WSGI app for load tests: Redis through one greenpool pool per process.

Endpoints (JSON replies, errors as short text):

``GET /get?key=K``
    ``{"key": K, "value": V}``, V null when K is unset.
``POST /set?key=K&value=V``
    ``SET K V`` (V from the request body when the query has none).
``GET /pipeline?key=K``
    ``INCR``, ``EXPIRE`` and ``GET`` in one MULTI/EXEC pipeline.
``GET /hold?ms=N``
    Holds a pooled connection for N ms (0 to 1000) to create contention.
``GET /stats``
    The process's pool statistics (``pool.stats().as_dict()``) and its pid.

Keys are prefixed with ``loadtests:``. No connection within the pool's
timeout answers 503 with the pool's message; bad input 400; another Redis
error 502. None of them is a 500 with a traceback.

The pool comes from ``GREENPOOL_*`` variables (:func:`greenpool.from_env`),
built on first use in each process and never at import, so with gunicorn
``--preload`` (the master imports this module, then forks) every worker
builds its own after the fork. The connections' ``CLIENT SETNAME`` is
``$GREENPOOL_CLIENT_NAME-<pid>`` (``loadtests-app-<pid>`` by default), so
``CLIENT LIST`` tells which worker holds which connection.
gunicorn.conf.py calls :func:`open_pool` after the fork and :func:`close_pool`
at worker exit.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple
from urllib.parse import parse_qsl

import gevent
import redis

import greenpool

__all__ = ["application", "open_pool", "close_pool"]

logger = logging.getLogger("loadtests.app")

KEY_PREFIX = "loadtests:"
MAX_HOLD_MS = 1000
MAX_KEY_LENGTH = 200
MAX_BODY = 64 * 1024

_pool: Optional[greenpool.BlockingConnectionPool] = None
_pool_pid: Optional[int] = None

Reply = Tuple[str, Any]  # (status, JSON-able body)


class BadRequest(Exception):
    """The request's input is invalid; the message says what was expected."""


# -- the pool, one per process ---------------------------------------------


def open_pool() -> greenpool.BlockingConnectionPool:
    """Return this process's pool, building it on first use after a fork."""
    global _pool, _pool_pid
    pid = os.getpid()
    if _pool is None or _pool_pid != pid:
        # A pool inherited from a parent (built before the fork) has already
        # dropped the parent's connections (greenpool does it at fork); it is
        # replaced rather than reused so that its client name carries our pid.
        base = os.environ.get("GREENPOOL_CLIENT_NAME") or "loadtests-app"
        _pool = greenpool.from_env(
            client_name=f"{base}-{pid}",
            name=os.environ.get("GREENPOOL_NAME") or f"app-{pid}",
            decode_responses=True,
        )
        _pool_pid = pid
    return _pool


def close_pool() -> Optional[greenpool.PoolStats]:
    """Close this process's pool if it has one; return its final statistics."""
    global _pool
    pool, _pool = _pool, None
    if pool is None or _pool_pid != os.getpid():
        return None
    stats = pool.stats()
    pool.close()
    return stats


def _client() -> redis.Redis:
    # A Redis object is cheap: the pool holds the connections.
    return redis.Redis(connection_pool=open_pool())


# -- input -----------------------------------------------------------------


def _key(query: Dict[str, str]) -> str:
    key = query.get("key", "key")
    if not key or len(key) > MAX_KEY_LENGTH:
        raise BadRequest(f"key must be 1 to {MAX_KEY_LENGTH} characters (got {len(key)})")
    return KEY_PREFIX + key


def _milliseconds(query: Dict[str, str]) -> int:
    text = query.get("ms", "")
    if not text.isdigit() or not 0 <= int(text) <= MAX_HOLD_MS:
        raise BadRequest(f"ms must be an integer from 0 to {MAX_HOLD_MS} (got {text!r})")
    return int(text)


def _body(environ: Dict[str, Any]) -> str:
    length_text = environ.get("CONTENT_LENGTH") or "0"
    if not length_text.isdigit() or int(length_text) > MAX_BODY:
        raise BadRequest(f"the body must be at most {MAX_BODY} bytes (got {length_text!r})")
    data: bytes = environ["wsgi.input"].read(int(length_text))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the body must be UTF-8 text") from None


# -- handlers ----------------------------------------------------------------


def _get(query: Dict[str, str], environ: Dict[str, Any]) -> Reply:
    key = _key(query)
    return "200 OK", {"key": key, "value": _client().get(key)}


def _set(query: Dict[str, str], environ: Dict[str, Any]) -> Reply:
    key = _key(query)
    value = query["value"] if "value" in query else _body(environ)
    _client().set(key, value)
    return "200 OK", {"key": key, "value": value}


def _pipeline(query: Dict[str, str], environ: Dict[str, Any]) -> Reply:
    key = _key(query)
    hits = key + ":hits"
    with _client().pipeline() as pipe:
        pipe.incr(hits).expire(hits, 60).get(key)
        count, _, value = pipe.execute()
    return "200 OK", {"key": key, "hits": count, "value": value}


def _hold(query: Dict[str, str], environ: Dict[str, Any]) -> Reply:
    milliseconds = _milliseconds(query)
    pool = open_pool()
    conn = pool.get_connection()
    try:
        conn.send_command("PING")
        conn.read_response()
        gevent.sleep(milliseconds / 1000)
    finally:
        pool.release(conn)
    return "200 OK", {"held_ms": milliseconds}


def _stats(query: Dict[str, str], environ: Dict[str, Any]) -> Reply:
    return "200 OK", dict(open_pool().stats().as_dict(), pid=os.getpid())


Handler = Callable[[Dict[str, str], Dict[str, Any]], Reply]
_ROUTES: Dict[str, Tuple[Tuple[str, ...], Handler]] = {
    "/get": (("GET",), _get),
    "/set": (("POST",), _set),
    "/pipeline": (("GET", "POST"), _pipeline),
    "/hold": (("GET",), _hold),
    "/stats": (("GET",), _stats),
}


# -- WSGI ------------------------------------------------------------------


def _text(status: str, message: str, extra: Iterable[Tuple[str, str]] = ()) -> Tuple[
        str, List[Tuple[str, str]], bytes]:
    body = (message + "\n").encode("utf-8")
    return status, [("Content-Type", "text/plain; charset=utf-8"), *extra], body


def _dispatch(environ: Dict[str, Any]) -> Tuple[str, List[Tuple[str, str]], bytes]:
    path = environ.get("PATH_INFO") or "/"
    if path not in _ROUTES:
        return _text("404 Not Found", f"no endpoint {path!r}; try one of {', '.join(_ROUTES)}")
    methods, handler = _ROUTES[path]
    if environ.get("REQUEST_METHOD", "GET") not in methods:
        allowed = ", ".join(methods)
        return _text("405 Method Not Allowed", f"{path} takes {allowed}", [("Allow", allowed)])
    query = dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))
    try:
        status, data = handler(query, environ)
    except BadRequest as exc:
        return _text("400 Bad Request", str(exc))
    except (greenpool.PoolTimeout, greenpool.TooManyWaiters) as exc:
        # The pool is saturated: tell the client to come back, as a load
        # balancer would, instead of failing with a 500 and a traceback.
        logger.warning("503 for %s: %s", path, exc)
        return _text("503 Service Unavailable", f"Redis is busy: {exc}", [("Retry-After", "1")])
    except redis.RedisError as exc:
        logger.warning("502 for %s: %s: %s", path, type(exc).__name__, exc)
        return _text("502 Bad Gateway", f"Redis error: {type(exc).__name__}: {exc}")
    return status, [("Content-Type", "application/json")], json.dumps(data).encode("utf-8")


def application(environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
    """The WSGI entry point."""
    status, headers, body = _dispatch(environ)
    start_response(status, [*headers, ("Content-Length", str(len(body)))])
    return [body]
