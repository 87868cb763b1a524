"""greenpool.contrib.locust: RedisUser reports Redis commands to locust."""

from __future__ import annotations

import logging
import re
from typing import Any, Dict, Iterator, List

import gevent
import pytest
import redis

from greenpool import PoolClosed, PoolTimeout

try:
    import locust
except ImportError:  # the import tests at the end still run
    locust = None

needs_locust = pytest.mark.skipif(
    locust is None, reason="locust is not installed: pip install 'greenpool[locust]'"
)

if locust is not None:
    from locust import task
    from locust.env import Environment

    from greenpool.contrib.locust import RedisFailure, RedisUser

    class CacheUser(RedisUser):
        """A concrete user for the tests; its task is what the runner test runs."""

        stats_interval = None

        def context(self) -> Dict[str, Any]:
            return {"user": "cache"}

        @task
        def read_and_write(self) -> None:
            self.client.set("k", "v")
            self.client.get("k")


class Recorder:
    """A locust environment with every request event it fires."""

    def __init__(self, host: str | None) -> None:
        self.env = Environment(user_classes=[CacheUser], host=host)
        self.events: List[Dict[str, Any]] = []
        self.env.events.request.add_listener(lambda **event: self.events.append(event))

    def user(self, cls: type | None = None) -> Any:
        return (cls or CacheUser)(self.env)

    def stop(self) -> None:
        self.env.events.test_stop.fire(environment=self.env)


@pytest.fixture
def recorder(redis_url: str) -> Iterator[Recorder]:
    """An environment whose --host is the shared server; its test stops at teardown."""
    rec = Recorder(redis_url)
    yield rec
    rec.stop()


@needs_locust
def test_each_command_is_one_request_event(recorder):
    """A command fires one event: type redis, the command's name, its reply's length."""
    client = recorder.user().client
    client.set("greeting", "hello")
    assert client.get("greeting") == b"hello"
    client.rpush("list", "a", "b", "c")
    client.lrange("list", 0, -1)
    client.get("missing")
    names = [(e["request_type"], e["name"], e["response_length"]) for e in recorder.events]
    assert names == [
        ("redis", "SET", 0),
        ("redis", "GET", 5),
        ("redis", "RPUSH", 0),
        ("redis", "LRANGE", 3),
        ("redis", "GET", 0),
    ]
    for event in recorder.events:
        assert event["exception"] is None
        assert event["context"] == {"user": "cache"}
        assert 0 <= event["response_time"] < 10_000


@needs_locust
def test_failed_command_is_reported_then_raised(recorder):
    """A server error is a failure event naming it, and is raised to the task."""
    client = recorder.user().client
    client.set("text", "x")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE") as info:
        client.lpush("text", "y")
    event = recorder.events[-1]
    assert event["name"] == "LPUSH" and event["response_length"] == 0
    failure = event["exception"]
    assert isinstance(failure, RedisFailure) and failure.error is info.value
    assert re.fullmatch(r"ResponseError\('WRONGTYPE .*'\)", repr(failure))


@needs_locust
def test_pipeline_is_one_request(recorder):
    """A pipeline reports once, named after its distinct commands in order."""
    client = recorder.user().client
    with client.pipeline() as pipe:
        pipe.set("a", "one").get("a").set("b", "two").get("b")
        assert pipe.execute() == [True, b"one", True, b"two"]
    with client.pipeline(transaction=False) as pipe:
        pipe.execute()  # nothing queued: nothing sent, nothing reported
    with client.pipeline(transaction=False) as pipe:
        for command in ("incr", "decr", "get", "exists", "ttl", "type"):
            getattr(pipe, command)("n")
        pipe.execute()
    assert [(e["name"], e["response_length"]) for e in recorder.events] == [
        ("pipeline:SET,GET", 6),
        ("pipeline:INCRBY,DECRBY,GET,EXISTS,+2", 1 + 6),  # b"0", b"string"
    ]
    assert all(e["exception"] is None for e in recorder.events)


@needs_locust
def test_failing_pipeline_is_one_failure(recorder):
    """A pipeline whose command fails is one failure event, and raises."""
    client = recorder.user().client
    client.set("text", "x")
    with client.pipeline() as pipe:
        pipe.get("text").lpush("text", "y")
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            pipe.execute()
    (event,) = recorder.events[1:]
    assert event["name"] == "pipeline:GET,LPUSH"
    assert isinstance(event["exception"], RedisFailure)


@needs_locust
def test_watch_commands_are_reported_as_they_run(recorder):
    """WATCH and the reads after it are round trips of their own; EXEC is one more."""
    client = recorder.user().client
    with client.pipeline() as pipe:
        pipe.watch("counter")
        pipe.get("counter")
        pipe.multi()
        pipe.set("counter", 1)
        pipe.execute()
    assert [e["name"] for e in recorder.events] == ["WATCH", "GET", "pipeline:SET"]


