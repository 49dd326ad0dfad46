//! Scans of JSON text kept as sent (the `data` of a publication is stored
//! and fanned out as its text, so that numbers pass byte for byte): which
//! bytes are outside strings, numbers in range, nesting depth, and the
//! text compacted.

use serde_json::value::RawValue;

/// Tells the bytes of JSON text that are outside strings (structure,
/// numbers, literals, whitespace) from those inside (quotes included),
/// one byte at a time: the one state machine the scans below share.
#[derive(Default)]
pub(crate) struct OutsideStrings {
    in_string: bool,
    escaped: bool,
}

impl OutsideStrings {
    /// Whether `b`, the next byte, is outside every string.
    pub(crate) fn outside(&mut self, b: u8) -> bool {
        if self.in_string {
            match (self.escaped, b) {
                (true, _) => self.escaped = false,
                (false, b'\\') => self.escaped = true,
                (false, b'"') => self.in_string = false,
                _ => {}
            }
            return false;
        }
        if b == b'"' {
            self.in_string = true;
            return false;
        }
        true
    }
}

/// Whether every number in the JSON text `json` is within the range of a
/// 64-bit float (its digits are kept as sent; a float is what most JSON
/// parsers read, and `1e400` is infinite to them, an error to serde_json).
/// Only numbers that could be out of range are parsed: long ones, or ones
/// with an exponent.
pub(crate) fn numbers_in_range(json: &str) -> bool {
    let bytes = json.as_bytes();
    let is_number = |b: u8| matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E');
    let mut strings = OutsideStrings::default();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if strings.outside(b) && (b == b'-' || b.is_ascii_digit()) {
            // A number's bytes are outside strings and change no state.
            let start = i;
            while i < bytes.len() && is_number(bytes[i]) {
                i += 1;
            }
            let token = &json[start..i];
            if (token.len() > 15 || token.bytes().any(|c| c == b'e' || c == b'E'))
                && !token.parse::<f64>().is_ok_and(f64::is_finite)
            {
                return false;
            }
            continue;
        }
        i += 1;
    }
    true
}

/// How deeply `json` nests arrays and objects (strings skipped); for text
/// that is not JSON, a bound all the same.
pub(crate) fn json_depth(json: &[u8]) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut strings = OutsideStrings::default();
    for &b in json {
        if !strings.outside(b) {
            continue;
        }
        match b {
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

fn is_json_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Valid JSON without the whitespace between its tokens (strings and
/// numbers kept byte for byte). In valid JSON such whitespace always
/// borders a structural character, so removing it changes nothing.
pub(crate) fn compact_json(raw: &RawValue) -> Box<RawValue> {
    let text = raw.get();
    if !text.bytes().any(is_json_space) {
        return raw.to_owned();
    }
    let mut strings = OutsideStrings::default();
    let out: Vec<u8> = text
        .bytes()
        .filter(|&b| !(strings.outside(b) && is_json_space(b)))
        .collect();
    String::from_utf8(out)
        .ok()
        .and_then(|s| RawValue::from_string(s).ok())
        .unwrap_or_else(|| raw.to_owned())
}
