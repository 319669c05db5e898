# ray-operator container image: build with cargo, run the single binary on distroless.
#
#   docker build -t ghcr.io/ray-operator/ray-operator:0.1.0 .
#
# The runtime image holds only the binary, glibc and CA certificates (gcr.io/distroless/cc): no
# shell, no package manager. It runs as a numeric non-root user, so `runAsNonRoot: true` in the
# Deployment can verify it, and needs no writable filesystem (readOnlyRootFilesystem: true).

# ---- build ------------------------------------------------------------------------------------
# Debian 12 (bookworm) on both stages, so the binary's glibc matches the runtime's.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
# The whole crate (see .dockerignore for what is left out); Cargo.lock pins every dependency.
# build.rs compiles proto/ with protox (pure Rust), so no protoc is needed.
COPY . .
# Registry and target caches make rebuilds incremental; the binary is copied out of the cache
# mount in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release --bin ray-operator \
 && install -D -m 0755 target/release/ray-operator /out/ray-operator

# ---- runtime ----------------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ray-operator /usr/local/bin/ray-operator
# 65532 is distroless' "nonroot"; numeric, so Kubernetes can check runAsNonRoot.
USER 65532:65532
# Health (/healthz, /readyz) and Prometheus metrics (/metrics): --health-addr, default 0.0.0.0:8080.
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/ray-operator"]
CMD ["run"]
