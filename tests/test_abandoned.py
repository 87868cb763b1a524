"""A connection whose holder died without releasing it comes back.

redis-py's ``Pipeline.reset()`` sends UNWATCH when a pipeline that WATCHed
is left; a greenlet killed a second time while it waits for that reply
skips the release. Without greenpool noticing, the slot is lost for the
pool's life (``in_use=1`` for ever).
"""

from __future__ import annotations

import logging

import gevent
import redis
from pools import check_invariants


def _kill_twice_in_unwatch(r: redis.Redis, tcp_proxy) -> gevent.Greenlet:
    def victim() -> None:
        with r.pipeline() as pipe:
            pipe.watch("abandoned:k")
            gevent.sleep(30)

    greenlet = gevent.spawn(victim)
    gevent.sleep(0.1)  # WATCH done; the victim sleeps holding the connection
    tcp_proxy.blackhole()  # UNWATCH's reply will not come
    greenlet.kill(block=False)
    gevent.sleep(0.1)  # the first kill: the pipeline's reset() waits for UNWATCH's reply
    greenlet.kill()  # the second kill: the release in reset()'s finally never runs
    tcp_proxy.restore()
    return greenlet


def test_a_double_killed_watch_pipeline_does_not_lose_its_slot(make_pool, tcp_proxy, caplog):
    pool = make_pool(max_connections=1, timeout=2, port=tcp_proxy.port, socket_timeout=5)
    r = redis.Redis(connection_pool=pool)
    r.ping()
    with caplog.at_level(logging.WARNING, logger="greenpool"):
        _kill_twice_in_unwatch(r, tcp_proxy)
        assert pool.stats().in_use == 1  # the dead greenlet's: nobody will release it
        assert r.set("abandoned:k", "v")  # waits, reclaims the slot, dials afresh
    stats = pool.stats()
    assert stats.closed["abandoned"] == 1 and stats.in_use == 0 and stats.size == 1
    assert "died without releasing it" in caplog.text
    assert "set leak_detection_threshold" in caplog.text
    check_invariants(pool)


def test_abandoned_connections_are_reclaimed_by_maintenance(make_pool, tcp_proxy, caplog):
    """Nobody waiting: maintenance notices, and names the checkout's stack with leak detection on."""
    pool = make_pool(max_connections=2, timeout=2, port=tcp_proxy.port, idle_timeout=0.2,
                     leak_detection_threshold=60)
    r = redis.Redis(connection_pool=pool)
    r.ping()
    with caplog.at_level(logging.WARNING, logger="greenpool"):
        _kill_twice_in_unwatch(r, tcp_proxy)
        for _ in range(40):  # maintenance runs every 0.05 s here
            if pool.stats().closed["abandoned"]:
                break
            gevent.sleep(0.05)
    assert pool.stats().closed["abandoned"] == 1 and pool.stats().in_use == 0
    assert "checked out at:" in caplog.text and "victim" in caplog.text


def test_a_pubsub_worker_keeps_the_connection_its_subscriber_took(make_pool, redis_server):
    """The greenlet that subscribed may end: the worker reading the
    connection is its user now, so nothing is reclaimed under it."""
    pool = make_pool(max_connections=1, timeout=0.5)
    r = redis.Redis(connection_pool=pool)
    pubsub = r.pubsub()
    gevent.spawn(pubsub.subscribe, "abandoned:chan").join()  # that greenlet is dead now
    got = []
    worker = gevent.spawn(lambda: got.append(pubsub.get_message(timeout=3)) or
                          got.append(pubsub.get_message(timeout=3)))
    gevent.sleep(0.2)
    assert pool._reclaim_abandoned() == 0
    redis.Redis(host=redis_server.host, port=redis_server.port).publish("abandoned:chan", "hi")
    worker.join(timeout=5)
    assert [m["type"] for m in got] == ["subscribe", "message"]
    pubsub.close()
    assert pool.stats().closed["abandoned"] == 0
