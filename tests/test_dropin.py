"""Contract 1: a drop-in connection_pool= for redis.Redis, RESP2 and RESP3,
hiredis and the pure-Python parser, and redis-py's URL forms."""

from __future__ import annotations

import gevent
import pytest
import redis
from pools import check_invariants
from redis.exceptions import WatchError
from test_handout import make_kwargs

from greenpool import BlockingConnectionPool, ConfigError


@pytest.fixture(params=[(2, "hiredis"), (2, "python"), (3, "hiredis"), (3, "python")], ids=str)
def client(request, make_pool):
    protocol, parser = request.param
    pool = make_pool(max_connections=3, timeout=5, **make_kwargs(protocol, parser))
    yield redis.Redis(connection_pool=pool)
    check_invariants(pool)
    assert pool.stats().in_use == 0
    assert sum(pool.stats().closed.values()) == 0 or request.node.name.startswith("test_pubsub")


def test_commands(client):
    """Plain commands round-trip."""
    assert client.set("k", "v") is True
    assert client.get("k") == b"v"
    assert client.incrby("n", 5) == 5
    assert client.hset("h", mapping={"a": "1"}) == 1
    assert client.hgetall("h") == {b"a": b"1"}


def test_pipelines_with_and_without_transaction(client):
    """Pipelines return every reply in order, transactional or not."""
    for transaction in (True, False):
        pipe = client.pipeline(transaction=transaction)
        pipe.set("p", 1).incr("p").get("p")
        assert pipe.execute() == [True, 2, b"2"]


def test_watch_multi_detects_a_conflict(client):
    """WATCH/MULTI/EXEC aborts when another caller changes the key."""
    client.set("w", 1)
    with client.pipeline() as pipe:
        pipe.watch("w")
        client.set("w", 2)  # through another connection of the pool
        pipe.multi()
        pipe.set("w", 3)
        with pytest.raises(WatchError):
            pipe.execute()
    assert client.get("w") == b"2"


def test_pubsub(client):
    """Subscribe, receive a message, and give the connection back."""
    kwargs = client.connection_pool.connection_kwargs
    if redis.VERSION < (6,) and kwargs.get("protocol") == 3 and "parser_class" in kwargs:
        pytest.skip("redis-py 5's RESP3 Python parser never delivers pub/sub messages, whatever the pool")
    pubsub = client.pubsub()
    pubsub.subscribe("chan")
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"
    client.publish("chan", "hello")
    message = pubsub.get_message(timeout=1)
    assert message["data"] == b"hello"
    pubsub.close()


def test_lua_scripts(client):
    """EVAL and registered scripts run."""
    assert client.eval("return ARGV[1]", 0, "x") == b"x"
    script = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert script(keys=["s"], args=[3]) == 3


def test_lock(client):
    """redis-py's Lock works across greenlets."""
    lock = client.lock("res", timeout=5, blocking_timeout=2)
    assert lock.acquire()
    other = gevent.spawn(lambda: client.lock("res", blocking_timeout=0.05).acquire())
    assert other.get(timeout=2) is False
    lock.release()


def test_blocking_commands(client):
    """BLPOP waits cooperatively and returns what another greenlet pushes."""
    popper = gevent.spawn(client.blpop, "q", 2)
    gevent.sleep(0.05)
    client.rpush("q", "item")
    assert popper.get(timeout=3) == (b"q", b"item") or popper.value == [b"q", b"item"]


def test_single_connection_client(make_pool):
    """single_connection_client holds one connection and gives it back on close."""
    pool = make_pool(max_connections=1)
    client = redis.Redis(connection_pool=pool, single_connection_client=True)
    assert client.ping()
    assert pool.stats().in_use == 1
    client.close()
    assert pool.stats().in_use == 0


