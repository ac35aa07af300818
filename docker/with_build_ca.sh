#!/bin/sh
# Runs "$@" trusting the CA bundle passed to `docker build --secret id=ca,src=BUNDLE` (behind a
# TLS-intercepting proxy). BuildKit mounts the secret at /run/secrets/ca for one RUN only, so the
# bundle is never written into an image layer. Without the secret, "$@" runs unchanged.
set -eu
if [ -s /run/secrets/ca ]; then
    export PIP_CERT=/run/secrets/ca SSL_CERT_FILE=/run/secrets/ca \
        CURL_CA_BUNDLE=/run/secrets/ca REQUESTS_CA_BUNDLE=/run/secrets/ca
fi
exec "$@"
