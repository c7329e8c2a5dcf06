"""Thin HTTP edges: authentication, body limits, OpenAI-shaped errors, CORS."""
