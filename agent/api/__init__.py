"""veer's node API: the gRPC service the `veer` CLI talks to.

    veer.proto      the API (package veer.v1); Python code is generated from it
                    at build time into gen/ (scripts/gen-proto.sh), never committed
    proto.py        imports the generated code lazily, with a clear error if missing
    server.py       the gRPC server inside the agent (Unix socket, optional TCP)
    views.py        agent state -> API messages: status, services, conntrack, maps
    explain.py      what the kernel programs would do with a flow, from the real maps
"""
