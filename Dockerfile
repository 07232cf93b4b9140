# payrecon: multi-stage build. The builder compiles librdkafka (rdkafka-sys) from source, so it
# needs cmake, a C++ compiler, OpenSSL and zlib headers; the runtime image only needs the shared
# libraries the binary links (libssl3, zlib) and CA certificates for TLS to Kafka/PostgreSQL.
# No secret is baked in: the database URL and Kafka credentials come from PAYRECON_* variables
# at run time (see docs/operations.md).

ARG RUST_VERSION=1.94
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake g++ make libssl-dev pkg-config zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src

# Dependencies first, with placeholder sources, so a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin payrecon \
 && rm -rf src

# Everything the crate embeds at compile time: migrations (sqlx::migrate!), the default
# configuration and the Avro schemas (include_str!).
COPY config ./config
COPY migrations ./migrations
COPY schemas ./schemas
COPY src ./src
# COPY keeps the files' old mtimes: make sure cargo rebuilds the crate over the placeholder.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin payrecon \
 && install -D -m 0755 target/release/payrecon /out/payrecon

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin payrecon
COPY --from=builder /out/payrecon /usr/local/bin/payrecon
USER 10001:10001
# The embedded defaults listen on 127.0.0.1, unreachable from outside a container.
ENV PAYRECON_HTTP__LISTEN=0.0.0.0:9464
EXPOSE 9464
# /health/ready answers 200 once PostgreSQL answers. bash's /dev/tcp keeps curl out of the image.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9464 && printf 'GET /health/ready HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["/usr/local/bin/payrecon"]
CMD ["run"]
