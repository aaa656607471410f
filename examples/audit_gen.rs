//! Writes a synthetic, chained audit log and a config that points at it, to time
//! `tokenwarden report` on a log of any size:
//!
//! ```sh
//! cargo run --release --example audit_gen -- /tmp/tw-1m 1000000
//! /usr/bin/time -v target/release/tokenwarden report --config /tmp/tw-1m/tokenwarden.toml --format json > /dev/null
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

#[path = "../benches/support/synthetic.rs"]
mod synthetic;

use std::time::Duration;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("usage: audit_gen DIR [LINES]"));
    let lines: u64 = args.next().map_or(1_000_000, |n| n.parse().expect("LINES"));
    std::fs::create_dir_all(&dir).expect("create DIR");
    synthetic::write_log(&dir.join("audit"), lines, Duration::from_secs(7 * 86_400));
    let config = dir.join("tokenwarden.toml");
    std::fs::write(
        &config,
        "[storage]\ndir = \".\"\n\n[[providers]]\nname = \"openai\"\nkind = \"openai\"\nbase_url = \"https://api.openai.com\"\nprefix = \"/openai\"\n",
    )
    .expect("write the config");
    println!(
        "{lines} lines in {}; config {}",
        dir.join("audit").display(),
        config.display()
    );
}
