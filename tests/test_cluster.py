"""greenpool.cluster: a greenpool pool for every node of a Redis Cluster.

Real processes on loopback: three masters sharing the 16384 slots, and two
nodes, met but owning none, that the slot-migration tests move slots to (so
the clients discover them later).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List

import gevent
import pytest
import redis
from admin import admin, close_admin_clients, wait_until  # noqa: F401
from pools import check_invariants
from redis.cluster import ClusterNode

import greenpool
from greenpool import cluster as gc
from greenpool._server import RedisServer
from greenpool.cluster import ClusterNodePool, RedisCluster

pytestmark = pytest.mark.slow

NODE_ARGS = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"]
RANGES = [(0, 5460), (5461, 10922), (10923, 16383)]


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too, as Redis needs."""
    for _ in range(200):
        with socket.socket() as data, socket.socket() as bus:
            try:
                data.bind(("127.0.0.1", 0))
                port = data.getsockname()[1]
                if port <= 55535:
                    bus.bind(("127.0.0.1", port + 10000))
                    return port
            except OSError:
                pass
    raise RuntimeError("no free port pair for a cluster node")




@dataclass
class Cluster:
    """Three masters with slots, and two spare nodes with none at first."""

    masters: List[RedisServer]
    spare: RedisServer
    late: RedisServer

    @property
    def nodes(self) -> List[RedisServer]:
        return [*self.masters, self.spare, self.late]

    def by_port(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Start five cluster nodes, assign the slots to three, wait for cluster_state:ok."""
    servers: List[RedisServer] = []
    try:
        for _ in range(5):
            servers.append(RedisServer(port=_cluster_port(), args=NODE_ARGS))
            servers[-1].start()
        admins = [admin(s) for s in servers]
        for epoch, node in enumerate(admins, 1):
            node.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for node, (low, high) in zip(admins, RANGES):
            node.execute_command("CLUSTER", "ADDSLOTS", *range(low, high + 1))
        for server in servers[1:]:
            admins[0].execute_command("CLUSTER", "MEET", server.host, server.port)

        def formed() -> bool:
            return all(
                "cluster_state:ok" in a.execute_command("CLUSTER", "INFO")
                and len(a.execute_command("CLUSTER", "NODES").splitlines()) == len(servers)
                for a in admins
            )

        wait_until(formed, 15, "cluster_state:ok on every node")
        yield Cluster(servers[:3], servers[3], servers[4])
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def clients() -> Iterator[List[Any]]:
    """Cluster clients built by the test, closed at teardown."""
    made: List[Any] = []
    yield made
    for client in made:
        client.close()


def _named(server: RedisServer, name: str) -> int:
    """How many connections named *name* the server has (CLIENT LIST)."""
    return sum(1 for c in admin(server).client_list() if c.get("name") == name)


def _slot_owners(cluster: Cluster) -> List[str]:
    """The nodes that own slots now (CLUSTER SLOTS), as host:port, sorted."""
    slots = admin(cluster.masters[0]).execute_command("CLUSTER", "SLOTS")
    return sorted({f"{cluster.masters[0].host}:{r[2][1]}" for r in slots})


def _pools(client: Any) -> Dict[str, Any]:
    return {n.name: n.redis_connection.connection_pool for n in client.get_nodes()}


def _checkout_all(pool: greenpool.BlockingConnectionPool) -> None:
    """Every slot of *pool* can be checked out at once: none was lost."""
    conns = [pool.get_connection() for _ in range(pool.max_connections)]
    for conn in conns:
        pool.release(conn)
    check_invariants(pool)


# -- every node gets a greenpool pool ------------------------------------------


@pytest.mark.parametrize("how", ["host_port", "startup_nodes", "from_url"])
def test_every_node_gets_a_greenpool_pool_whichever_way_it_is_built(cluster, clients, how):
    """host/port, startup_nodes or a URL: each node's pool is a ClusterNodePool with the given bound."""
    first = cluster.masters[0]
    if how == "host_port":
        client = RedisCluster(host=first.host, port=first.port, max_connections=3, timeout=2)
    elif how == "startup_nodes":
        client = RedisCluster(
            startup_nodes=[ClusterNode(s.host, s.port) for s in cluster.masters[1:]], max_connections=3, timeout=2
        )
    else:
        client = RedisCluster.from_url(f"redis://{first.host}:{first.port}?max_connections=3&timeout=2")
    clients.append(client)
    for i in range(60):  # keys spread over every node
        client.set(f"key:{i}", i)
    assert [int(client.get(f"key:{i}")) for i in range(60)] == list(range(60))
    pools = _pools(client)
    assert sorted(pools) == _slot_owners(cluster)
    for name, pool in pools.items():
        assert type(pool) is ClusterNodePool
        assert (pool.max_connections, pool.timeout, pool.name) == (3, 2.0, name)
        assert pool.stats().checkouts > 0


def test_redis_py_alone_gives_host_port_clients_plain_pools(cluster):
    """The issue this module exists for: redis-py ignores connection_pool_class unless built from a URL."""
    first = cluster.masters[0]
    client = redis.cluster.RedisCluster(host=first.host, port=first.port, connection_pool_class=ClusterNodePool)
    try:
        assert {type(p) for p in _pools(client).values()} == {redis.ConnectionPool}
    finally:
        client.close()
        for pool in _pools(client).values():
            pool.disconnect()


def test_pipelines_within_a_slot_and_across_nodes(cluster, clients):
    """A pipeline on one hash slot, and one over keys of every node, both work and give slots back."""
    client = RedisCluster(host=cluster.masters[0].host, port=cluster.masters[0].port, max_connections=2)
    clients.append(client)
    pipe = client.pipeline()
    for i in range(10):
        pipe.set(f"{{user:1}}:f{i}", i).incr("{user:1}:n")
    results = pipe.execute()
    assert results == [r for i in range(10) for r in (True, i + 1)]
    assert client.keyslot("{user:1}:f0") == client.keyslot("{user:1}:n")
    pipe = client.pipeline()
    for i in range(30):
        pipe.incr(f"spread:{i}")
    assert pipe.execute() == [1] * 30
    assert len({client.get_node_from_key(f"spread:{i}").name for i in range(30)}) >= 3
    for pool in _pools(client).values():
        assert pool.stats().in_use == 0
        _checkout_all(pool)


def test_per_node_bound_holds_under_contention(cluster, clients):
    """60 greenlets over every node: no node ever sees more than max_connections from the client."""
    size = 2
    client = RedisCluster(
        host=cluster.masters[0].host, port=cluster.masters[0].port,
        max_connections=size, timeout=10, client_name="gp-bound",
    )
    clients.append(client)
    peak: Dict[int, int] = {}

    def sample() -> None:
        for _ in range(1000):
            for pool in _pools(client).values():
                check_invariants(pool)
            for server in cluster.masters:
                peak[server.port] = max(peak.get(server.port, 0), _named(server, "gp-bound"))
            gevent.sleep(0.02)

    def work(i: int) -> None:
        for j in range(20):
            client.incr(f"bound:{(i * 7 + j) % 30}")

    sampler = gevent.spawn(sample)
    gevent.joinall([gevent.spawn(work, i) for i in range(60)], timeout=25, raise_error=True)
    sampler.kill()
    assert sum(int(client.get(f"bound:{k}")) for k in range(30)) == 60 * 20
    assert set(peak) == {s.port for s in cluster.masters} and max(peak.values()) <= size, peak
    stats = gc.cluster_stats(client)
    assert stats.total.max_connections == len(stats.nodes) * size and stats.total.in_use == 0
    assert stats.total.checkouts == sum(s.checkouts for s in stats.nodes.values()) >= 60 * 20
    assert stats.total.waits > 0  # there was contention
    for pool in _pools(client).values():
        _checkout_all(pool)


def test_exhausted_node_pool_times_out_without_churning_connections(cluster, clients):
    """A full node pool raises NodePoolTimeout (a MaxConnectionsError); its connections survive."""
    client = RedisCluster(host=cluster.masters[0].host, port=cluster.masters[0].port, max_connections=2, timeout=0.2)
    clients.append(client)
    client.set("full", 1)
    node = client.get_node_from_key("full")
    pool = node.redis_connection.connection_pool
    held = gevent.spawn(lambda: [pool.get_connection() for _ in range(2)]).get(timeout=2)
    before = pool.stats()
    with pytest.raises(gc.NodePoolTimeout, match=rf"pool '{node.name}' within 0\.20 s \(max_connections=2, 2 in use") as info:
        client.get("full")
    assert isinstance(info.value, greenpool.PoolTimeout)
    assert isinstance(info.value, redis.exceptions.MaxConnectionsError)
    assert client.get_node_from_key("full").redis_connection.connection_pool is pool
    after = pool.stats()
    assert (after.created, after.closed) == (before.created, before.closed)
    for conn in held:
        assert conn._sock is not None
        pool.release(conn)
    assert client.get("full") == b"1"


# -- topology changes ------------------------------------------------------------


def _migrate_slot(slot: int, source: RedisServer, target: RedisServer, everyone: List[RedisServer]) -> int:
    """Move *slot* from *source* to *target* as redis-cli does; return the keys moved."""
    src, dst = admin(source), admin(target)
    src_id, dst_id = src.execute_command("CLUSTER", "MYID"), dst.execute_command("CLUSTER", "MYID")
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
    moved = 0
    for _ in range(1000):
        keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 3)
        if not keys:
            break
        src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
        moved += len(keys)
        gevent.sleep(0.02)  # let the load run between batches
    for server in [target, source, *[s for s in everyone if s not in (source, target)]]:
        admin(server).execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    return moved


