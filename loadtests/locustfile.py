"""Load-test Redis itself with greenpool's RedisUser.

    GREENPOOL_MAX_CONNECTIONS=4 locust -f loadtests/locustfile.py \\
        --host redis://127.0.0.1:6379/0 --headless -u 50 -r 50 -t 30s

With far more users than connections, users queue in the pool; each command
is a row of locust's statistics, named as redis-py sends it: GET, SET,
INCRBY (redis-py's ``incr``), BLPOP and the pipeline
``pipeline:INCRBY,EXPIRE,GET``. BLPOP's fractional timeout needs Redis 6+.
"""

import uuid

from locust import between, task

from greenpool.contrib.locust import RedisUser


class RedisCommands(RedisUser):
    wait_time = between(0.005, 0.02)
    stats_interval = 2.0

    def on_start(self) -> None:
        # One key per user: the users share a pool, never a key.
        self.key = f"loadtests:{uuid.uuid4().hex[:12]}"
        self.client.set(self.key, "0")

    @task(4)
    def get(self) -> None:
        self.client.get(self.key)

    @task(2)
    def set(self) -> None:
        self.client.set(self.key, "value")

    @task(2)
    def incr(self) -> None:
        self.client.incr(self.key + ":n")

    @task(1)
    def pipeline(self) -> None:
        with self.client.pipeline(transaction=False) as pipe:
            pipe.incr(self.key + ":hits").expire(self.key + ":hits", 60).get(self.key)
            pipe.execute()

    @task(1)
    def blpop(self) -> None:
        # The list stays empty: the command holds its connection for the
        # whole timeout, as a worker waiting on a queue does.
        self.client.blpop([self.key + ":queue"], timeout=0.05)
