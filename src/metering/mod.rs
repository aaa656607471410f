//! Metering: how many tokens a response cost, from the provider's own usage report, and
//! a tokenizer estimate when there is none (a stream cut short, a server that omits it).
//!
//! Nothing here knows of hyper or tokio: the proxy feeds response bytes to a
//! [`UsageObserver`] and asks it for the [`Metered`] result at the end.

pub mod decode;
pub mod observe;
pub mod pricing;
pub mod tokenizer;

use serde::Serialize;

pub use observe::{Endpoint, UsageObserver};
pub use pricing::{Price, Pricing};

/// Tokens of one request, normalised across providers.
///
/// `input` counts only uncached prompt tokens, so each field is billed at one price:
/// OpenAI's `prompt_tokens` = `input + cached_input`; Anthropic reports the three parts
/// apart already. `output` includes `reasoning`, which is also given on its own.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub input: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    pub output: u64,
    pub reasoning: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.input + self.cached_input + self.cache_write + self.output
    }
}

/// The usage of one response and whether any of it is an estimate.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Metered {
    pub usage: Usage,
    pub estimated: bool,
}
