//! The command line: `check` reports every config problem, `keys new` prints a usable key.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::bin;

fn check(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(bin())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_example_config_is_valid() {
    let out = Command::new(bin())
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/tokenwarden.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (3 providers, 1 agents)"));
}

#[test]
fn check_reports_every_problem_with_its_field_path() {
    let (ok, text) = check(
        r#"
[server]
listen = "not-an-address"
[[providers]]
name = "openai"
kind = "openai"
base_url = "api.openai.com"
prefix = "openai"
[[agents]]
id = "a"
key_sha256 = "short"
"#,
    );
    assert!(!ok);
    for field in [
        "server.listen",
        "providers[0].base_url",
        "providers[0].prefix",
        "agents[0].key_sha256",
    ] {
        assert!(text.contains(field), "{field} missing from:\n{text}");
    }
}

#[test]
fn check_names_unknown_keys_and_bad_types() {
    let (ok, text) = check("[server]\nlisten = \"127.0.0.1:1\"\nlisten_port = 5\n");
    assert!(!ok);
    assert!(text.contains("listen_port"), "{text}");
    let (ok, text) = check("[upstream]\nidle_timeout = \"soon\"\n");
    assert!(!ok);
    assert!(text.contains("idle_timeout"), "{text}");
    // A value of the wrong type or an unknown variant is named by its whole path, with
    // the line it is on.
    let (ok, text) = check("[server]\nmax_body_bytes = \"big\"\n");
    assert!(!ok);
    assert!(text.contains("server.max_body_bytes: "), "{text}");
    assert!(text.contains("line 2"), "{text}");
    let (ok, text) = check(
        "[[providers]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://x\"\nprefix = \"/a\"\n\
         [[providers]]\nname = \"b\"\nkind = \"openaii\"\n",
    );
    assert!(!ok);
    assert!(text.contains("providers[1].kind: "), "{text}");
}

#[test]
fn keys_new_prints_a_key_and_its_config_line() {
    let out = Command::new(bin())
        .args(["keys", "new", "--agent", "support-bot"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text
        .split_whitespace()
        .find(|w| w.starts_with("tw-"))
        .expect("a key");
    let digest = tokenwarden::identity::key_digest_hex(key);
    assert!(
        text.contains(&format!("key_sha256 = \"{digest}\"")),
        "{text}"
    );
    assert!(text.contains("id = \"support-bot\""));
    assert!(key.len() >= 64, "a high-entropy key");

    // Whatever the id holds, the printed lines paste into a config as they are.
    let odd = "ops \"nightly\" \\ bot\u{1b}";
    let out = Command::new(bin())
        .args(["keys", "new", "--agent", odd])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let pasted = &text[text.find("[[agents]]").expect("config lines")..];
    let parsed: toml::Value = toml::from_str(pasted).unwrap();
    assert_eq!(parsed["agents"][0]["id"].as_str(), Some(odd), "{pasted}");

    let out = Command::new(bin())
        .args(["keys", "new", "--agent", ""])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--agent"));
}
