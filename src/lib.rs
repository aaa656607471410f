//! tokenwarden: a transparent reverse proxy for LLM provider APIs.
//!
//! One request travels through the modules in this order:
//!
//! 1. [`server`] accepts the connection (TCP_NODELAY, optional TLS, connection limit,
//!    header read timeout) and hands each request to the proxy service.
//! 2. [`proxy`] routes the path to a configured [`providers::Provider`] by its prefix,
//!    identifies the agent by its virtual key ([`identity`]), reads the request body within
//!    `max_body_bytes`, swaps the virtual key for the provider's key, strips hop-by-hop
//!    headers and sends the request through one pooled client.
//! 3. The response body is wrapped in a [`proxy::tap::TapBody`]: every frame goes to the
//!    client at once and unchanged, a copy is shown to an observer, and the request is
//!    settled exactly once, however the stream ends (complete, upstream error, timeout,
//!    client gone).
//! 4. Every error is answered in the provider's own shape ([`providers::ProviderKind`]),
//!    with the request id header.
//!
//! Besides provider paths, the main listener serves `POST /v1/outcomes`
//! ([`proxy::outcomes`], recorded by [`outcomes`]). [`report`] reads the audit log back
//! for `tokenwarden report`: cost per outcome, redundancy, stopped runs.
//!
//! [`config`] turns the TOML file into a validated [`config::Config`]; [`start`] builds a
//! proxy ready to serve from it; [`admin`] serves metrics and health on its own listener,
//! and behind a bearer token the admin API (agents, runs, pauses, config reload);
//! [`mock`] is a scriptable provider for tests, benchmarks and [`demo`], which runs mock,
//! proxy and two simulated agents in one process for a first look.

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod config;
pub mod demo;
pub mod guard;
pub mod identity;
pub mod ledger;
pub mod metering;
pub mod metrics;
pub mod mock;
pub mod outcomes;
pub mod providers;
pub mod proxy;
pub mod report;
pub mod secret;
pub mod server;
pub mod sse;
pub mod start;
