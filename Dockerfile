# The mmgpt service with the shipped default model, CPU torch by default.
#
#   docker build -t mmgpt .
#   docker run -p 8000:8000 mmgpt
#
# Build arguments:
#   BASE_IMAGE       a Debian-like image with python3 (3.11+) and its venv module.
#   TORCH_VERSION    the torch release to install.
#   TORCH_VARIANT    cpu (default) or cuda. The CUDA variant takes PyPI's Linux torch, whose
#                    wheels carry the CUDA runtime, so the same slim base serves; the host
#                    needs the NVIDIA driver and container toolkit (see the `gpu` profile in
#                    docker-compose.yml):
#                      docker build --build-arg TORCH_VARIANT=cuda -t mmgpt:cuda .
#   TORCH_CPU_INDEX_URL  where the CPU variant finds torch when docker/wheels/ holds no torch
#                    wheel; empty means the default index.
# docker/wheels/ may hold wheel files (a torch wheel first of all) and a pip.conf for the
# build's pip; see docker/wheels/README.md.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# Stage 1: torch and the runtime requirements, in layers that only a change of
# pyproject.toml or of the torch build invalidates.
FROM ${BASE_IMAGE} AS deps

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu

# A pip.conf that the build context may carry; pip ignores the setting when it is absent.
ENV PIP_CONFIG_FILE=/build/docker/wheels/pip.conf \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /build

COPY docker/wheels/ docker/wheels/
COPY docker/install-torch.sh docker/

# torch first, in a layer of its own: it is most of the image and changes least often.
RUN python3 -m venv /opt/venv \
    && sh docker/install-torch.sh /opt/venv/bin/pip "${TORCH_VARIANT}" "${TORCH_VERSION}" \
        docker/wheels "${TORCH_CPU_INDEX_URL}"

COPY pyproject.toml docker/requirements.py ./
RUN /opt/venv/bin/python requirements.py pyproject.toml > requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --find-links docker/wheels -r requirements.txt


# Stage 2: the project as a wheel, and the default model with modes the service can read.
FROM deps AS project

COPY README.md ./
COPY app/ app/
COPY models/ models/
COPY bench/ bench/
RUN /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /build/dist . \
    && install -d /opt/mmgpt/checkpoints \
    && cp -r models/checkpoints/mmgpt-scenes /opt/mmgpt/checkpoints/ \
    && chmod -R a+rX,go-w /opt/mmgpt


# Stage 3: the CPU decode kernels (models/cpu_kernels), compiled with Debian's g++ (and the
# ninja package of the requirements) beside the image's own torch, so that the runtime
# image needs no compiler: it loads the library by its path.
FROM deps AS kernels

# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
COPY models/ models/
RUN TORCH_EXTENSIONS_DIR=/build/extensions \
        /opt/venv/bin/python -m models.cpu_kernels > kernels.txt \
    && install -D -m 0644 "$(tail -n 1 kernels.txt)" /opt/mmgpt/lib/mmgpt_cpu_kernels.so


FROM ${BASE_IMAGE} AS runtime

RUN groupadd --system --gid 10001 mmgpt \
    && useradd --system --uid 10001 --gid mmgpt --create-home --shell /usr/sbin/nologin mmgpt

# The requirements' layer stays cached across code changes; the project is a small one.
COPY --from=deps /opt/venv /opt/venv
COPY --from=project /build/dist/ /tmp/dist/
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-index /tmp/dist/*.whl \
    && /opt/venv/bin/pip check \
    && rm -rf /tmp/dist
COPY --from=project /opt/mmgpt /opt/mmgpt
COPY --from=kernels /opt/mmgpt/lib /opt/mmgpt/lib
COPY docker/healthcheck.py /usr/local/bin/mmgpt-healthcheck

# Other checkpoints: mount their folder (at /models, say) and point MMGPT_MODEL into it.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    MMGPT_HOST=0.0.0.0 \
    MMGPT_PORT=8000 \
    MMGPT_MODEL=/opt/mmgpt/checkpoints/mmgpt-scenes \
    MMGPT_CPU_KERNELS_LIBRARY=/opt/mmgpt/lib/mmgpt_cpu_kernels.so

USER 10001:10001
WORKDIR /home/mmgpt
EXPOSE 8000

# Healthy once the model is loaded: a slow disk or a large checkpoint may take a while.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "/usr/local/bin/mmgpt-healthcheck"]

CMD ["mmgpt", "serve"]
