"""Retrieval and detection metrics, timing and reports."""
