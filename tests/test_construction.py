"""How a pool is built: one path from arguments, URL and environment.

Issue 11's list: ``max_connections=None``, URLs meaning what redis-py says,
unknown names refused at construction, pools built in code never reading
``GREENPOOL_URL``/``REDIS_URL``, one redaction, a real signature, and every
entry point going through :func:`greenpool.config.split`. Nothing here needs
a server: construction opens no connection.
"""

from __future__ import annotations

import inspect
import logging
import os
import re

import pytest
import redis
from redis.connection import parse_url

from greenpool import BlockingConnectionPool, ConfigError, config, from_env, sentinel


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("GREENPOOL_") and n != "GREENPOOL_REDIS_SERVER"]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("REDIS_URL", raising=False)


def _pool(*args, **kwargs) -> BlockingConnectionPool:
    pool = BlockingConnectionPool(*args, **kwargs)
    pool.close()
    return pool


# -- max_connections=None ----------------------------------------------------


def test_max_connections_none_means_not_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """None (redis-py's and Celery's "not set") keeps the pool bounded."""
    assert _pool(max_connections=None).max_connections == 50
    assert _pool(None, 3).timeout == 3.0
    monkeypatch.setenv("GREENPOOL_MAX_CONNECTIONS", "7")
    pool = _pool(max_connections=None)
    assert (pool.max_connections, pool.sources["max_connections"]) == (7, "environment")


def test_redis_client_default_arguments_are_accepted() -> None:
    """What redis.Redis passes its default pool, greenpool's takes (the
    redis-py suite swaps greenpool in there)."""
    captured = {}

    class Capture(redis.ConnectionPool):
        def __init__(self, **kwargs):
            captured.update(kwargs)
            super().__init__(**kwargs)

    client = redis.Redis(connection_pool=None, client_name="x")
    client.close()
    redis.client.ConnectionPool, saved = Capture, redis.client.ConnectionPool
    try:
        redis.Redis(client_name="x").close()
    finally:
        redis.client.ConnectionPool = saved
    assert "max_connections" in captured and captured["max_connections"] is None
    pool = _pool(**captured)
    assert pool.max_connections == 50 and pool.connection_kwargs["client_name"] == "x"
    # redis-py 4.6 also passes socket_keepalive=None, socket_keepalive_options=None.
    assert pool.connection_kwargs["socket_keepalive"] is True
    assert pool.connection_kwargs["socket_keepalive_options"]


@pytest.mark.parametrize("name", ["max_connections", "socket_keepalive", "socket_keepalive_options"])
def test_none_means_not_set_where_redis_py_passes_it(name: str) -> None:
    """None for these is "not set" (redis.Redis() and Celery pass it): the
    environment's setting, else greenpool's default, applies."""
    pool = _pool(**{name: None})
    assert pool.max_connections == 50
    assert pool.connection_kwargs["socket_keepalive"] is True
    assert pool.connection_kwargs["socket_keepalive_options"]


# -- URLs mean what redis-py says ----------------------------------------------


@pytest.mark.parametrize("url", [
    "redis://localhost/2",
    "redis://localhost/2?db=3",
    "redis://localhost?db=4&socket_keepalive=&socket_timeout=",
    "redis://user:secret@localhost:6380/1?socket_timeout=2.5&retry_on_timeout=Yes",
    "unix:///tmp/redis.sock?db=5",
    "rediss://localhost:6390/0?ssl_check_hostname=false",
])
def test_from_url_gives_redis_py_options_redis_py_meaning(url: str) -> None:
    """Every redis-py option in the URL reaches the connection as parse_url reads it."""
    pool = BlockingConnectionPool.from_url(url)
    pool.close()
    expected = parse_url(url)
    assert pool.connection_class is expected.pop("connection_class", redis.Connection)
    for key, value in expected.items():
        assert pool.connection_kwargs[key] == value, key