def _move_empty_slot(slot: int, target: RedisServer, everyone: List[RedisServer]) -> None:
    """Give an empty *slot* to *target* (no keys, so no migration)."""
    target_id = admin(target).execute_command("CLUSTER", "MYID")
    for server in [target, *[s for s in everyone if s is not target]]:
        admin(server).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


@dataclass
class Migration:
    """What the load saw while a slot moved."""

    done: Dict[str, int]  # INCRs that succeeded, by key
    errors: List[str]
    peak: int  # most connections the target node saw from the client at once
    moved: int  # keys MIGRATE moved


def _migrate_under_load(client: RedisCluster, cluster: Cluster, keys: List[str], target: RedisServer,
                        name: str) -> Migration:
    """Move the slot of *keys* to *target* while 20 greenlets INCR them."""
    slot = client.keyslot(keys[0])
    source = cluster.by_port(client.get_node_from_key(keys[0]).port)
    result = Migration({k: 0 for k in keys}, [], 0, 0)
    stop: List[bool] = []

    def work(i: int) -> None:
        for j in range(100_000):  # bounded; `stop` ends it
            if stop:
                return
            key = keys[(i + j) % len(keys)]
            try:
                client.incr(key)
                result.done[key] += 1
            except (redis.RedisError, AttributeError) as exc:  # AttributeError: see the ASK test
                result.errors.append(f"{type(exc).__name__}: {exc}")

            gevent.sleep(0.002)

    def sample() -> None:
        for _ in range(2000):
            for pool in client.node_pools().values():
                check_invariants(pool)
            result.peak = max(result.peak, _named(target, name))
            gevent.sleep(0.02)

    workers = [gevent.spawn(work, i) for i in range(20)]
    sampler = gevent.spawn(sample)
    gevent.sleep(0.3)
    started = time.monotonic()
    result.moved = _migrate_slot(slot, source, target, cluster.nodes)
    target_name = f"{target.host}:{target.port}"
    wait_until(lambda: client.get_node_from_key(keys[0]).name == target_name, 15, "the client to follow the slot")
    gevent.sleep(0.3)  # the load goes on against the new owner
    stop.append(True)
    gevent.joinall(workers, timeout=10, raise_error=True)
    sampler.kill()
    print(f"\nslot {slot}: {result.moved} keys migrated under load in {time.monotonic() - started:.2f} s; "
          f"{sum(result.done.values())} INCRs, {len(result.errors)} errors")
    assert admin(target).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == len(keys)
    return result


