# Builds the haven binary in a Rust image and runs it in a slim Debian image as a
# non-root user. The shared FHIR corpora are not needed at run time: the server
# reads only what is generated and committed under profiles/.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p haven \
    && install -m 0755 target/release/haven /usr/local/bin/haven

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/haven --create-home haven
COPY --from=builder /usr/local/bin/haven /usr/local/bin/haven
USER haven
WORKDIR /var/lib/haven
VOLUME ["/var/lib/haven"]
ENV HAVEN_DATA_DIR=/var/lib/haven
EXPOSE 8443
# Loopback only until authorization exists; docker-compose.yml overrides the address.
ENTRYPOINT ["haven"]
CMD ["serve", "--listen", "127.0.0.1:8443"]
