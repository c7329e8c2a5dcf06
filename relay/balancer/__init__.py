"""Pool, selection policy and (later) health state: pure, so the proxy layer sits above it."""
