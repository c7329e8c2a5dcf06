"""Everything that talks to upstreams: transport, router, and the SSE stream meter."""
