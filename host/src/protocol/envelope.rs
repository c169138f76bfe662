//! kombu's envelope of a transient message (delivery mode 1): what events and remote-control
//! replies travel in.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};

/// `body` base64-encoded in kombu's envelope, sent to `exchange` with `routing_key`.
pub fn transient_envelope(body: &str, headers: Value, exchange: &str, routing_key: &str) -> String {
    json!({
        "body": BASE64.encode(body),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "delivery_mode": 1,
            "delivery_info": {"exchange": exchange, "routing_key": routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": uuid::Uuid::new_v4().to_string(),
        },
    })
    .to_string()
}
