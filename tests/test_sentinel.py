"""greenpool.sentinel: blocking pools for a Sentinel-managed service.

Real processes on loopback: a master with two replicas, a master with none,
and three sentinels monitoring both. The failover test builds its own set,
since a failover changes which server is the master.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Tuple

import gevent
import pytest
import redis
from admin import admin, close_admin_clients, wait_until  # noqa: F401
from pools import check_invariants
from redis.sentinel import Sentinel

import greenpool
from greenpool import sentinel as gs
from greenpool._server import RedisServer
from greenpool.sentinel import SentinelBlockingConnectionPool

pytestmark = pytest.mark.slow

SERVICE = "svc"
LONELY = "lonely"  # a service with no replica: replica clients fall back to the master


@dataclass
class Topology:
    """Servers for one test module: masters by service, replicas, sentinels."""

    masters: Dict[str, RedisServer]
    replicas: List[RedisServer]
    sentinels: List[RedisServer]
    servers: List[RedisServer] = field(default_factory=list)

    @property
    def addresses(self) -> List[Tuple[str, int]]:
        return [(s.host, s.port) for s in self.sentinels]

    @property
    def spec(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.addresses)




def _num_replicas(sentinel: RedisServer) -> int:
    """The replicas *sentinel* knows for SERVICE (raw SENTINEL MASTER: redis-py
    6.4's sentinel_master() fails on its own return_responses option)."""
    reply = admin(sentinel).execute_command("SENTINEL", "MASTER", SERVICE, NEVER_DECODE=True)
    if isinstance(reply, dict):  # RESP3, or a version that parses it
        fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in reply.items()}
    else:
        fields = {reply[i].decode(): reply[i + 1] for i in range(0, len(reply), 2)}
    return int(fields["num-slaves"])


@contextlib.contextmanager
def topology(replicas: int = 2) -> Iterator[Topology]:
    """Start SERVICE (with *replicas*), LONELY (none) and three sentinels."""
    servers: List[RedisServer] = []

    def start(server: RedisServer) -> RedisServer:
        servers.append(server)
        return server.start()

    try:
        masters = {SERVICE: start(RedisServer()), LONELY: start(RedisServer())}
        main = masters[SERVICE]
        copies = [start(RedisServer(args=["--replicaof", main.host, str(main.port)])) for _ in range(replicas)]
        wait_until(lambda: admin(main).info("replication")["connected_slaves"] == replicas, 10, "replication")
        args: List[str] = []
        for name, master in masters.items():
            args += ["--sentinel", "monitor", name, master.host, str(master.port), "1"]
            args += ["--sentinel", "down-after-milliseconds", name, "1000"]
            args += ["--sentinel", "failover-timeout", name, "2000"]
        sentinels = [start(RedisServer(sentinel=True, args=args)) for _ in range(3)]
        for s in sentinels:
            wait_until(lambda s=s: _num_replicas(s) == replicas, 10, "sentinel")
        yield Topology(masters, copies, sentinels, servers)
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    """One master/replicas/sentinels set shared by the module's quiet tests."""
    with topology() as t:
        yield t


@pytest.fixture
def clients() -> Iterator[List[redis.Redis]]:
    """Clients built by the test; their pools are closed at teardown."""
    made: List[redis.Redis] = []
    yield made
    for client in made:
        client.connection_pool.close()


def _address(conn: Any) -> Tuple[str, int]:
    return (conn.host, conn.port)


def _named(server: RedisServer, name: str) -> int:
    """How many connections named *name* the server has (CLIENT LIST)."""
    return sum(1 for c in admin(server).client_list() if c.get("name") == name)


# -- the pool with redis-py's Sentinel ----------------------------------------


def test_redis_py_master_for_builds_a_greenpool_pool(topo, clients):
    """Sentinel.master_for(connection_pool_class=...) gives a working greenpool pool."""
    sentinel = Sentinel(topo.addresses)
    client = sentinel.master_for(
        SERVICE, connection_pool_class=SentinelBlockingConnectionPool, max_connections=3, timeout=2
    )
    clients.append(client)
    pool = client.connection_pool
    assert isinstance(pool, greenpool.BlockingConnectionPool)
    assert (pool.max_connections, pool.timeout, pool.name) == (3, 2.0, "svc/master")
    assert client.set("k", "v") and client.get("k") == b"v"
    master = topo.masters[SERVICE]
    assert pool.master_address == (master.host, master.port)
    assert re.search(rf"sentinel 'svc' master at 127\.0\.0\.1:{master.port} size=1/3 idle=1", repr(pool))


