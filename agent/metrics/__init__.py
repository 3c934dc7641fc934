"""Metrics in Prometheus' text format, and the agent's HTTP endpoints.

    exposition.py   metric families -> text format 0.0.4 (hand-written, no client library)
    collect.py      the agent's metrics: kube-proxy's sync metrics under their
                    names, and veer_* (maps, programs, kernel counters, ...)
    http.py         /metrics (--metrics-bind-address, kube-proxy's :10249) and
                    /healthz, /livez (--healthz-bind-address, kube-proxy's :10256)

docs/debugging.md lists every metric with its meaning.
"""
