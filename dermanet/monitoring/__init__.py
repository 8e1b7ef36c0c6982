"""Watching the served model: refusal reasons as a small vocabulary and drift reports."""