@needs_locust
def test_pool_timeout_is_a_failure_with_its_message(redis_url, monkeypatch):
    """A user that gets no connection in time reports PoolTimeout with its message."""
    monkeypatch.setenv("GREENPOOL_MAX_CONNECTIONS", "1")
    monkeypatch.setenv("GREENPOOL_TIMEOUT", "0.05")
    monkeypatch.setenv("GREENPOOL_NAME", "locust")
    rec = Recorder(redis_url)
    try:
        holder, waiter = rec.user(), rec.user()
        pool = holder.client.connection_pool
        conn = pool.get_connection()
        try:
            with pytest.raises(PoolTimeout):
                waiter.client.get("k")
        finally:
            pool.release(conn)
        (event,) = rec.events
        assert event["name"] == "GET"
        assert repr(event["exception"]) == (
            "PoolTimeout(\"no connection from pool 'locust' within 0.05 s "
            "(max_connections=1, 1 in use, 0 dialling, 0 waiting)\")"
        )
        waiter.client.get("k")  # the pool works again once the holder is done
        assert rec.events[-1]["exception"] is None
    finally:
        rec.stop()


@needs_locust
def test_users_share_one_pool_closed_when_the_test_stops(recorder):
    """All users share one pool; test_stop closes it and a new test gets a new one."""
    first, second = recorder.user(), recorder.user()
    pool = first.client.connection_pool
    assert second.client.connection_pool is pool
    first.client.ping()
    handlers = len(recorder.env.events.test_stop._handlers)
    first.on_stop()
    assert not pool.closed  # a user stopping leaves the shared pool open
    recorder.stop()
    assert pool.closed and pool.stats().size == 0
    assert len(recorder.env.events.test_stop._handlers) == handlers - 1
    with pytest.raises(PoolClosed):
        second.client.ping()
    assert isinstance(recorder.events[-1]["exception"], RedisFailure)
    again = recorder.user()
    assert again.client.connection_pool is not pool
    assert again.client.ping() is True


@needs_locust
def test_quitting_also_closes_the_pool(recorder):
    """The pool is closed at quitting when no test_stop came first."""
    pool = recorder.user().client.connection_pool
    recorder.env.events.quitting.fire(environment=recorder.env)
    assert pool.closed


@needs_locust
def test_redis_host_wins_over_the_environment(redis_server, monkeypatch):
    """A redis:// --host beats GREENPOOL_URL; an http:// one is ignored."""
    monkeypatch.setenv("GREENPOOL_URL", f"redis://127.0.0.1:{redis_server.port}/3")
    rec = Recorder(f"redis://127.0.0.1:{redis_server.port}/2")
    try:
        assert rec.user().client.connection_pool.connection_kwargs["db"] == 2
    finally:
        rec.stop()
    rec = Recorder("http://127.0.0.1:8000")
    try:
        client = rec.user().client
        assert client.connection_pool.connection_kwargs["db"] == 3
        assert client.ping() is True
    finally:
        rec.stop()


@needs_locust
def test_pool_stats_are_logged_periodically(redis_url, caplog):
    """The pool's stats go to the greenpool.locust logger while the test runs and at its end."""

    class Chatty(CacheUser):
        stats_interval = 0.05

    caplog.set_level(logging.INFO, logger="greenpool.locust")
    rec = Recorder(redis_url)
    user = rec.user(Chatty)
    user.client.ping()
    pool = user.client.connection_pool
    line = f"pool {pool.name!r}: size=1/50 idle=1 in_use=0 dialling=0 waiting=0 checkouts=1"
    for _ in range(100):  # bounded: 100 x 0.02 s
        if any(line in r.getMessage() for r in caplog.records):
            break
        gevent.sleep(0.02)
    assert any(line in r.getMessage() for r in caplog.records)
    rec.stop()
    assert caplog.records[-1].getMessage().endswith("(test stopped, pool closed)")
    count = len(caplog.records)
    gevent.sleep(0.15)
    assert len(caplog.records) == count  # the reporter stopped with the pool


@needs_locust
def test_locust_runner_shows_redis_commands_in_its_statistics(redis_url):
    """Run by locust's own runner, users' commands fill its stats; the pool closes at the end."""
    env = Environment(user_classes=[CacheUser], host=redis_url)
    runner = env.create_local_runner()
    runner.start(5, spawn_rate=100)
    try:
        for _ in range(100):  # bounded: up to 5 s
            if env.stats.get("GET", "redis").num_requests >= 20:
                break
            gevent.sleep(0.05)
        pool = runner.user_greenlets.greenlets.copy().pop().args[0].client.connection_pool
    finally:
        runner.quit()
    assert env.stats.get("SET", "redis").num_requests >= 20
    assert env.stats.get("GET", "redis").num_requests >= 20
    assert env.stats.total.num_failures == 0 and not env.stats.errors
    assert pool.closed and pool.stats().max_connections == 50


def test_import_without_locust_names_the_extra(subprocess_python):
    """Without locust, importing the module says which extra to install."""
    result = subprocess_python(
        """
        import sys
        sys.modules["locust"] = None  # import locust now raises ImportError
        import greenpool, greenpool.contrib
        try:
            import greenpool.contrib.locust
        except ImportError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "greenpool.contrib.locust needs locust, which is not installed: "
        "pip install 'greenpool[locust]'"
    )


def test_importing_greenpool_does_not_import_locust(subprocess_python):
    """locust (which monkey-patches on import) stays out until the module is asked for."""
    result = subprocess_python(
        """
        import sys
        import greenpool, greenpool.contrib
        print("locust" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
