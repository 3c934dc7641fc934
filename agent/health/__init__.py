"""kube-proxy's per-Service health checks (healthCheckNodePort)."""