def _no_slot_lost(client: RedisCluster) -> None:
    stats = gc.cluster_stats(client)
    assert stats.total.in_use == 0 and stats.total.waiting == 0, stats.total
    for pool in client.node_pools().values():
        _checkout_all(pool)


@pytest.mark.timeout_seconds(40)
def test_slot_migration_under_load_to_a_node_discovered_later(cluster, clients):
    """A node first seen through MOVED gets a greenpool pool; a slot migrated to it under load keeps exact counts."""
    size = 3
    client = RedisCluster(
        host=cluster.masters[0].host, port=cluster.masters[0].port,
        max_connections=size, timeout=10, client_name="gp-migrate",
    )
    clients.append(client)
    spare = f"{cluster.spare.host}:{cluster.spare.port}"
    assert spare not in client.node_pools()

    # 1. The spare gets an empty slot; the client learns of it from MOVED.
    probe = "{probe}"
    _move_empty_slot(client.keyslot(probe), cluster.spare, cluster.nodes)
    wait_until(lambda: client.set(probe, 1) and client.get_node_from_key(probe).name == spare, 10, "MOVED to the spare")
    new_pool = client.get_node_from_key(probe).redis_connection.connection_pool
    assert type(new_pool) is ClusterNodePool and new_pool.max_connections == size
    assert new_pool is client.node_pools()[spare]

    # 2. A slot with keys migrates to it (ASK, then MOVED) under load.
    keys = [f"{{moving}}:{i}" for i in range(12)]
    seen = _migrate_under_load(client, cluster, keys, cluster.spare, "gp-migrate")
    assert seen.errors == []
    assert {k: int(client.get(k)) for k in keys} == seen.done
    assert 0 < seen.peak <= size
    assert gc.cluster_stats(client).nodes[spare].checkouts > 0
    _no_slot_lost(client)


