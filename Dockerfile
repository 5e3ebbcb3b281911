# syntax=docker/dockerfile:1
# yunque's OpenAI-compatible server (`yunque serve`), installed as install.sh installs it.
#
#   docker build -t yunque .                                   # CPU
#   docker build --build-arg TORCH_VARIANT=cu128 -t yunque:cuda .   # NVIDIA GPUs (run with --gpus all)
#   docker run --rm -p 127.0.0.1:8000:8000 -v /path/to/model:/model:ro -v "$PWD/keys:/etc/yunque/keys:ro" yunque
#
# The model directory is mounted read-only at /model; the API keys file (hashes only, made by
# `yunque keys create --keys-file keys/keys.json`) in a directory mounted at /etc/yunque/keys;
# settings in /etc/yunque/serve.yaml (mount your own over it; a JWT secret comes from the environment
# variable its auth.jwt.secret_env names). compose.yaml runs it behind a TLS-terminating proxy.
# SIGTERM drains (drain_timeout_s): give `docker stop -t` / stop_grace_period more than that.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# cpu, or the CUDA build of torch to install (cu126, cu128, ...: its wheel carries the CUDA runtime,
# the host needs only the NVIDIA driver and container toolkit).
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# g++: yunque builds its CPU kernels on first use (without it PyTorch's ops run instead).
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin yunque

WORKDIR /opt/yunque
COPY pyproject.toml README.md install.sh ./
COPY yunque ./yunque
# install.sh keeps a torch that is already in the venv, so the variant's wheel goes in first; the
# demo model (`yunque models`) is left out of a server image.
RUN python -m venv .venv \
    && .venv/bin/pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}" \
    && YUNQUE_NO_DEMO_MODEL=1 bash install.sh serve \
    && .venv/bin/python -m compileall -q yunque
COPY deploy/serve.yaml /etc/yunque/serve.yaml
# The compiled CPU kernels' cache: in /tmp, writable whatever the uid (`--user`) and with a read-only root.
ENV PATH=/opt/yunque/.venv/bin:$PATH \
    YUNQUE_CACHE=/tmp/yunque

USER yunque
WORKDIR /home/yunque
EXPOSE 8000
# /ready: the model is loaded, the engine runs and the server is not draining.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]
# Exec form: yunque is PID 1 and gets SIGTERM itself (a shell in between would not pass it on).
ENTRYPOINT ["yunque", "serve"]
CMD ["--model", "/model", "--host", "0.0.0.0", "--port", "8000", "--config", "/etc/yunque/serve.yaml"]
