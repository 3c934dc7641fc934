"""Real peers for the sandbox and tests: nginx (HTTP) and a UDP echo server.

Each nginx answers `GET /` with its pod's name, so a client can tell which
backend served it. Every file nginx needs lives in the pod's own directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from agent.sandbox.topology import Pod, Topology

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_config(directory: str, pod: str, ports: Sequence[int]) -> str:
    servers = "\n".join(
        f"""    server {{
        listen {port} reuseport backlog=4096;
        listen [::]:{port} ipv6only=on reuseport backlog=4096;
        location / {{ return 200 "{pod}:{port}\\n"; }}
        location /client {{ return 200 "{pod}:{port} $remote_addr\\n"; }}
    }}"""
        for port in ports
    )
    return f"""worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_timeout 30;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    default_type text/plain;
{servers}
}}
"""


def start_nginx(topo: Topology, pod: Pod, ports: Sequence[int]) -> subprocess.Popen[bytes]:
    directory = os.path.join(topo.workdir, f"nginx-{pod.name}")
    os.makedirs(directory, exist_ok=True)
    conf = os.path.join(directory, "nginx.conf")
    with open(conf, "w") as f:
        f.write(nginx_config(directory, pod.name, ports))
    proc = topo.spawn(pod.netns, [NGINX, "-c", conf, "-p", directory])
    return proc


def start_udp_echo(topo: Topology, pod: Pod, ports: Sequence[int]) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "agent.sandbox.udp_echo", "--name", pod.name]
    for port in ports:
        argv += ["--port", str(port)]
    return topo.spawn(pod.netns, argv)


def wait_listening(topo: Topology, pod: Pod, port: int, timeout: float = 60.0) -> None:
    """Wait until a TCP port accepts connections inside the pod. If the pod
    has an nginx of start_nginx's, the error says what its log says."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = topo.exec(pod.netns, ["ss", "-Hltn", f"sport = :{port}"], in_cgroup=False)
        if res.stdout.strip():
            return
        time.sleep(0.05)
    error_log = os.path.join(topo.workdir, f"nginx-{pod.name}", "error.log")
    said = ""
    if os.path.exists(error_log):
        with open(error_log, errors="replace") as f:
            said = f"; nginx's error.log ends: {f.read()[-2000:]!r}"
    raise TimeoutError(f"nothing listens on {pod.name}:{port}{said}")


def wait_udp(topo: Topology, pod: Pod, port: int, timeout: float = 60.0) -> None:
    """Wait until a UDP port is bound inside the pod (generous: a loaded
    machine may take long to start a Python process; ready returns at once)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = topo.exec(pod.netns, ["ss", "-Hlun", f"sport = :{port}"], in_cgroup=False)
        if res.stdout.strip():
            return
        time.sleep(0.05)
    raise TimeoutError(f"no UDP socket on {pod.name}:{port}")


def family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET
