//! W3C trace context as Celery's OpenTelemetry instrumentation carries it among a task
//! message's headers (`traceparent`, `tracestate`). Any producer can write these, so they are
//! read strictly: anything the W3C format does not allow is ignored (the spec's "start a new
//! trace"), and `tracestate` is kept only within the spec's bounds.

/// The most members a `tracestate` keeps (the spec's limit).
const MAX_STATE_MEMBERS: usize = 32;
/// The longest `tracestate` kept, in bytes (what the spec asks vendors to propagate at least).
const MAX_STATE_BYTES: usize = 512;

/// A span's place in a trace, as `traceparent` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl SpanContext {
    /// Reads `traceparent`: `00-<32 hex>-<16 hex>-<2 hex>`, lowercase. A later version is read
    /// for those four fields (the spec's forward compatibility); version `ff`, all-zero ids
    /// and anything malformed are none.
    pub fn parse(traceparent: &str) -> Option<Self> {
        let text = traceparent.trim();
        let version = u8::from_str_radix(hex_field(text.get(..2)?)?, 16).ok()?;
        if version == 0xff || (version == 0 && text.len() != 55) {
            return None;
        }
        // A later version may append fields, after a dash.
        if text.len() > 55 && text.as_bytes().get(55) != Some(&b'-') {
            return None;
        }
        let bytes = text.as_bytes();
        if [2, 35, 52].iter().any(|&at| bytes.get(at) != Some(&b'-')) {
            return None;
        }
        let trace_id = decode::<16>(text.get(3..35)?)?;
        let span_id = decode::<8>(text.get(36..52)?)?;
        let flags = u8::from_str_radix(hex_field(text.get(53..55)?)?, 16).ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The `traceparent` header naming this span (version 00).
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            u8::from(self.sampled)
        )
    }
}

/// The trace a message continues, as its `traceparent` and `tracestate` headers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// The span that sent the message: the parent of the span that runs it.
    pub parent: SpanContext,
    /// The vendors' state, passed on as it came (when well-formed).
    pub state: Option<String>,
}

impl TraceContext {
    /// Reads the two headers; a `tracestate` without a valid `traceparent` is dropped with it
    /// (the spec's rule).
    pub fn read(traceparent: Option<&str>, state: Option<&str>) -> Option<Self> {
        Some(Self {
            parent: SpanContext::parse(traceparent?)?,
            state: state.and_then(tracestate),
        })
    }

    /// Writes the two headers into a message's `headers` (replacing what was there).
    pub fn write(&self, headers: &mut serde_json::Map<String, serde_json::Value>) {
        headers.insert("traceparent".into(), self.parent.traceparent().into());
        match &self.state {
            Some(state) => headers.insert("tracestate".into(), state.clone().into()),
            None => headers.remove("tracestate"),
        };
    }
}

/// `tracestate` as it may be passed on: its members (`key=value`) if every one is
/// well-formed and there are at most 32 in at most 512 bytes; none otherwise.
pub fn tracestate(value: &str) -> Option<String> {
    if value.len() > MAX_STATE_BYTES {
        return None;
    }
    let members: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .collect();
    if members.is_empty() || members.len() > MAX_STATE_MEMBERS {
        return None;
    }
    members
        .iter()
        .all(|m| well_formed_member(m))
        .then(|| members.join(","))
}

/// `key=value`: a key of lowercase letters, digits and `_-*/@` starting with a letter or
/// digit; a value of printable ASCII but `,` and `=` (the whitespace around a member is the
/// list's, trimmed before).
fn well_formed_member(member: &str) -> bool {
    let Some((key, value)) = member.split_once('=') else {
        return false;
    };
    let key_ok = (1..=256).contains(&key.len())
        && key
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-*/@".contains(&b));
    let value_ok = (1..=256).contains(&value.len())
        && value
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=');
    key_ok && value_ok
}

/// `field` if it is lowercase hex.
fn hex_field(field: &str) -> Option<&str> {
    field
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        .then_some(field)
}

fn decode<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = hex_field(text)?;
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_reads_back_as_it_was_written() {
        let span = SpanContext::parse(GOOD).expect("parses");
        assert!(span.sampled);
        assert_eq!(
            span.span_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(span.traceparent(), GOOD);
        let later = format!("cc{}-what-comes-later", &GOOD[2..]);
        assert!(
            SpanContext::parse(&later).is_some(),
            "a later version's first fields"
        );
    }

    #[test]
    fn a_malformed_or_hostile_traceparent_is_ignored() {
        for bad in [
            "",
            "00",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e47-3600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0ü",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(SpanContext::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_tracestate_goes_only_with_a_valid_traceparent() {
        let read = TraceContext::read(Some(GOOD), Some("k=v")).expect("reads");
        assert_eq!(read.state.as_deref(), Some("k=v"));
        assert_eq!(TraceContext::read(Some("00-bad"), Some("k=v")), None);
        assert_eq!(TraceContext::read(None, Some("k=v")), None);
        let hostile = TraceContext::read(Some(GOOD), Some("k=\u{1b}[2J")).expect("reads");
        assert_eq!(
            hostile.state, None,
            "a malformed state is dropped, the parent kept"
        );
    }

    #[test]
    fn a_tracestate_is_kept_within_the_specs_bounds() {
        assert_eq!(
            tracestate("rojo=00f067aa0ba902b7, congo=t61rcWkgMzE").as_deref(),
            Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
        );
        assert_eq!(
            tracestate("tenant@vendor=x").as_deref(),
            Some("tenant@vendor=x")
        );
        let many = (0..33).map(|i| format!("k{i}=v")).collect::<Vec<_>>();
        assert_eq!(tracestate(&many.join(",")), None, "33 members");
        assert_eq!(
            tracestate(&format!("k={}", "v".repeat(600))),
            None,
            "too long"
        );
        assert_eq!(
            tracestate(" k=v ,\tq=w ").as_deref(),
            Some("k=v,q=w"),
            "whitespace around members is not theirs"
        );
        for bad in [
            "",
            "novalue",
            "Upper=x",
            "k=a,b=c=d",
            "k=\u{1b}[2J",
            "k=a\u{7f}",
        ] {
            assert_eq!(tracestate(bad), None, "{bad:?}");
        }
    }
}
