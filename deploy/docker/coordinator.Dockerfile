# syntax=docker/dockerfile:1.7
# The coordinator image: dpo-coordinator and dpoctl, no libtorch, no shell.
# Build from the repository root:
#   docker build -f deploy/docker/coordinator.Dockerfile -t dpo-cluster/coordinator:0.1.0 .
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
# protoc comes from the protoc-bin-vendored crate (scripts/protoc), so fetch first.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo fetch --locked \
    && cargo build --release --locked -p dpo-coordinator -p dpoctl \
    && mkdir -p /out \
    && cp target/release/dpo-coordinator target/release/dpoctl /out/

# Distroless: glibc and libgcc only, no shell. Runs as uid 10001, the workers'
# uid too: both write under a run's output directory on the shared volume.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/dpo-coordinator /out/dpoctl /usr/local/bin/
USER 10001:10001
# gRPC (runs, workers), plain-text health for probes, Prometheus /metrics.
EXPOSE 7733 7734 9090
ENTRYPOINT ["/usr/local/bin/dpo-coordinator"]
CMD ["--listen", "0.0.0.0:7733", "--health-listen", "0.0.0.0:7734", "--metrics-listen", "0.0.0.0:9090", "--data-dir", "/var/lib/dpo-cluster"]
