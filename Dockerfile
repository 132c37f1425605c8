# squish: one image for the API and the workers. CPU build of PyTorch by default;
# the gpu worker image is built with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim AS base

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SQUISH_DATA_DIR=/var/lib/squish

RUN useradd --create-home --uid 10001 squish && mkdir -p /var/lib/squish && chown squish /var/lib/squish
WORKDIR /opt/squish

# torch first, from the chosen index, so nothing later pulls another build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY squish ./squish
COPY migrations ./migrations
RUN pip install ".[server,engine]"

USER squish
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --retries=3 \
    CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)" || exit 1
CMD ["squish", "api", "--host", "0.0.0.0", "--port", "8000"]