def test_from_url_url_beats_keywords_for_redis_py_options() -> None:
    """As in redis-py's from_url, the URL's options win over keywords; an
    explicit connection_class wins over the scheme's."""
    pool = BlockingConnectionPool.from_url("redis://h:6380/3", db=1, port=1)
    assert (pool.connection_kwargs["db"], pool.connection_kwargs["port"]) == (3, 6380)
    pool = BlockingConnectionPool.from_url("rediss://h", connection_class=redis.Connection)
    assert pool.connection_class is redis.Connection


def test_from_url_keyword_beats_query_for_greenpool_settings() -> None:
    """greenpool's settings: keyword > URL query > environment > default."""
    pool = BlockingConnectionPool.from_url("redis://h?min_idle=2&max_connections=9", max_connections=4)
    assert (pool.max_connections, pool.sources["max_connections"]) == (4, "argument")
    assert (pool.options["min_idle"], pool.sources["min_idle"]) == (2, "url")


# -- unknown names and classes are refused at construction ----------------------


def test_unknown_keyword_is_refused_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=re.escape(
            "unknown keyword argument idle_timout (did you mean idle_timeout?): neither a "
            "greenpool setting nor a parameter of redis.connection.Connection")):
        BlockingConnectionPool(idle_timout=5)
    with pytest.raises(ConfigError, match=re.escape("unknown keyword argument sockettimeout "
                                                    "(did you mean socket_timeout?)")):
        from_env({}, sockettimeout=5)


def test_unknown_url_query_option_is_refused_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=re.escape(
            "unknown URL query option max_conections (did you mean max_connections?)")):
        BlockingConnectionPool.from_url("redis://h?max_conections=5")
    with pytest.raises(ConfigError, match="unknown URL query option max_conections"):
        from_env({"REDIS_URL": "redis://h?max_conections=5"})


def test_parameters_are_checked_against_the_connection_class() -> None:
    """A TCP option given to a Unix-socket pool is as unknown as a typo."""
    with pytest.raises(ConfigError, match="unknown keyword argument host: .*UnixDomainSocketConnection"):
        BlockingConnectionPool(connection_class=redis.UnixDomainSocketConnection, path="/x", host="h")
    _pool(connection_class=redis.UnixDomainSocketConnection, path="/x", db=2)
    _pool(connection_class=redis.SSLConnection, ssl_check_hostname=False)


def test_queue_class_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="queue_class is not supported: greenpool queues waiters itself"):
        BlockingConnectionPool(queue_class=list)


@pytest.mark.parametrize("bad", [int, "redis.Connection", redis.Connection(), redis.ConnectionPool, redis.Redis])
def test_connection_class_must_be_a_redis_py_connection_class(bad) -> None:
    with pytest.raises(ConfigError, match=r"connection_class must be a redis-py connection class .* \(got "):
        BlockingConnectionPool(connection_class=bad)


class _StandIn:
    """A connection stand-in as redis-py's own pool tests use: no socket."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self._sock = None

    def connect(self):
        self._sock = object()

    def disconnect(self):
        self._sock = None


def test_a_stand_in_connection_class_is_lent_and_bounded() -> None:
    """A class with connect() and disconnect() is a connection class to
    redis-py's pools, and to greenpool's: lent, reused, bounded."""
    pool = BlockingConnectionPool(connection_class=_StandIn, max_connections=1, timeout=0.05, foo="bar")
    try:
        conn = pool.get_connection()
        assert isinstance(conn, _StandIn) and conn.kwargs["foo"] == "bar"
        assert pool.pid == os.getpid()  # what redis-py's callers compare conn.pid with
        with pytest.raises(redis.ConnectionError):
            pool.get_connection()
        pool.release(conn)
        assert pool.get_connection() is conn
    finally:
        pool.close()


def test_refused_construction_leaves_nothing_behind() -> None:
    """A refused pool registers no fork hook: it is refused before any state."""
    from greenpool import _fork

    before = set(_fork._REGISTERED)
    for bad in ({"idle_timout": 5}, {"connection_class": int}, {"max_connections": 0}):
        with pytest.raises(ConfigError):
            BlockingConnectionPool(**bad)
    assert set(_fork._REGISTERED) <= before


# -- the environment: never the URL for pools built in code ---------------------


def test_pool_built_in_code_never_reads_the_url_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unrelated REDIS_URL must not reconfigure, or break, a pool built in code."""
    monkeypatch.setenv("REDIS_URL", "redis://other:6390/3?max_connections=1&timeout=0")
    pool = _pool(host="h", port=1)
    assert (pool.max_connections, pool.timeout) == (50, 20.0)
    assert (pool.connection_kwargs["host"], pool.connection_kwargs["port"]) == ("h", 1)
    monkeypatch.setenv("REDIS_URL", "localhost:6379")
    monkeypatch.setenv("GREENPOOL_URL", "not a url")
    _pool(host="h")
    pool = BlockingConnectionPool.from_url("redis://mine:7000")
    assert pool.connection_kwargs["host"] == "mine"


