"""The dashboard's logic: the Serve API client, upload storage, gallery state, case reports.

`ui/app.py` (Streamlit) is layout only and calls these; nothing here imports Streamlit.
"""

from dermanet.ui.client import (
    Classification,
    GradCamImage,
    ModelListing,
    ServeClient,
    ServeError,
    ServeUnavailable,
    default_serve_url,
)
from dermanet.ui.gallery import DashboardState
from dermanet.ui.report import CaseReport, ReportUnavailable, render_html, render_pdf
from dermanet.ui.storage import StoredImage, UploadRejected, UploadStore

__all__ = [
    "CaseReport",
    "Classification",
    "DashboardState",
    "GradCamImage",
    "ModelListing",
    "ReportUnavailable",
    "ServeClient",
    "ServeError",
    "ServeUnavailable",
    "StoredImage",
    "UploadRejected",
    "UploadStore",
    "default_serve_url",
    "render_html",
    "render_pdf",
]
