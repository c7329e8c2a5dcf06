"""Metrics, loggers and the access line."""
