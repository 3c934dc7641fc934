#!/usr/bin/env bash
# Generate the Python code for veer's gRPC API (agent/api/veer.proto) into
# agent/api/gen/, which git ignores. Does nothing when the output is newer
# than the .proto. scripts/setup.sh runs it after installing grpcio-tools.
#
# The proto is mapped to the virtual path agent/api/gen/veer.proto, so the
# generated gRPC module imports its messages as `agent.api.gen.veer_pb2`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
PROTO="$ROOT/agent/api/veer.proto"
OUT="$ROOT/agent/api/gen"

if [ -f "$OUT/veer_pb2.py" ] && [ -f "$OUT/veer_pb2_grpc.py" ] && [ -f "$OUT/__init__.py" ] \
   && [ "$OUT/veer_pb2.py" -nt "$PROTO" ] && [ "$OUT/veer_pb2_grpc.py" -nt "$PROTO" ]; then
  exit 0
fi
echo "gen-proto: generating $OUT from $PROTO"
mkdir -p "$OUT"
cd "$ROOT"
"$PYTHON" -m grpc_tools.protoc \
  -Iagent/api/gen=agent/api \
  --python_out=. --grpc_python_out=. \
  agent/api/gen/veer.proto
printf '"""Generated from agent/api/veer.proto by scripts/gen-proto.sh; do not edit."""\n' \
  > "$OUT/__init__.py"