def test_master_pool_is_bounded_and_times_out_naming_the_service(topo, clients):
    """60 greenlets share 3 connections to the master; a 4th caller times out with PoolTimeout."""
    client = gs.master_for(topo.addresses, SERVICE, max_connections=3, timeout=5, client_name="gp-bound")
    clients.append(client)
    pool = client.connection_pool
    peak = [0]

    def work(i: int) -> None:
        for _ in range(5):
            client.incr("bounded")
            check_invariants(pool)
            peak[0] = max(peak[0], pool.stats().size, _named(topo.masters[SERVICE], "gp-bound") if i == 0 else 0)

    gevent.joinall([gevent.spawn(work, i) for i in range(60)], timeout=20, raise_error=True)
    assert client.get("bounded") == b"300"
    assert peak[0] <= 3
    held = [pool.get_connection() for _ in range(3)]
    pool.timeout = 0.1
    with pytest.raises(greenpool.PoolTimeout, match=r"pool 'svc/master' within 0\.10 s \(max_connections=3, 3 in use"):
        client.get("bounded")
    for conn in held:
        pool.release(conn)
    assert pool.stats().in_use == 0


def test_replica_connections_rotate_over_the_replicas(topo, clients):
    """slave_for: successive connections go to alternate replicas, reads work, writes are refused."""
    sentinel = Sentinel(topo.addresses)
    client = sentinel.slave_for(
        SERVICE, connection_pool_class=SentinelBlockingConnectionPool, max_connections=4, timeout=2
    )
    clients.append(client)
    pool = client.connection_pool
    assert pool.name == "svc/replica" and pool.master_address is None
    conns = [pool.get_connection() for _ in range(4)]
    addresses = [_address(c) for c in conns]
    replicas = {(r.host, r.port) for r in topo.replicas}
    assert set(addresses) == replicas
    assert addresses[0] != addresses[1] and addresses[0] == addresses[2] and addresses[1] == addresses[3]
    for conn in conns:
        pool.release(conn)
    admin(topo.masters[SERVICE]).set("replicated", "yes")
    wait_until(lambda: client.get("replicated") == b"yes", 5, "replication of a write")
    with pytest.raises(redis.exceptions.ReadOnlyError):
        client.set("x", 1)
    assert pool.stats().in_use == 0
    check_invariants(pool)


def test_replica_client_falls_back_to_the_master_when_there_is_none(topo, clients):
    """replica_for a service without replicas connects to its master."""
    client = gs.replica_for(topo.spec, LONELY, max_connections=2)
    clients.append(client)
    assert client.set("lonely", 1) is True  # served by the master, so writable
    conn = client.connection_pool.get_connection()
    assert _address(conn) == (topo.masters[LONELY].host, topo.masters[LONELY].port)
    client.connection_pool.release(conn)


@pytest.mark.parametrize("check", [True, False])
def test_check_connection_reaches_the_connections(topo, clients, check):
    """check_connection is what each SentinelManagedConnection sees (redis-py decides what it checks)."""
    client = gs.master_for(topo.addresses, SERVICE, check_connection=check, max_connections=1)
    clients.append(client)
    conn = client.connection_pool.get_connection()
    assert conn.connection_pool.check_connection is check
    assert conn.connection_pool.get_master_address() == client.connection_pool.master_address
    client.connection_pool.release(conn)
    assert client.ping() is True


def test_unknown_service_fails_the_caller_with_master_not_found(topo, clients):
    """A service the sentinels do not know raises MasterNotFoundError, and no slot is lost."""
    client = gs.master_for(topo.addresses, "nosuch", max_connections=1, timeout=1)
    clients.append(client)
    with pytest.raises(redis.sentinel.MasterNotFoundError, match="No master found for 'nosuch'"):
        client.ping()
    stats = client.connection_pool.stats()
    assert stats.size == 0 and stats.dial_errors == 1 and stats.waiting == 0


def test_close_stops_the_watcher_and_its_subscription(topo):
    """close() stops the +switch-master watcher; the sentinel sees its subscriber leave."""
    client = gs.master_for(topo.addresses, SERVICE, max_connections=1, sentinel_kwargs={"client_name": "gp-close"})
    pool = client.connection_pool
    assert pool._watcher is None  # nothing runs before the first connection
    client.ping()
    watcher = pool._watcher
    assert watcher is not None and watcher.greenlet.name == "svc/master-sentinel-watch"

    def subscribers() -> int:
        return sum(
            1 for s in topo.sentinels for c in admin(s).client_list()
            if c.get("name") == "gp-close" and "P" in c["flags"]
        )

    wait_until(lambda: subscribers() == 1, 5, "the watcher's subscription")
    pool.close()
    watcher.greenlet.join(timeout=2)
    assert watcher.greenlet.dead and pool._watcher is None
    wait_until(lambda: subscribers() == 0, 5, "the subscription to close")


