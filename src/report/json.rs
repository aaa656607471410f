//! The JSON format: the [`Report`] as it is, for scripts and dashboards.

use super::Report;

pub fn render(report: &Report) -> String {
    // Serialising plain maps, strings and numbers cannot fail; a non-finite float (which
    // no sum of finite costs produces) would come out as null.
    let mut text = serde_json::to_string_pretty(report).unwrap_or_else(|e| {
        serde_json::json!({ "error": format!("cannot render the report: {e}") }).to_string()
    });
    text.push('\n');
    text
}
