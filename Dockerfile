# syntax=docker/dockerfile:1
# Build: docker build -t tokenwarden .
# Run:   docker run -p 8080:8080 -e OPENAI_API_KEY -e ANTHROPIC_API_KEY \
#          -v $PWD/config:/etc/tokenwarden:ro -v tokenwarden-data:/var/lib/tokenwarden tokenwarden

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin tokenwarden \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin tokenwarden

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/tokenwarden --create-home tokenwarden
COPY --from=build /src/target/release/tokenwarden /usr/local/bin/tokenwarden
COPY config/tokenwarden.toml /etc/tokenwarden/tokenwarden.toml
USER tokenwarden
WORKDIR /var/lib/tokenwarden
EXPOSE 8080 9090
# Listen on all interfaces inside the container: mount a config with
#   [server] listen = "0.0.0.0:8080"   and   [storage] dir = "/var/lib/tokenwarden"
ENTRYPOINT ["tokenwarden"]
CMD ["serve", "--config", "/etc/tokenwarden/tokenwarden.toml"]
