"""Default paths and addresses shared by the agent and the `veer` commands
(kept free of imports so the CLI can read them without loading the agent)."""

# The API's Unix socket (root only), as kube-proxy's and Cilium's agents keep theirs under /run.
DEFAULT_SOCKET = "/run/veer/veer.sock"

# kube-proxy's metrics and health ports, so existing scrapes and probes work.
DEFAULT_METRICS = "0.0.0.0:10249"
DEFAULT_HEALTHZ = "0.0.0.0:10256"
# Their ports, by what they serve: a TrafficPolicy redirect cannot take them.
DEFAULT_AGENT_PORTS: tuple[tuple[int, str], ...] = ((10249, "metrics"), (10256, "health"))
