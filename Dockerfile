# One image for the agent, the operator and the `veer` CLI: Debian, with BCC
# from Debian. All the work is deploy/image/install.sh, which CI also runs on
# the machine (tests/e2e/test_image.py), so a broken step fails CI even though
# no engine builds this image there.
#
#   docker build -t veer:0.1.0 .
FROM debian:bookworm-slim
COPY pyproject.toml README.md /src/veer/
COPY agent /src/veer/agent
COPY scripts/gen-proto.sh /src/veer/scripts/
COPY deploy/image/install.sh /src/veer/deploy/image/
RUN PIP_NO_CACHE_DIR=1 /src/veer/deploy/image/install.sh /opt/veer /src/veer \
 && rm -rf /src/veer /var/lib/apt/lists/*
ENV PATH=/opt/veer/bin:$PATH
ENTRYPOINT ["veer"]
