# syntax=docker/dockerfile:1
# Build: docker build -t tokenwarden .
# Run:   docker run -p 8080:8080 -p 9090:9090 -e OPENAI_API_KEY -e ANTHROPIC_API_KEY \
#          -v tokenwarden-data:/var/lib/tokenwarden tokenwarden
# With a config of your own: add -v $PWD/my-config:/etc/tokenwarden:ro (listen on
# 0.0.0.0 inside the container; keep [storage] dir in the volume).

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them. The manifest names the
# benches, so they come along; the library and binary are stubs for this step.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin tokenwarden \
    && rm -rf src
# The built-in price table (config/pricing.toml) is compiled in.
COPY config ./config
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin tokenwarden

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/tokenwarden --create-home tokenwarden
COPY --from=build /src/target/release/tokenwarden /usr/local/bin/tokenwarden
# The example config, made for a container: both listeners on every interface, the
# audit log and ledger snapshot in the volume. The build fails if the example drifts.
COPY config/tokenwarden.toml /etc/tokenwarden/tokenwarden.toml
RUN f=/etc/tokenwarden/tokenwarden.toml \
    && sed -i -e 's|^listen = "127\.0\.0\.1:|listen = "0.0.0.0:|' \
              -e 's|^dir = "data"|dir = "/var/lib/tokenwarden"|' "$f" \
    && grep -q '^listen = "0\.0\.0\.0:8080"' "$f" \
    && grep -q '^listen = "0\.0\.0\.0:9090"' "$f" \
    && grep -q '^dir = "/var/lib/tokenwarden"' "$f"
USER tokenwarden
WORKDIR /var/lib/tokenwarden
VOLUME /var/lib/tokenwarden
RUN tokenwarden check --config /etc/tokenwarden/tokenwarden.toml
EXPOSE 8080 9090
ENTRYPOINT ["tokenwarden"]
CMD ["serve", "--config", "/etc/tokenwarden/tokenwarden.toml"]
