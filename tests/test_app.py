"""loadtests/app.py: the load-test WSGI app, called in-process against a real server."""

from __future__ import annotations

import io
import json
import os
import wsgiref.util
import wsgiref.validate
from typing import Any, Dict, Iterator, List, Tuple

import gevent
import pytest

from greenpool._server import free_port
from loadtests import app


class Response:
    """What the app answered: status code, headers and body."""

    def __init__(self, status: str, headers: List[Tuple[str, str]], body: bytes) -> None:
        self.code = int(status.split()[0])
        self.headers = dict(headers)
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        assert self.headers["Content-Type"] == "application/json", self.text
        return json.loads(self.body)


def call(method: str, path: str, query: str = "", body: bytes = b"") -> Response:
    """Call the app as a WSGI server would, checked by wsgiref's validator."""
    environ: Dict[str, Any] = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update(
        REQUEST_METHOD=method,
        PATH_INFO=path,
        QUERY_STRING=query,
        CONTENT_LENGTH=str(len(body)),
    )
    environ["wsgi.input"] = io.BytesIO(body)
    started: List[Any] = []

    def start_response(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Any:
        started[:] = [status, headers]
        return lambda data: None

    result = wsgiref.validate.validator(app.application)(environ, start_response)
    try:
        data = b"".join(result)
    finally:
        result.close()
    return Response(started[0], started[1], data)


@pytest.fixture
def served(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The app configured for the shared server; its pool is closed afterwards."""
    app.close_pool()
    monkeypatch.setenv("GREENPOOL_URL", redis_url)
    yield
    app.close_pool()


def test_set_then_get(served):
    """/set writes a value (from the query or the body) that /get reads back."""
    assert call("GET", "/get", "key=a").json() == {"key": "loadtests:a", "value": None}
    assert call("POST", "/set", "key=a&value=hello").json() == {
        "key": "loadtests:a", "value": "hello"}
    assert call("GET", "/get", "key=a").json()["value"] == "hello"
    assert call("POST", "/set", "key=b", body="from the body".encode()).code == 200
    assert call("GET", "/get", "key=b").json()["value"] == "from the body"


def test_pipeline_counts_hits(served):
    """/pipeline runs INCR, EXPIRE and GET in one round trip."""
    call("POST", "/set", "key=p&value=v")
    assert call("GET", "/pipeline", "key=p").json() == {
        "key": "loadtests:p", "hits": 1, "value": "v"}
    assert call("POST", "/pipeline", "key=p").json()["hits"] == 2


def test_hold_takes_a_connection_and_gives_it_back(served):
    """/hold checks a connection out for the time asked and releases it."""
    assert call("GET", "/hold", "ms=10").json() == {"held_ms": 10}
    stats = call("GET", "/stats").json()
    assert stats["checkouts"] == 1 and stats["in_use"] == 0 and stats["idle"] == 1


def test_stats_describes_this_process_pool(served, server_clients, redis_server):
    """/stats is the pool's stats; the connections carry the process's pid in their name."""
    call("GET", "/get")
    stats = call("GET", "/stats").json()
    assert stats["pid"] == os.getpid()
    assert stats["name"] == f"app-{os.getpid()}"
    assert stats["max_connections"] == 50 and stats["size"] == 1
    client = app.open_pool()
    conn = client.get_connection()
    try:
        conn.send_command("CLIENT", "GETNAME")
        assert conn.read_response() == f"loadtests-app-{os.getpid()}"
    finally:
        client.release(conn)
    assert server_clients(redis_server) == 1


def test_client_name_prefix_comes_from_the_environment(served, monkeypatch):
    """GREENPOOL_CLIENT_NAME is the prefix of each process's client name."""
    monkeypatch.setenv("GREENPOOL_CLIENT_NAME", "shop")
    pool = app.open_pool()
    assert pool.connection_kwargs["client_name"] == f"shop-{os.getpid()}"
    assert app.open_pool() is pool


@pytest.mark.parametrize(
    ("path", "query", "message"),
    [
        ("/hold", "ms=abc", "ms must be an integer from 0 to 1000 (got 'abc')"),
        ("/hold", "ms=1001", "ms must be an integer from 0 to 1000 (got '1001')"),
        ("/hold", "ms=-5", "ms must be an integer from 0 to 1000 (got '-5')"),
        ("/hold", "", "ms must be an integer from 0 to 1000 (got '')"),
        ("/get", "key=" + "k" * 201, "key must be 1 to 200 characters (got 201)"),
        ("/get", "key=", "key must be 1 to 200 characters (got 0)"),
    ],
)
def test_bad_input_is_a_400_saying_what_was_expected(served, path, query, message):
    """Invalid input answers 400 with a message naming the parameter and the value."""
    response = call("GET", path, query)
    assert response.code == 400
    assert response.headers["Content-Type"].startswith("text/plain")
    assert response.text == message + "\n"


def test_unknown_path_and_wrong_method(served):
    """An unknown path is a 404 listing the endpoints; a wrong method a 405."""
    missing = call("GET", "/nope")
    assert missing.code == 404 and "/get, /set, /pipeline, /hold, /stats" in missing.text
    wrong = call("GET", "/set", "key=a&value=b")
    assert wrong.code == 405 and wrong.headers["Allow"] == "POST"


def test_pool_timeout_is_a_503_not_a_500(served, monkeypatch):
    """With the only connection held, a request gets 503 and the pool's message."""
    monkeypatch.setenv("GREENPOOL_MAX_CONNECTIONS", "1")
    monkeypatch.setenv("GREENPOOL_TIMEOUT", "0.05")
    holder = gevent.spawn(call, "GET", "/hold", "ms=1000")
    pool = app.open_pool()
    for _ in range(200):  # bounded: until the holder has its connection
        if pool.stats().in_use == 1:
            break
        gevent.sleep(0.01)
    assert pool.stats().in_use == 1
    response = call("GET", "/get", "key=a")
    assert response.code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.text == (
        f"Redis is busy: no connection from pool 'app-{os.getpid()}' within 0.05 s "
        "(max_connections=1, 1 in use, 0 dialling, 0 waiting)\n"
    )
    holder.kill()  # interrupted mid-hold, it still gives the connection back
    assert pool.stats().in_use == 0
    assert call("GET", "/get", "key=a").code == 200


def test_unreachable_redis_is_a_502(redis_url, monkeypatch):
    """Another Redis error (no server listening) answers 502 with its message."""
    app.close_pool()
    monkeypatch.setenv("GREENPOOL_URL", f"redis://127.0.0.1:{free_port()}/0")
    try:
        response = call("GET", "/get")
    finally:
        app.close_pool()
    assert response.code == 502
    assert response.text.startswith("Redis error: ConnectionError: ")


def test_close_pool_returns_the_final_stats_once(served):
    """close_pool() closes the process's pool and says what it did; a second call is a no-op."""
    call("GET", "/get")
    pool = app.open_pool()
    stats = app.close_pool()
    assert pool.closed and stats is not None and stats.checkouts == 1
    assert app.close_pool() is None
    assert app.open_pool() is not pool


def test_a_forked_child_builds_its_own_pool(subprocess_python, redis_url):
    """A pool built before a fork (gunicorn --preload) is replaced in the child."""
    result = subprocess_python(
        f"""
        import os
        os.environ["GREENPOOL_URL"] = {redis_url!r}
        from loadtests import app
        parent = app.open_pool()
        pid = os.fork()
        if pid == 0:
            from gevent import monkey
            monkey.patch_all()  # what the gevent worker does after the fork
            import redis
            child = app.open_pool()
            name = redis.Redis(connection_pool=child).client_getname()
            ok = child is not parent and name == f"loadtests-app-{{os.getpid()}}"
            app.close_pool()
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), app.open_pool() is parent)
        """,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "True"]
