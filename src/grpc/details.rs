//! `grpc-status-details-bin` with a `google.rpc.RetryInfo`: the throttling
//! signal the OTLP specification defines. OpenTelemetry exporters retry a
//! `RESOURCE_EXHAUSTED` only when it carries one (and wait its delay), as
//! gRPC's own retry policies wait `grpc-retry-pushback-ms`; a refusal with a
//! pushback sends both.
//!
//! The four messages involved have fixed shapes, so they are written here
//! directly in the protobuf wire format rather than through a code generator.

use std::time::Duration;

use base64::Engine;
use http::HeaderValue;

/// `grpc-status-details-bin`.
pub static GRPC_STATUS_DETAILS: http::HeaderName =
    http::HeaderName::from_static("grpc-status-details-bin");

const RETRY_INFO_TYPE: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// A `google.rpc.Status{code, message, details: [RetryInfo{retry_delay}]}`,
/// base64 as a `-bin` header carries it.
pub fn retry_info(code: u8, message: &str, delay: Duration) -> HeaderValue {
    let mut duration = Vec::new();
    field_varint(&mut duration, 1, delay.as_secs());
    if delay.subsec_nanos() > 0 {
        field_varint(&mut duration, 2, u64::from(delay.subsec_nanos()));
    }
    let mut retry_info = Vec::new();
    field_bytes(&mut retry_info, 1, &duration);
    let mut any = Vec::new();
    field_bytes(&mut any, 1, RETRY_INFO_TYPE.as_bytes());
    field_bytes(&mut any, 2, &retry_info);
    let mut status = Vec::new();
    field_varint(&mut status, 1, u64::from(code));
    field_bytes(&mut status, 2, message.as_bytes());
    field_bytes(&mut status, 3, &any);
    let encoded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(status);
    HeaderValue::try_from(encoded).expect("base64 is a valid header value")
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn field_varint(out: &mut Vec<u8>, field: u64, n: u64) {
    varint(out, field << 3); // wire type 0
    varint(out, n);
}

fn field_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, (field << 3) | 2); // wire type 2
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_format_of_a_known_status() {
        let v = retry_info(8, "x", Duration::from_millis(1500));
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(v.as_bytes())
            .unwrap();
        // code 8, message "x", then one Any of 40 + 8 bytes.
        assert_eq!(&bytes[..5], &[0x08, 8, 0x12, 1, b'x']);
        assert_eq!(bytes[5], 0x1a);
        let any = &bytes[7..];
        assert_eq!(any[0], 0x0a);
        assert_eq!(
            &any[2..2 + RETRY_INFO_TYPE.len()],
            RETRY_INFO_TYPE.as_bytes()
        );
        // RetryInfo{retry_delay: Duration{seconds: 1, nanos: 500_000_000}}.
        let retry = &any[2 + RETRY_INFO_TYPE.len()..];
        assert_eq!(&retry[..4], &[0x12, 10, 0x0a, 8]);
        assert_eq!(&retry[4..6], &[0x08, 1]);
        assert_eq!(retry[6], 0x10);
    }
}
