"""Load-test the WSGI app in loadtests/app.py served by gunicorn's gevent workers.

    gunicorn -c loadtests/gunicorn.conf.py loadtests.app:application &
    locust -f loadtests/locustfile_http.py --host http://127.0.0.1:8000 \\
        --headless -u 50 -r 50 -t 30s

A 503 (the app's pool found no connection within GREENPOOL_TIMEOUT) or any
other error status counts as a locust failure.
"""

import uuid

from locust import HttpUser, between, task


class AppUser(HttpUser):
    wait_time = between(0.005, 0.02)

    def on_start(self) -> None:
        self.key = uuid.uuid4().hex[:12]

    @task(4)
    def get(self) -> None:
        self.client.get(f"/get?key={self.key}", name="/get")

    @task(2)
    def set(self) -> None:
        self.client.post(f"/set?key={self.key}&value=v", name="/set")

    @task(2)
    def pipeline(self) -> None:
        self.client.get(f"/pipeline?key={self.key}", name="/pipeline")

    @task(1)
    def hold(self) -> None:
        # Holds one of the worker's pooled connections for 20 ms: with many
        # more users than connections, requests queue for the pool.
        self.client.get("/hold?ms=20", name="/hold")

    @task(1)
    def stats(self) -> None:
        self.client.get("/stats")
