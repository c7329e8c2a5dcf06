"""relay: an OpenAI-API relay and multi-upstream load balancer on Tornado."""

__version__ = "0.1.0"
