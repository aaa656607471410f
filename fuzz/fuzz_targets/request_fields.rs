//! What the proxy reads of a request body and the few changes it may make: any bytes
//! never panic, and a change leaves a body that is still JSON with the field set.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenwarden::guard::runs::fingerprint;
use tokenwarden::metering::Endpoint;
use tokenwarden::providers::openai::inject_include_usage;
use tokenwarden::providers::{set_json_field, RequestFields};

fuzz_target!(|body: &[u8]| {
    let _ = fingerprint(body);
    // The proxy forwards a body as sent, valid or not; what it adds keeps a valid body valid.
    let valid = serde_json::from_slice::<serde_json::Value>(body).is_ok();
    let Ok(fields) = serde_json::from_slice::<RequestFields<'_>>(body) else {
        return;
    };
    let _ = fields.choices();
    let _ = fields.wants_usage_injected();
    for endpoint in [Endpoint::ChatCompletions, Endpoint::Responses, Endpoint::Messages] {
        let (_, field) = fields.output_limit(endpoint);
        if let Some(new) = set_json_field(body, field, serde_json::Value::from(42u64)) {
            let value: serde_json::Value =
                serde_json::from_slice(&new).expect("a clamped body is still JSON");
            assert_eq!(value[field], 42, "the field is set");
        }
    }
    if let Some(new) = inject_include_usage(body, fields.stream_options.is_some()).filter(|_| valid) {
        let value: serde_json::Value =
            serde_json::from_slice(&new).expect("an injected body is still JSON");
        assert_eq!(value["stream_options"]["include_usage"], true);
    }
});
