#!/usr/bin/env bash
# Installs what the tests need and is not on a fresh machine: the tansu broker
# (built once, then cached in ~/.cargo/bin), the Python Kafka client used as an
# independent third-party producer, and systemd-analyze.
set -euo pipefail

TANSU_VERSION=0.6.0
if command -v tansu >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/tansu" ]; then
  echo "tansu: cached"
else
  echo "tansu: building $TANSU_VERSION once (about 17 minutes on 2 cores); later runs reuse it"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql
fi

# confluent-kafka: an independent third-party Kafka client; moto[server]: a real
# AWS KMS API implementation (moto_server) for the AWS provider's tests.
if python3 -c 'import confluent_kafka, moto.server, boto3, flask_cors' 2>/dev/null; then
  echo "python test tools: present"
else
  python3 -m pip install --quiet confluent-kafka "moto[server]" boto3
fi

if ! command -v systemd-analyze >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd
fi
