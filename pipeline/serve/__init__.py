"""Serving online: an OpenAI-compatible endpoint on Ray Serve over the same engine and skip sets.

Entry point: ``python -m jobs.serve`` (``jobs/serve.py``; or ``serve run jobs.serve:app_builder``), which
builds ``app.build_app``. Files:

- ``app``: the Serve deployment (one engine and a ``conflayers.scheduler.Scheduler`` per replica) and
  its FastAPI ingress, metrics, API key;
- ``openai_api``: the protocol without HTTP (request checks, stop strings, response bodies);
- ``errors``: Serve's proxy's own overload answers (503, 408) rewritten into OpenAI's error shape.
"""
