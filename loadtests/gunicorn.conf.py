# gunicorn configuration for an app that uses Redis through greenpool, with
# gevent workers. Run from the repository's root:
#
#   gunicorn -c loadtests/gunicorn.conf.py loadtests.app:application
#   gunicorn -c loadtests/gunicorn.conf.py --preload loadtests.app:application
#
# Each worker process has its own pool of at most GREENPOOL_MAX_CONNECTIONS
# connections, so Redis sees up to workers x GREENPOOL_MAX_CONNECTIONS of
# them (plus the master's none). The pool is configured by the GREENPOOL_*
# variables (see greenpool's README) and built in each worker after the fork.

import os
import sys

# Server socket
#
#   bind - The socket to bind: 'HOST:PORT' or 'unix:PATH'.
#
#       Loopback by default; set GUNICORN_BIND to listen elsewhere.

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")

# Worker processes
#
#   workers - The number of worker processes. WEB_CONCURRENCY is the
#       variable gunicorn itself reads for this default.
#
#   worker_class - gevent: each request runs in a greenlet, and a request
#       that finds every Redis connection busy waits in greenpool's queue
#       without blocking the others.
#
#   worker_connections - The most requests (greenlets) a worker serves at
#       once. It may exceed GREENPOOL_MAX_CONNECTIONS: the extra requests
#       wait for a connection, in arrival order, up to GREENPOOL_TIMEOUT.
#
#   timeout - Seconds a worker may stay silent before the master kills it.
#       gevent workers report from their own greenlet, so a request waiting
#       for Redis does not count against it.
#
#   graceful_timeout - Seconds a stopping worker gets to finish its
#       requests; then worker_exit closes its pool.

workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gevent"
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "1000"))
timeout = 30
graceful_timeout = 10

# A web request should not wait greenpool's default 20 s for a connection:
# after 2 s the app answers 503 ("Redis is busy") and the client can retry.
# setdefault, so a GREENPOOL_TIMEOUT set by the operator wins.
os.environ.setdefault("GREENPOOL_TIMEOUT", "2")

# Control socket
#
#   control_socket_disable - Newer gunicorn (24+) opens a control socket at
#       $HOME/.gunicorn/gunicorn.ctl for its gunicornc tool. Not needed here,
#       and two servers on one machine would fight over that path. Older
#       gunicorn ignores the setting.

control_socket_disable = True

# Logging
#
#   errorlog - '-' is stderr. accesslog is off: under load it is mostly noise.

errorlog = "-"
loglevel = "info"

# Server hooks
#
#   post_worker_init - Called in a worker once it has loaded the app.
#
#       The gevent worker monkey-patches and reinitialises its hub after
#       post_fork and before this hook, so the pool is built here, in each
#       worker, after the fork, whether or not --preload loaded the app in
#       the master first (the app never builds a pool at import).
#
#   worker_exit - Called in a worker that is exiting, after its last request.
#
#       Closes the worker's pool: idle connections are closed at once rather
#       than left for the process exit. The master also calls it for a worker
#       that is already gone; there is no pool to close there.


def _app_module(worker):
    # The module gunicorn loaded the app from, whatever its import name
    # (loadtests.app, or app with --chdir loadtests).
    wsgi = getattr(worker, "wsgi", None)
    return sys.modules.get(getattr(wsgi, "__module__", None) or "")


def post_worker_init(worker):
    pool = _app_module(worker).open_pool()
    worker.log.info("greenpool: worker %s built %r", worker.pid, pool)


def worker_exit(server, worker):
    module = _app_module(worker)
    stats = module.close_pool() if module is not None else None
    if stats is not None:
        server.log.info(
            "greenpool: worker %s closed pool %r (checkouts=%d waits=%d timeouts=%d created=%d)",
            worker.pid, stats.name, stats.checkouts, stats.waits, stats.timeouts, stats.created,
        )
