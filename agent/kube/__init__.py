"""The agent's Kubernetes side (`veer agent --kubernetes`).

    client.py     a small JSON client of the API server (one error type)
    kubeconfig.py where the API server is and our credentials: a kubeconfig,
                  or the Pod's ServiceAccount
    transport.py  HTTP/1.1 over http.client and ssl: kept-alive connections,
                  one per watch
    source.py     list+watch of Services, EndpointSlices, the Node and
                  TrafficPolicies into the Store
    report.py     this node's VeerNode: which policies are in force here
    uninstall.py  on SIGTERM: is the chart's DaemonSet being deleted?
    runtime.py    the above, started and stopped with the agent
"""
