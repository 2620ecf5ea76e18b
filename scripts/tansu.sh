#!/usr/bin/env bash
# Starts a local tansu broker (a real Kafka-API broker) for trying keywarden
# against something other than the embedded mock, then creates no topics:
# keywarden creates its own at start-up.
#   scripts/tansu.sh            # in memory, on 127.0.0.1:9092
#   PORT=19092 STORAGE=sqlite://tansu.db scripts/tansu.sh   # survives restarts
# Then: KEYWARDEN_KAFKA_BROKERS=127.0.0.1:9092 keywarden run
set -euo pipefail
PORT=${PORT:-9092}
STORAGE=${STORAGE:-memory://tansu/}
command -v tansu >/dev/null 2>&1 || export PATH="$HOME/.cargo/bin:$PATH"
command -v tansu >/dev/null 2>&1 || { echo "tansu is not installed: run scripts/install-test-deps.sh" >&2; exit 1; }
exec tansu broker --storage-engine "$STORAGE" \
  --listener-url "tcp://127.0.0.1:$PORT" --advertised-listener-url "tcp://127.0.0.1:$PORT"