def test_pool_built_in_code_reads_the_setting_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The other GREENPOOL_* variables apply to every pool, below explicit arguments."""
    monkeypatch.setenv("GREENPOOL_IDLE_TIMEOUT", "1m")
    monkeypatch.setenv("GREENPOOL_MIN_IDLE", "1")
    pool = _pool(min_idle=0)
    assert (pool.options["idle_timeout"], pool.sources["idle_timeout"]) == (60.0, "environment")
    assert (pool.options["min_idle"], pool.sources["min_idle"]) == (0, "argument")


def test_from_env_reads_the_url_and_its_own_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GREENPOOL_MIN_IDLE", "3")  # os.environ: not the environ given
    pool = from_env({"APP_URL": "redis://h:6390/2?max_connections=3", "APP_TIMEOUT": "1s"}, prefix="APP_")
    pool.close()
    kw = pool.connection_kwargs
    assert (kw["host"], kw["port"], kw["db"]) == ("h", 6390, 2)
    assert (pool.max_connections, pool.timeout, pool.options["min_idle"]) == (3, 1.0, 0)
    pool = from_env({})
    pool.close()
    assert (pool.connection_kwargs.get("host", "localhost"), pool.sources["url"]) == ("localhost", "default")


# -- secrets -------------------------------------------------------------------


@pytest.mark.parametrize("text, shown", [
    ("redis://user:s3cret@h:6379/0", "redis://user:***@h:6379/0"),
    ("redis://:s3cret@h", "redis://:***@h"),
    ("redis://h/0?password=s3cret&db=1", "redis://h/0?password=***&db=1"),
    ("redis://h/0?db=1&password=s3cret", "redis://h/0?db=1&password=***"),
    ("rediss://u:p%40ss@h?x=a@b", "rediss://u:***@h?x=a@b"),
    ("unix:///tmp/s.sock?password=s3cret", "unix:///tmp/s.sock?password=***"),
    ("unix:///tmp/s.sock", "unix:///tmp/s.sock"),
    ("no url here", "no url here"),
])
def test_redact(text: str, shown: str) -> None:
    assert config.redact(text) == shown


def test_no_error_shows_a_password(caplog: pytest.LogCaptureFixture) -> None:
    """A ConfigError about a URL masks both kinds of password."""
    caplog.set_level(logging.DEBUG, logger="greenpool")
    for url in ("http://:s3cret@h?password=s3cret", "redis://:s3cret@h?password=s3cret&idle_timeout=x",
                "redis://:s3cret@h?password=s3cret&max_conections=1"):
        with pytest.raises(ValueError) as info:
            BlockingConnectionPool.from_url(url)
        assert "s3cret" not in str(info.value)
        with pytest.raises(ValueError) as info:
            from_env({"GREENPOOL_URL": url})
        assert "s3cret" not in str(info.value)
    assert "s3cret" not in caplog.text


def test_repr_has_redis_py_description_without_secrets() -> None:
    pool = _pool(host="localhost", port=6379, db=1, client_name="test-client",
                 username="myuser", password="secret_password_123")
    text = repr(pool)
    assert "host=localhost,port=6379,db=1,client_name=test-client" in text
    assert "secret_password_123" not in text and "myuser" not in text
    assert "<REDACTED>" in text and "size=0/50" in text
    pool = _pool(connection_class=redis.UnixDomainSocketConnection, path="/abc", db=1, client_name="c")
    assert "path=/abc,db=1,client_name=c" in repr(pool)
    # Only what was given, as redis-py lists it: no db=0 filled in.
    assert "(<redis.connection.Connection(host=localhost,port=6379,client_name=c)>)>" in repr(
        _pool(host="localhost", port=6379, client_name="c"))


# -- one construction path, a real signature -------------------------------------


def test_signature_lists_every_setting_as_a_keyword() -> None:
    """help() and IDEs see every setting; no private parameter, no object() default."""
    for cls in (BlockingConnectionPool, sentinel.SentinelBlockingConnectionPool):
        parameters = inspect.signature(cls).parameters
        assert not [name for name in parameters if name.startswith("_")]
        assert "object at" not in str(inspect.signature(cls))
    parameters = inspect.signature(BlockingConnectionPool).parameters
    settings = [s.name for s in config.SETTINGS if s.name != "url"]
    assert [n for n in parameters if n in settings] == settings
    for name in settings[2:]:
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert parameters[name].annotation != inspect.Parameter.empty
        assert f":param {name}:" in (BlockingConnectionPool.__doc__ or "")
    assert repr(config.DEFAULT) == "DEFAULT"


def test_every_entry_point_splits_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool, from_url, from_env and the Sentinel pool refuse the same typo."""
    calls = []
    real = config.split

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(config, "split", spy)
    for build in (
        lambda: BlockingConnectionPool(min_idel=1),
        lambda: BlockingConnectionPool.from_url("redis://h", min_idel=1),
        lambda: from_env({}, min_idel=1),
        lambda: sentinel.SentinelBlockingConnectionPool("svc", redis.sentinel.Sentinel([]), min_idel=1),
        lambda: sentinel.from_env({"GREENPOOL_SENTINELS": "127.0.0.1:1", "GREENPOOL_SENTINEL_SERVICE": "s"},
                                  min_idel=1),
    ):
        before = len(calls)
        with pytest.raises(ConfigError, match=re.escape("min_idel (did you mean min_idle?)")):
            build()
        assert len(calls) == before + 1


