#!/bin/sh
# Docker HEALTHCHECK: a container running `lmforge serve` is healthy when GET /health answers 200 on
# its --port (default 8000); any other role (a pipeline component, a Ray node) has nothing to probe
# and reports healthy. Kubernetes ignores this; the chart declares its own probes.
args=$(tr '\0' '\n' </proc/1/cmdline 2>/dev/null || true)
echo "$args" | grep -qx serve || exit 0
port=$(echo "$args" | awk 'prev == "--port" {print; exit} {prev = $0}')
port=${port:-$(echo "$args" | sed -n 's/^--port=//p' | head -n 1)}
exec python3 - "${port:-8000}" <<'PY'
import sys
import urllib.request

try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=5) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as e:
    print(f"unhealthy: {e}")
    sys.exit(1)
PY
