"""Integrations with other tools, each imported on its own.

Nothing is imported here: ``import greenpool`` never pulls in an optional
dependency. ``greenpool.contrib.locust`` needs ``pip install 'greenpool[locust]'``.
"""

__all__: list[str] = []
