# Agent Keys: the proxy as a container image.
#
#   docker build -t agentkeys .
#   docker run -v agentkeys-state:/var/lib/agentkeys -v ./agentkeys.yaml:/etc/agentkeys/agentkeys.yaml:ro \
#     -e OPENAI_API_KEY -p 8080:8080 -p 8081:8081 -p 9464:9464 agentkeys
#
# BASE is any Debian-like image with Python 3.12+ (3.11 works, with mitmproxy 11) and, for the build
# stage, its venv module: python:3.13-slim by default, or a local image (`make image` builds one
# from Debian's packages with mmdebstrap, where no registry can be reached). See docs/operations.md.
ARG BASE=docker.io/library/python:3.13-slim

# ----- build: the package and its dependencies in a virtual environment -----
FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/agentkeys
COPY pyproject.toml README.md /src/
COPY addon /src/addon
# Behind a TLS-inspecting proxy, give pip its CA: `--secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt`.
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && /opt/agentkeys/bin/pip install --no-compile /src \
 && /opt/agentkeys/bin/pip uninstall --yes pip

# ----- run: the environment, a user, a volume; nothing else from the build -----
FROM ${BASE}
COPY --from=build /opt/agentkeys /opt/agentkeys
COPY deploy/docker/agentkeys.yaml /etc/agentkeys/agentkeys.yaml
RUN groupadd --system --gid 10001 agentkeys \
 && useradd --system --uid 10001 --gid agentkeys --home-dir /var/lib/agentkeys --no-create-home agentkeys \
 && mkdir -p /var/lib/agentkeys \
 && chown agentkeys:agentkeys /var/lib/agentkeys
# The store (SQLite), the audit log and the CA live here: keep it across restarts and upgrades.
VOLUME /var/lib/agentkeys
ENV PATH=/opt/agentkeys/bin:$PATH \
    AGENTKEYS_CONFIG=/etc/agentkeys/agentkeys.yaml \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER agentkeys
WORKDIR /var/lib/agentkeys
# proxy mode (HTTPS_PROXY), gateway mode (base URLs), metrics and probes
EXPOSE 8080 8081 9464
# Healthy when ready: listeners up, CA loaded, store answering (asked on the config's metrics port).
HEALTHCHECK --interval=10s --timeout=8s --start-period=30s --retries=3 CMD ["agentkeys", "probe", "ready"]
ENTRYPOINT ["agentkeys"]
CMD ["serve"]
