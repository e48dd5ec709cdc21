# syntax=docker/dockerfile:1.7
# The worker image: dpo-worker linked against PyTorch 2.11's libtorch, with the
# CUDA 13 runtime, cuDNN and NCCL libraries that the torch==2.11.0 wheel brings.
# Build from the repository root:
#   docker build -f deploy/docker/worker.Dockerfile -t dpo-cluster/worker:0.1.0 .
ARG RUST_VERSION=1.95
ARG CUDA_BASE=nvidia/cuda:13.0.1-base-ubuntu24.04

FROM rust:${RUST_VERSION}-bookworm AS build
# python3-venv for the torch wheel (libtorch for tch); g++ is in the image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv=3.11.* \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install torch==2.11.0
# Where the runtime stage puts torch's libraries; baked into the binary's RUNPATH.
ENV LIBTORCH_USE_PYTORCH=1 \
    PATH=/opt/venv/bin:$PATH \
    RUSTFLAGS="-C link-arg=-Wl,-rpath,/opt/torch/torch/lib"
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo fetch --locked \
    && cargo build --release --locked -p dpo-worker --bin dpo-worker \
    && mkdir -p /out \
    && cp target/release/dpo-worker /out/ \
    && mkdir -p /opt/torch \
    && cp -a /opt/venv/lib/python3.11/site-packages/torch/lib /opt/torch/torch-lib \
    && cp -a /opt/venv/lib/python3.11/site-packages/nvidia /opt/torch/nvidia

FROM ${CUDA_BASE}
# torch/lib finds the CUDA libraries through its own RPATH ($ORIGIN/../../nvidia/...),
# so keep the wheel's layout: /opt/torch/torch/lib next to /opt/torch/nvidia.
COPY --from=build /opt/torch/torch-lib /opt/torch/torch/lib
COPY --from=build /opt/torch/nvidia /opt/torch/nvidia
COPY --from=build /out/dpo-worker /usr/local/bin/dpo-worker
# The root filesystem is read-only in the chart: caches go to /tmp (an emptyDir).
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/opt/torch/torch/lib \
    HOME=/tmp \
    CUDA_CACHE_PATH=/tmp/cuda-cache
RUN groupadd --gid 10001 dpo \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin dpo
USER 10001:10001
# The collective (ring) port; the coordinator's address comes from DPO_COORDINATOR.
EXPOSE 7740
ENTRYPOINT ["/usr/local/bin/dpo-worker"]
CMD ["--listen", "0.0.0.0:7740"]
