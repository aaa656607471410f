//! Prices per model, and what a request cost.
//!
//! Prices are USD per million tokens. A model name is looked up exactly first, then
//! against patterns with `*` (any run of characters); the longest matching pattern wins,
//! so `gpt-4o-mini*` beats `gpt-4o*` for `gpt-4o-mini-2024-07-18`. A model with no price
//! is counted, costed at zero, and shows in `tokenwarden_unpriced_tokens_total`.

use std::collections::BTreeMap;

// Keyed by model names from the config: a fast hash, seeded per process.
use hashbrown::HashMap;
use serde::Deserialize;

use super::Usage;

/// The shipped table: current OpenAI and Anthropic list prices.
pub const BUILTIN: &str = include_str!("../../config/pricing.toml");

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    pub input_per_mtok: f64,
    /// Cached (read from cache) input; defaults to the input price.
    pub cached_input_per_mtok: Option<f64>,
    /// Writing the prompt cache (Anthropic); defaults to the input price.
    pub cache_write_per_mtok: Option<f64>,
    pub output_per_mtok: f64,
}

/// A resolved price, USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    pub cached_input: f64,
    pub cache_write: f64,
    pub output: f64,
}

impl From<PriceConfig> for Price {
    fn from(c: PriceConfig) -> Self {
        Price {
            input: c.input_per_mtok,
            cached_input: c.cached_input_per_mtok.unwrap_or(c.input_per_mtok),
            cache_write: c.cache_write_per_mtok.unwrap_or(c.input_per_mtok),
            output: c.output_per_mtok,
        }
    }
}

impl Price {
    /// USD for `usage`; reasoning tokens are part of `output` and priced as output.
    pub fn cost_usd(&self, usage: &Usage) -> f64 {
        (usage.input as f64 * self.input
            + usage.cached_input as f64 * self.cached_input
            + usage.cache_write as f64 * self.cache_write
            + usage.output as f64 * self.output)
            / 1e6
    }
}

/// A pricing file: `[pricing."MODEL"]` tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingFile {
    #[serde(default)]
    pub pricing: BTreeMap<String, PriceConfig>,
}

#[derive(Debug, Default)]
pub struct Pricing {
    exact: HashMap<String, Price>,
    /// Longest pattern first.
    patterns: Vec<(String, Price)>,
}

impl Pricing {
    /// `base` (the shipped table or a pricing file) overlaid with `overrides`.
    pub fn new<'a>(tables: impl IntoIterator<Item = &'a BTreeMap<String, PriceConfig>>) -> Pricing {
        let mut merged: BTreeMap<&str, Price> = BTreeMap::new();
        for table in tables {
            for (model, price) in table {
                merged.insert(model, Price::from(*price));
            }
        }
        let mut pricing = Pricing::default();
        for (model, price) in merged {
            if model.contains('*') {
                pricing.patterns.push((model.to_owned(), price));
            } else {
                pricing.exact.insert(model.to_owned(), price);
            }
        }
        pricing
            .patterns
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        pricing
    }

    pub fn price(&self, model: &str) -> Option<&Price> {
        self.exact.get(model).or_else(|| {
            self.patterns
                .iter()
                .find(|(pattern, _)| glob_match(pattern, model))
                .map(|(_, price)| price)
        })
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.patterns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Problems with a price table, each with its field path.
pub fn validate(table: &BTreeMap<String, PriceConfig>, at: &str, problems: &mut Vec<String>) {
    for (model, p) in table {
        let fields = [
            ("input_per_mtok", Some(p.input_per_mtok)),
            ("cached_input_per_mtok", p.cached_input_per_mtok),
            ("cache_write_per_mtok", p.cache_write_per_mtok),
            ("output_per_mtok", Some(p.output_per_mtok)),
        ];
        for (field, value) in fields {
            if let Some(v) = value {
                if !v.is_finite() || v < 0.0 {
                    problems.push(format!("{at}.\"{model}\".{field}: must be a price >= 0"));
                }
            }
        }
        if model.is_empty() {
            problems.push(format!("{at}: a model name must not be empty"));
        }
    }
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return false;
    };
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, f64, f64)]) -> BTreeMap<String, PriceConfig> {
        entries
            .iter()
            .map(|(m, i, o)| {
                let p = PriceConfig {
                    input_per_mtok: *i,
                    cached_input_per_mtok: None,
                    cache_write_per_mtok: None,
                    output_per_mtok: *o,
                };
                (m.to_string(), p)
            })
            .collect()
    }

    #[test]
    fn exact_then_longest_pattern() {
        let t = table(&[
            ("gpt-4o", 2.5, 10.0),
            ("gpt-4o*", 2.0, 8.0),
            ("gpt-4o-mini*", 0.15, 0.6),
            ("*", 1.0, 1.0),
        ]);
        let p = Pricing::new([&t]);
        assert_eq!(p.price("gpt-4o").unwrap().input, 2.5);
        assert_eq!(p.price("gpt-4o-2024-08-06").unwrap().input, 2.0);
        assert_eq!(p.price("gpt-4o-mini-2024-07-18").unwrap().input, 0.15);
        assert_eq!(p.price("llama").unwrap().input, 1.0);
    }

    #[test]
    fn overrides_replace_the_base_table() {
        let base = table(&[("gpt-4o", 2.5, 10.0)]);
        let over = table(&[("gpt-4o", 1.0, 2.0), ("local-*", 0.0, 0.0)]);
        let p = Pricing::new([&base, &over]);
        assert_eq!(p.price("gpt-4o").unwrap().output, 2.0);
        assert_eq!(p.price("local-llama").unwrap().output, 0.0);
        assert!(p.price("unknown").is_none());
    }

    #[test]
    fn cost_is_per_million_tokens_with_cache_prices() {
        let price = Price {
            input: 3.0,
            cached_input: 0.3,
            cache_write: 3.75,
            output: 15.0,
        };
        let usage = Usage {
            input: 1000,
            cached_input: 2000,
            cache_write: 4000,
            output: 500,
            reasoning: 100,
        };
        let want = (1000.0 * 3.0 + 2000.0 * 0.3 + 4000.0 * 3.75 + 500.0 * 15.0) / 1e6;
        assert!((price.cost_usd(&usage) - want).abs() < 1e-12);
    }

    #[test]
    fn globs() {
        assert!(glob_match("claude-*-4-*", "claude-sonnet-4-6"));
        assert!(glob_match("a*", "a"));
        assert!(!glob_match("a*b", "ab-"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("abc", "abcd"));
        assert!(glob_match("a*b*c", "a-b-b-c"));
    }

    #[test]
    fn the_shipped_table_parses_and_prices_current_models() {
        let file: PricingFile = toml::from_str(BUILTIN).unwrap();
        let mut problems = Vec::new();
        validate(&file.pricing, "pricing", &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let p = Pricing::new([&file.pricing]);
        for model in [
            "gpt-4o-mini",
            "gpt-4o-2024-08-06",
            "gpt-5",
            "claude-sonnet-4-6",
            "claude-haiku-4-5-20251001",
            "text-embedding-3-small",
        ] {
            assert!(p.price(model).is_some(), "{model} has no price");
        }
    }
}
