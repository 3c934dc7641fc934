# One image for the agent (and, later, the operator and CLI). Debian-based,
# BCC from Debian. The Kubernetes issue moves these steps into a script that
# CI runs on the machine, since no engine builds images there.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-bpfcc libbpfcc bpftool iproute2 nftables clang llvm \
 && rm -rf /var/lib/apt/lists/*
COPY . /opt/veer
RUN python3 -m venv /opt/veer/.venv \
 && mkdir -p /opt/veer/.venv/bcc-link \
 && ln -s /usr/lib/python3/dist-packages/bcc /opt/veer/.venv/bcc-link/bcc \
 && echo /opt/veer/.venv/bcc-link > "$(/opt/veer/.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/veer-bcc.pth" \
 && /opt/veer/.venv/bin/pip install --no-cache-dir grpcio-tools \
 && PYTHON=/opt/veer/.venv/bin/python /opt/veer/scripts/gen-proto.sh \
 && /opt/veer/.venv/bin/pip install --no-cache-dir /opt/veer
ENTRYPOINT ["/opt/veer/.venv/bin/veer"]