def test_fork_stops_the_watcher_in_the_child_and_spares_the_parents(topo, subprocess_python):
    """After fork the child runs its own watcher; the parent's subscription survives the child."""
    result = subprocess_python(
        f"""
        from gevent import monkey
        monkey.patch_all()
        import os, gevent, redis
        from greenpool import sentinel as gs

        SENTINELS = {topo.addresses!r}

        def subscribers():
            count = 0
            for host, port in SENTINELS:
                probe = redis.Redis(host=host, port=port, decode_responses=True)
                count += sum(1 for c in probe.client_list() if c.get("name") == "gp-fork" and "P" in c["flags"])
                probe.connection_pool.disconnect()
            return count

        def wait_for(n):
            with gevent.Timeout(5):
                while subscribers() != n:
                    gevent.sleep(0.02)

        client = gs.master_for(SENTINELS, {SERVICE!r}, max_connections=2,
                               sentinel_kwargs={{"client_name": "gp-fork"}})
        pool = client.connection_pool
        client.ping()
        watcher = pool._watcher
        wait_for(1)
        pid = os.fork()
        if pid == 0:
            ok = pool._watcher is None
            gevent.sleep(0.1)
            ok = ok and watcher.greenlet.dead
            client.ping()  # the child's first dial starts its own watcher
            ok = ok and pool._watcher is not None and pool._watcher is not watcher
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print("child exit", os.waitstatus_to_exitcode(status))
        wait_for(1)  # the child's own subscription is gone, the parent's is not
        gevent.sleep(0.2)
        print("parent", not watcher.greenlet.dead and pool._watcher is watcher, subscribers(), client.ping())
        pool.close()
        """,
        timeout=25,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["child exit 0", "parent True 1 True"], result.stdout + result.stderr


# -- failover under load -----------------------------------------------------


@dataclass
class Load:
    """Many greenlets doing INCR through one client; what they saw."""

    client: redis.Redis
    name: str
    key: str
    successes: int = 0
    errors: List[Tuple[float, str]] = field(default_factory=list)
    last_success: float = 0.0


def _run_load(load: Load, workers: int, stop: List[bool], deadline: float) -> List[gevent.Greenlet]:
    def work() -> None:
        for _ in range(100_000):  # bounded in count; the deadline bounds the time
            if stop or time.monotonic() > deadline:
                return
            try:
                load.client.incr(load.key)
                load.successes += 1
                load.last_success = time.monotonic()
            except redis.RedisError as exc:
                load.errors.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))
                gevent.sleep(0.01)
            gevent.sleep(0.002)

    return [gevent.spawn(work) for _ in range(workers)]


