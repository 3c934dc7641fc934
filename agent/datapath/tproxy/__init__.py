"""TPROXY mode: nftables hands every Service address and port to a transparent
proxy inside the agent, which picks the backend as the eBPF programs would
and connects from the client's own address where it can.

    nftables (ruleset.py, nft.py)   which packets go to the proxy, and every
                                    verdict that needs no backend
    policy routing (routing.py)     marked packets are delivered locally;
                                    Service addresses are local routes
    the proxy (engine.py)           listeners per role, the choice (choice.py),
                                    TCP with splice (tcp.py), UDP flows (udp.py),
                                    one epoll loop (loop.py)
    backend.py                      the Datapath the reconciler drives
    cleanup.py                      what `veer agent --cleanup` removes
    layout.py                       every name and number the mode owns

Only this package (and the eBPF one) talks to the kernel.
"""