@pytest.mark.timeout_seconds(40)
def test_ask_to_a_node_the_client_never_saw_loses_no_slot(cluster, clients, caplog):
    """Migrating to a slotless node the client does not know: no slot lost, no connection lent twice."""
    # redis-py (4.6 to 8.1, redis/redis-py#4015) cannot follow an ASK to a
    # node absent from its slots map: the command fails with AttributeError,
    # and _execute_command then releases the previous attempt's connection a
    # second time, which ClusterNodePool ignores.
    size = 2
    client = RedisCluster(
        host=cluster.masters[0].host, port=cluster.masters[0].port,
        max_connections=size, timeout=10, client_name="gp-ask",
    )
    clients.append(client)
    late = f"{cluster.late.host}:{cluster.late.port}"
    assert late not in client.node_pools()
    keys = [f"{{asking}}:{i}" for i in range(12)]
    seen = _migrate_under_load(client, cluster, keys, cluster.late, "gp-ask")
    values = {k: int(client.get(k)) for k in keys}
    # A failed INCR may still have reached the server (its reply was lost).
    assert all(seen.done[k] <= values[k] for k in keys)
    assert sum(values.values()) <= sum(seen.done.values()) + len(seen.errors)
    kinds = {e.split(":")[0] for e in seen.errors}
    assert kinds <= {"AttributeError", "ConnectionError", "TimeoutError", "ClusterError"}, seen.errors
    assert type(client.node_pools()[late]) is ClusterNodePool and seen.peak <= size
    for pool in client.node_pools().values():
        assert pool.stats().closed.get("dirty", 0) == 0  # no socket was shared by two callers
    stale = sum("released twice" in r.getMessage() for r in caplog.records)
    print(f"{len(seen.errors)} errors ({', '.join(sorted(kinds)) or 'none'}) from redis-py's ASK handling; "
          f"{stale} repeated releases ignored")
    _no_slot_lost(client)


def test_a_command_holding_a_connection_never_waits_for_another(cluster):
    """Within one cluster command, hold-and-wait on a full node pool fails at once instead of deadlocking."""
    first = cluster.masters[0]
    pool = ClusterNodePool(host=first.host, port=first.port, max_connections=1, timeout=None)
    try:
        with gc._command_scope():
            held = pool.get_connection()
            with gevent.Timeout(5, AssertionError("waited for itself")):
                with pytest.raises(gc.NodePoolTimeout, match=r"all 1 are in use and this command holds one"):
                    pool.get_connection()
            other = gevent.spawn(pool.get_connection)  # a caller holding nothing waits as usual
            gevent.sleep(0.05)
            assert not other.ready() and pool.stats().waiting == 1
            pool.release(held)
        pool.release(other.get(timeout=2))  # released by another greenlet: fine outside a command
        assert pool.stats().in_use == 0
    finally:
        pool.close()


def test_a_commands_repeated_release_cannot_take_a_connection_from_its_holder(cluster):
    """The release redis-py's cluster client repeats after a failed redirection is ignored."""
    first = cluster.masters[0]
    pool = ClusterNodePool(host=first.host, port=first.port, max_connections=1, timeout=2)
    try:
        with gc._command_scope():
            conn = pool.get_connection()
            pool.release(conn)  # attempt 1 gives its connection back
            holder = gevent.spawn(pool.get_connection)
            assert holder.get(timeout=2) is conn  # another caller now holds it
            pool.release(conn)  # attempt 2 failed early and releases attempt 1's again
            stats = pool.stats()
            assert stats.in_use == 1 and stats.idle == 0
            pool.timeout = 0.05
            with pytest.raises(gc.NodePoolTimeout, match="within 0.05 s"):
                pool.get_connection()  # still held by the other caller: not lent twice
        pool.release(conn)  # the holder's own release, from anywhere, counts
        assert pool.stats().idle == 1
    finally:
        pool.close()


