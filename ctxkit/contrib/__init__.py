"""Integrations of ctxkit with other libraries, one module each, each behind an optional extra.

- ``ctxkit.contrib.taskiq``: ``CtxkitMiddleware`` for taskiq
  (``pip install "ctxkit-async[taskiq]"``).
- ``ctxkit.contrib.celery``: ``instrument(app)`` for Celery
  (``pip install "ctxkit-async[celery]"``).
- ``ctxkit.contrib.structlog``: the ``add_trace_ids`` processor
  (``pip install "ctxkit-async[structlog]"``).
- ``ctxkit.contrib.asgi``: ``TraceIdMiddleware``, one fake trace id per untraced request (no
  extra needed: it is pure ASGI).
"""
