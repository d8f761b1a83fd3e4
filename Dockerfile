# The one `vitals` binary in a small runtime image, running as a non-root user.
#   docker build -t vitals . && docker run --rm vitals --help
# Build stage: the workspace's release build (librdkafka is compiled from source by rdkafka-sys;
# it and reqwest link the system OpenSSL).
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev pkg-config && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin vitals && cp target/release/vitals /vitals

# Runtime stage: the binary, CA certificates (TLS to every dependency) and OpenSSL's runtime.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin vitals \
    && mkdir -p /data && chown vitals:vitals /data
COPY --from=build /vitals /usr/local/bin/vitals
USER 10001:10001
ENV VITALS_LOG_FORMAT=json VITALS_PROCESSORS__DATA_DIR=/data/state
ENTRYPOINT ["/usr/local/bin/vitals"]