def test_from_url_reads_setting_variables_but_not_the_url_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """from_url(): its URL, then GREENPOOL_* settings below the query's."""
    monkeypatch.setenv("GREENPOOL_URL", "redis://elsewhere:1/9")
    monkeypatch.setenv("GREENPOOL_MIN_IDLE", "2")
    monkeypatch.setenv("GREENPOOL_TIMEOUT", "4")
    pool = BlockingConnectionPool.from_url("redis://h:6390/1?timeout=1")
    pool.close()
    assert (pool.connection_kwargs["host"], pool.connection_kwargs["db"]) == ("h", 1)
    assert (pool.options["min_idle"], pool.sources["min_idle"]) == (2, "environment")
    assert (pool.timeout, pool.sources["timeout"]) == (1.0, "url")


def test_url_is_not_a_constructor_keyword() -> None:
    with pytest.raises(ConfigError, match=re.escape(
            "url is not a keyword argument of the pool: use BlockingConnectionPool.from_url(url, ...)")):
        BlockingConnectionPool(url="redis://h")


def test_pools_build_with_redis_py_names_rebound_to_greenpool(monkeypatch: pytest.MonkeyPatch) -> None:
    """A program may make greenpool redis-py's pool everywhere by rebinding
    redis.ConnectionPool (redis-py's suite is run so): the pool still builds."""
    import redis.connection

    for module in (redis, redis.connection):
        monkeypatch.setattr(module, "ConnectionPool", BlockingConnectionPool)
        monkeypatch.setattr(module, "BlockingConnectionPool", BlockingConnectionPool)
    pool = redis.ConnectionPool(host="localhost", max_connections=3)
    assert isinstance(pool, BlockingConnectionPool) and pool.max_connections == 3
    pool.close()