def test_from_url_takes_query_options(redis_server):
    """from_url reads db, max_connections and timeout from the query string."""
    url = f"redis://127.0.0.1:{redis_server.port}/2?max_connections=3&timeout=1.5&idle_timeout=30s"
    with BlockingConnectionPool.from_url(url, name="u") as pool:
        assert (pool.max_connections, pool.timeout, pool.options["idle_timeout"]) == (3, 1.5, 30.0)
        assert pool.connection_kwargs["db"] == 2
        client = redis.Redis(connection_pool=pool)
        client.set("in-db-2", 1)
    assert redis.Redis(host=redis_server.host, port=redis_server.port, db=2).get("in-db-2") == b"1"


def test_from_url_explicit_arguments_win(redis_server):
    """An explicit keyword beats the same option in the URL."""
    url = f"redis://127.0.0.1:{redis_server.port}/0?max_connections=3"
    with BlockingConnectionPool.from_url(url, max_connections=7) as pool:
        assert pool.max_connections == 7


def test_from_url_schemes_pick_the_connection_class():
    """rediss:// uses SSLConnection and unix:// a Unix socket connection."""
    with BlockingConnectionPool.from_url("rediss://localhost:6380/0") as pool:
        assert issubclass(pool.connection_class, redis.SSLConnection)
    with BlockingConnectionPool.from_url("unix:///tmp/redis.sock?db=1") as pool:
        assert issubclass(pool.connection_class, redis.UnixDomainSocketConnection)
        assert "socket_keepalive" not in pool.connection_kwargs


def test_from_url_unix_socket_works(tmp_path):
    """A pool over a real Unix socket runs commands."""
    from greenpool._server import RedisServer

    path = tmp_path / "r.sock"
    with RedisServer(args=["--unixsocket", str(path), "--unixsocketperm", "700"]):
        with BlockingConnectionPool.from_url(f"unix://{path}?db=0") as pool:
            assert redis.Redis(connection_pool=pool).ping()


def test_from_url_bad_query_value_names_the_option():
    """A bad greenpool option in the URL names the option and the value."""
    with pytest.raises(ConfigError, match=r"URL query option idle_timeout must be .*\(got 'soon'\)"):
        BlockingConnectionPool.from_url("redis://localhost/0?idle_timeout=soon")


class _Token:
    """A streaming credential provider's token, as redis-py's TokenInterface reads it."""

    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user, password

    def try_get(self, key: str) -> str:
        return self.user

    def get_value(self) -> str:
        return self.password


def _auth_calls(admin: redis.Redis) -> int:
    return admin.info("commandstats").get("cmdstat_auth", {}).get("calls", 0)


def test_a_new_credential_token_is_sent_when_each_connection_is_released(make_pool, redis_server):
    """re_auth_callback (a streaming credential provider's new token) makes
    each connection AUTH with it when next released, as redis-py's pools do;
    a connection the server refuses it is closed, not lent."""
    if not hasattr(redis.Connection, "set_re_auth_token"):
        pytest.skip("redis-py before 5.1 has no streaming credentials")
    admin = redis.Redis(port=redis_server.port)
    admin.execute_command("ACL", "SETUSER", "alice", "on", ">pw1", ">pw2", "~*", "+@all")
    try:
        pool = make_pool(max_connections=2, timeout=2, username="alice", password="pw1")
        client = redis.Redis(connection_pool=pool)
        def use_both() -> None:
            both = pool.get_connection(), pool.get_connection()
            for conn in both:
                pool.release(conn)

        use_both()
        before = _auth_calls(admin)
        pool.re_auth_callback(_Token("alice", "pw2"))
        use_both()  # each sends AUTH alice pw2 when released
        assert _auth_calls(admin) == before + 2
        use_both()  # once only
        assert _auth_calls(admin) == before + 2
        pool.re_auth_callback(_Token("alice", "wrong"))
        use_both()
        assert pool.stats().closed["broken"] == 2  # refused: closed, not lent
        assert client.ping() is True  # a new connection, with the pool's own credentials
    finally:
        admin.execute_command("ACL", "DELUSER", "alice")
        admin.close()
