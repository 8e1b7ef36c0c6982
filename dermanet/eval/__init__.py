"""Evaluation: metrics, the official ISIC scorer, calibration, plots and reports."""
