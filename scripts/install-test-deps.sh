#!/usr/bin/env bash
# Installs what the tests need and is not on a fresh machine: the tansu broker
# (built once, then cached in ~/.cargo/bin), the Python Kafka client used as an
# independent third-party producer, systemd-analyze, Prometheus and Alertmanager,
# MariaDB and its HashiCorp Vault key plugin.
set -euo pipefail

TANSU_VERSION=0.6.0
if command -v tansu >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/tansu" ]; then
  echo "tansu: cached"
else
  echo "tansu: building $TANSU_VERSION once (about 17 minutes on 2 cores); later runs reuse it"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql
fi

# confluent-kafka and kafka-python: independent third-party Kafka clients
# (kafka-python is its own implementation, and writes header names as raw
# bytes); moto[server]: a real AWS KMS API implementation (moto_server) for the
# AWS provider's tests; keyprotect: IBM's official Key Protect client (with
# ibm-cloud-sdk-core), which judges the Key Protect double.
if python3 -c 'import confluent_kafka, kafka, moto.server, boto3, flask_cors, keyprotect, ibm_cloud_sdk_core' 2>/dev/null; then
  echo "python test tools: present"
else
  python3 -m pip install --quiet confluent-kafka kafka-python "moto[server]" boto3 keyprotect
fi

# systemd-analyze checks the unit; Prometheus scrapes the daemon and
# Alertmanager receives its alerts in the tests (the tests start their own);
# tests/mariadb.rs runs a private mariadbd with the HashiCorp Vault key plugin
# against keywarden's Vault KV endpoint.
missing=()
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
# mariadbd is in /usr/sbin, which a non-root PATH may lack.
if ! command -v mariadbd >/dev/null 2>&1 && [ ! -x /usr/sbin/mariadbd ]; then
  missing+=(mariadb-server)
fi
[ -e /usr/lib/mysql/plugin/hashicorp_key_management.so ] || missing+=(mariadb-plugin-hashicorp-key-management)
if [ ${#missing[@]} -gt 0 ]; then
  echo "debian packages: installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