def test_close_closes_every_node_pool(cluster):
    """RedisCluster.close() closes the pool of every node it created."""
    client = RedisCluster(host=cluster.masters[0].host, port=cluster.masters[0].port, max_connections=1)
    client.ping(target_nodes=RedisCluster.ALL_NODES)
    pools = list(client.node_pools().values())
    assert len(pools) >= 3 and not any(p.closed for p in pools)
    client.close()
    assert all(p.closed for p in pools)


def test_cluster_stats_of_a_plain_client_counts_its_greenpool_pools(cluster):
    """cluster_stats() works on redis-py's own client when its node pools are greenpool's."""
    first = cluster.masters[0]
    client = redis.cluster.RedisCluster.from_url(
        f"redis://{first.host}:{first.port}", connection_pool_class=ClusterNodePool, max_connections=4
    )
    try:
        client.ping(target_nodes=redis.cluster.RedisCluster.ALL_NODES)
        stats = gc.cluster_stats(client)
        assert len(stats.nodes) >= 3 and stats.total.max_connections == 4 * len(stats.nodes)
        assert stats.total.name == "total" and stats.total.idle == stats.total.size
    finally:
        client.close()
        for pool in _pools(client).values():
            pool.close()


# -- configuration -----------------------------------------------------------------


def test_from_env_reads_startup_nodes_and_per_node_settings(cluster, clients):
    """GREENPOOL_CLUSTER_NODES and the usual settings build a client with per-node pools."""
    nodes = ",".join(f"{s.host}:{s.port}" for s in cluster.masters[:2])
    client = gc.from_env({"GREENPOOL_CLUSTER_NODES": nodes, "GREENPOOL_MAX_CONNECTIONS": "3",
                          "GREENPOOL_IDLE_TIMEOUT": "2m"})
    clients.append(client)
    client.set("env", "yes")
    pools = _pools(client)
    assert sorted(pools) == _slot_owners(cluster)
    assert {(p.max_connections, p.options["idle_timeout"]) for p in pools.values()} == {(3, 120.0)}
    assert all(p.sources["max_connections"] == "environment" for p in pools.values())


def test_from_env_takes_a_url_and_keywords_win(cluster, clients):
    """GREENPOOL_URL alone names a startup node; its query options and keywords apply per node."""
    first = cluster.masters[0]
    env = {"GREENPOOL_URL": f"redis://{first.host}:{first.port}?max_connections=2&timeout=1"}
    client = gc.from_env(env, timeout=3, decode_responses=True)
    clients.append(client)
    client.set("url", "yes")
    assert client.get("url") == "yes"
    assert {(p.max_connections, p.timeout) for p in _pools(client).values()} == {(2, 3.0)}


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, r"GREENPOOL_CLUSTER_NODES or GREENPOOL_URL must name at least one cluster node \(got neither"),
        ({"GREENPOOL_CLUSTER_NODES": "127.0.0.1"},
         r"GREENPOOL_CLUSTER_NODES must be a comma-separated list of host:port such as "
         r"127\.0\.0\.1:7000,127\.0\.0\.1:7001 \(got '127\.0\.0\.1'\)"),
        ({"GREENPOOL_CLUSTER_NODE": "a:1"},
         r"unknown environment variable GREENPOOL_CLUSTER_NODE \(did you mean GREENPOOL_CLUSTER_NODES\?\)"),
        ({"GREENPOOL_CLUSTER_NODES": "a:1", "GREENPOOL_TIMEOUT": "soon"},
         r"GREENPOOL_TIMEOUT must be a duration such as 30, 30s or 500ms \(got 'soon'\)"),
    ],
)
def test_from_env_rejects_bad_settings_naming_the_variable(env, message):
    """A bad or missing cluster variable is named, with the expected form and the value."""
    with pytest.raises(greenpool.ConfigError, match=message):
        gc.from_env(env)


def test_connection_pool_class_is_refused_and_ssl_picks_the_tls_class():
    """The subclass sets connection_pool_class itself; ssl=True maps to SSLConnection."""
    with pytest.raises(TypeError, match="sets connection_pool_class itself"):
        RedisCluster(host="127.0.0.1", port=1, connection_pool_class=redis.ConnectionPool)
    factory = gc._NodePools(greenpool.config.resolve({}, overrides={"max_connections": 2}))
    pool = factory(host="127.0.0.1", port=1, ssl=True, ssl_cert_reqs="none")
    assert issubclass(pool.connection_class, redis.SSLConnection)
    assert factory(host="127.0.0.1", port=1) is pool  # one pool per node address
    pool.close()
    assert factory(host="127.0.0.1", port=1) is not pool  # a closed one is replaced
