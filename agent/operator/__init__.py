"""The veer operator: TrafficPolicy status and Events, for the whole cluster.

    conditions.py   pure: Accepted, ResolvedRefs, conflicts, Programmed "n/m"
                    (also used by the agent to know which policies are in force)
    handlers.py     kopf: indexes of TrafficPolicies, Services and VeerNodes;
                    every change recomputes the statuses and patches what differs
    lease.py        leader election on a coordination.k8s.io Lease
    main.py         `veer operator`: elect, then run kopf until SIGTERM

Only handlers.py and main.py import kopf.
"""