@pytest.mark.timeout_seconds(40)
def test_failover_under_load_moves_every_connection_to_the_new_master():
    """SENTINEL FAILOVER under load: few errors, then success on the new master, no slot lost, bound held."""
    # Two clients share the load: one watches the sentinels for +switch-master
    # (the default), one learns only from broken connections, as redis-py
    # does, and so keeps writing to the old master until Sentinel demotes it.
    with topology(replicas=1) as t:
        old = t.masters[SERVICE]
        new = t.replicas[0]
        size = 4
        watched = gs.master_for(t.addresses, SERVICE, max_connections=size, timeout=10, client_name="gp-watch")
        blind = gs.master_for(
            t.addresses, SERVICE, max_connections=size, timeout=10, client_name="gp-blind", watch=False
        )
        loads = [Load(watched, "watch", "counter:watch"), Load(blind, "no watch", "counter:blind")]
        pools = [load.client.connection_pool for load in loads]
        try:
            for load in loads:
                load.client.set(load.key, 0)
            stop: List[bool] = []
            start = time.monotonic()
            workers = [g for load in loads for g in _run_load(load, 12, stop, start + 30)]
            peaks = {"gp-watch": 0, "gp-blind": 0}

            def sample() -> None:
                for _ in range(2000):
                    for pool in pools:
                        check_invariants(pool)
                    for name in peaks:
                        # The new master first: a connection moves old -> new,
                        # so this order never counts one twice.
                        peaks[name] = max(peaks[name], _named(new, name) + _named(old, name))
                    gevent.sleep(0.05)

            sampler = gevent.spawn(sample)
            gevent.sleep(0.5)
            held = pools[0].get_connection()  # in use across the failover
            assert _address(held) == (old.host, old.port)
            failover_at = time.monotonic()
            # Ask the last sentinel: the watched one (the first) learns of it
            # from its peers, as it would in production.
            assert admin(t.sentinels[-1]).execute_command("SENTINEL", "FAILOVER", SERVICE)
            target = (new.host, new.port)
            switched = {}
            with gevent.Timeout(25, AssertionError("the pools never moved to the new master")):
                while len(switched) < 2:
                    for load, pool in zip(loads, pools):
                        if load.name not in switched and pool.master_address == target:
                            switched[load.name] = time.monotonic() - failover_at
                    gevent.sleep(0.01)
            gevent.sleep(0.5)  # the load goes on against the new master
            stop.append(True)
            gevent.joinall(workers, timeout=10, raise_error=True)
            sampler.kill()

            # The connection held across the failover is closed on release, not reused.
            closed_before = sum(pools[0].stats().closed.values())
            pools[0].release(held)
            assert held._sock is None and sum(pools[0].stats().closed.values()) == closed_before + 1

            for load, pool in zip(loads, pools):
                stats = pool.stats()
                assert stats.in_use == 0 and stats.waiting == 0 and stats.timeouts == 0, stats
                # Every slot can be checked out, and each goes to the new master.
                conns = [pool.get_connection() for _ in range(size)]
                assert {_address(c) for c in conns} == {target}
                for conn in conns:
                    pool.release(conn)
                check_invariants(pool)
                assert load.last_success > failover_at + switched[load.name]
                assert len(load.errors) <= 2 * size, load.errors
            assert max(peaks.values()) <= size, peaks
            # Watching moves the pool when Sentinel switches (within a hello
            # round, ~2 s), not when it demotes the old master (~10 s).
            assert switched["watch"] < switched["no watch"], switched
            # After the switch every write lands on the new master; the INCRs
            # missing from its counters went to the old master after the
            # promotion and are lost (Sentinel's window, shortened by watching).
            for load in loads:
                value = int(admin(new).get(load.key))
                assert int(load.client.incr(load.key)) == value + 1
                first = min((e[0] for e in load.errors), default=failover_at) - failover_at
                print(
                    f"\nfailover [{load.name}]: pool on the new master {switched[load.name]:.2f} s after "
                    f"SENTINEL FAILOVER; {len(load.errors)} errors"
                    + (f" (first at {first:.2f} s)" if load.errors else "")
                    + f"; {load.successes} INCRs succeeded, {load.successes - value} lost with the old master"
                )
        finally:
            for pool in pools:
                pool.close()


# -- configuration -------------------------------------------------------------


def test_from_env_builds_master_and_replica_clients(topo, clients):
    """GREENPOOL_SENTINELS, _SENTINEL_SERVICE and _SENTINEL_ROLE build the right client."""
    env = {
        "GREENPOOL_SENTINELS": topo.spec,
        "GREENPOOL_SENTINEL_SERVICE": SERVICE,
        "GREENPOOL_MAX_CONNECTIONS": "7",
        "GREENPOOL_TIMEOUT": "1500ms",
    }
    master = gs.from_env(env)
    clients.append(master)
    pool = master.connection_pool
    assert (pool.max_connections, pool.timeout, pool.is_master) == (7, 1.5, True)
    assert pool.sources["max_connections"] == "environment"
    assert master.set("env", "ok") is True
    replica = gs.from_env({**env, "GREENPOOL_SENTINEL_ROLE": "Replica"}, max_connections=2)
    clients.append(replica)
    assert replica.connection_pool.is_master is False and replica.connection_pool.max_connections == 2
    conn = replica.connection_pool.get_connection()
    assert _address(conn) in {(r.host, r.port) for r in topo.replicas}
    replica.connection_pool.release(conn)


