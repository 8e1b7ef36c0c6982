"""Ray Serve deployments and the FastAPI ingress; all model logic lives in dermanet.inference."""

from dermanet.serving.app import app_builder, build_app
from dermanet.serving.settings import ServeSettings

__all__ = ["ServeSettings", "app_builder", "build_app"]
