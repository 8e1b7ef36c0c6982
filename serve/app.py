"""`serve run serve.app:deployment` (from the repo root): DermaNet's HTTP API on 127.0.0.1:8000.

Settings come from the environment (DERMANET_MODEL_DIR, DERMANET_DEFAULT_MODEL,
DERMANET_SERVE_*, DERMANET_RISK_*); everything else lives in dermanet.serving.
"""

from dermanet.serving import build_app

deployment = build_app()