def test_from_env_takes_credentials_not_the_address_from_the_url(topo, clients):
    """GREENPOOL_URL gives db and query options; the sentinels give the address."""
    env = {
        "GREENPOOL_SENTINELS": topo.spec,
        "GREENPOOL_SENTINEL_SERVICE": SERVICE,
        "GREENPOOL_URL": "redis://192.0.2.1:1/3?max_connections=2&decode_responses=true",
    }
    client = gs.from_env(env)
    clients.append(client)
    assert client.connection_pool.max_connections == 2
    client.set("in-db-3", "yes")
    assert client.get("in-db-3") == "yes"  # decoded
    direct = redis.Redis(port=topo.masters[SERVICE].port, db=3)
    try:
        assert direct.get("in-db-3") == b"yes"
    finally:
        direct.connection_pool.disconnect()


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, r"GREENPOOL_SENTINELS \(or the keyword sentinels\) must be set: Sentinel only: the sentinels"),
        ({"GREENPOOL_SENTINELS": "127.0.0.1"},
         r"GREENPOOL_SENTINELS must be a comma-separated list of host:port such as "
         r"127\.0\.0\.1:26379,127\.0\.0\.1:26380 \(got '127\.0\.0\.1'\)"),
        ({"GREENPOOL_SENTINELS": "a:1,,b:2"}, r"GREENPOOL_SENTINELS must be .* \(got 'a:1,,b:2'\)"),
        ({"GREENPOOL_SENTINELS": "a:70000"}, r"\(got 'a:70000'\)"),
        ({"GREENPOOL_SENTINELS": "a:1"}, r"GREENPOOL_SENTINEL_SERVICE \(or the keyword sentinel_service\) must be set"),
        ({"GREENPOOL_SENTINELS": "a:1", "GREENPOOL_SENTINEL_SERVICE": " "},
         r"GREENPOOL_SENTINEL_SERVICE must be a non-empty string \(got ' '\)"),
        ({"GREENPOOL_SENTINELS": "a:1", "GREENPOOL_SENTINEL_SERVICE": "s", "GREENPOOL_SENTINEL_ROLE": "slave"},
         r"GREENPOOL_SENTINEL_ROLE must be master or replica \(got 'slave'\)"),
        ({"GREENPOOL_SENTINELS": "a:1", "GREENPOOL_SENTINEL_SERVICE": "s", "GREENPOOL_SENTINELL": "x"},
         r"unknown environment variable GREENPOOL_SENTINELL \(did you mean GREENPOOL_SENTINELS\?\)"),
        ({"GREENPOOL_SENTINELS": "a:1", "GREENPOOL_SENTINEL_SERVICE": "s", "GREENPOOL_MAX_CONNECTIONS": "0"},
         r"GREENPOOL_MAX_CONNECTIONS must be an integer >= 1 \(got '0'\)"),
        ({"GREENPOOL_SENTINELS": "a:1", "GREENPOOL_SENTINEL_SERVICE": "s", "GREENPOOL_URL": "unix:///tmp/x.sock"},
         r"with Sentinel the URL must be redis:// or rediss:// \(got a unix:// URL\)"),
    ],
)
def test_from_env_rejects_bad_settings_naming_the_variable(env, message):
    """Each bad or missing Sentinel variable is named, with the expected form and the value."""
    with pytest.raises(greenpool.ConfigError, match=message):
        gs.from_env(env)


def test_resolve_parses_addresses_and_prefers_keywords():
    """resolve(): IPv6 and blanks parse; an explicit keyword beats the environment."""
    env = {"GREENPOOL_SENTINELS": " [::1]:26379 , h:26380", "GREENPOOL_SENTINEL_SERVICE": "a"}
    found = gs.resolve(env)
    assert found == gs.SentinelConfig((("::1", 26379), ("h", 26380)), "a", "master")
    found = gs.resolve(env, overrides={"sentinels": [("x", 1)], "sentinel_role": "replica", "sentinel_service": None})
    assert found == gs.SentinelConfig((("x", 1),), "a", "replica")
    with pytest.raises(greenpool.ConfigError, match=r"sentinel_role must be master or replica \(got 'Replica'\)"):
        gs.resolve(env, overrides={"sentinel_role": "Replica"})
    with pytest.raises(greenpool.ConfigError, match=r"sentinels must be a non-empty list of \(host, port\) pairs"):
        gs.master_for([("h", "26379")], "svc")


def test_direct_pool_ignores_sentinel_variables_but_checks_the_rest(monkeypatch):
    """The pool's own settings check accepts GREENPOOL_SENTINELS and still rejects a typo."""
    monkeypatch.setenv("GREENPOOL_SENTINELS", "127.0.0.1:1")
    monkeypatch.setenv("GREENPOOL_TIMEOUT", "3")
    pool = SentinelBlockingConnectionPool(SERVICE, Sentinel([("127.0.0.1", 1)]))
    assert pool.timeout == 3.0 and pool.sources["timeout"] == "environment"
    pool.close()
    monkeypatch.setenv("GREENPOOL_TIMEOUTT", "3")
    with pytest.raises(greenpool.ConfigError, match="GREENPOOL_TIMEOUTT"):
        SentinelBlockingConnectionPool(SERVICE, Sentinel([("127.0.0.1", 1)]))
    with pytest.raises(TypeError, match="has no from_url"):
        SentinelBlockingConnectionPool.from_url("redis://x")
