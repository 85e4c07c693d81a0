//! The reply encoder: outcomes serialised as one JSON line, byte for byte what `serde_json` writes but with
//! a faster string escaper, and `Reply` pieces for replies that carry one large string twice. Runs on
//! connection threads (the writer) and in clients.

use serde_json::Value;

use super::Outcome;

/// Serialise a reply as one JSON object plus `\n`, ready for a single write. The outcome is serialised in
/// place, never cloned: a result can be tens of megabytes.
pub fn encode_reply(id: Option<&Value>, outcome: &Outcome) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    match outcome {
        Outcome::Success(result) => {
            begin_success_reply(&mut out, id);
            write_json(&mut out, result);
        }
        Outcome::Error { message, extra } => {
            out.push(b'{');
            if let Some(id) = id {
                out.extend_from_slice(b"\"id\":");
                write_json(&mut out, id);
                out.push(b',');
            }
            out.extend_from_slice(b"\"status\":\"error\",\"message\":");
            write_str(&mut out, message);
            for (k, v) in extra {
                if k != "status" && k != "message" && k != "id" {
                    write_field(&mut out, k, v);
                }
            }
        }
    }
    out.extend_from_slice(b"}\n");
    out
}

/// Start a success reply: `{"id":...,"status":"success","result":` (the caller writes the result, then
/// `}\n`). For replies shaped straight into bytes (see `server::reply::execute_code_reply`).
pub fn begin_success_reply(out: &mut Vec<u8>, id: Option<&Value>) {
    out.push(b'{');
    if let Some(id) = id {
        out.extend_from_slice(b"\"id\":");
        write_json(out, id);
        out.push(b',');
    }
    out.extend_from_slice(b"\"status\":\"success\",\"result\":");
}

/// Append `,"key":value`.
pub fn write_field(out: &mut Vec<u8>, key: &str, value: &Value) {
    out.push(b',');
    write_str(out, key);
    out.push(b':');
    write_json(out, value);
}

/// Append `value` as JSON, byte for byte what `serde_json::to_writer` writes (same key order, same
/// escapes), with a faster string escaper: replies carry megabytes of captured output.
pub fn write_json(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json(out, item);
            }
            out.push(b']');
        }
        Value::Object(m) => {
            out.push(b'{');
            for (i, (k, v)) in m.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, k);
                out.push(b':');
                write_json(out, v);
            }
            out.push(b'}');
        }
    }
}

/// True when any of the 8 bytes in `w` must be escaped in a JSON string: `"`, `\\` or a control byte
/// (< 0x20). Exact (the classic "has a zero / has a byte less than n" word tricks), so runs of plain
/// text are skipped 8 bytes at a time.
#[inline]
fn word_needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let control = w.wrapping_sub(0x20 * ONES) & !w;
    let q = w ^ (u64::from(b'"') * ONES);
    let quote = q.wrapping_sub(ONES) & !q;
    let b = w ^ (u64::from(b'\\') * ONES);
    let backslash = b.wrapping_sub(ONES) & !b;
    (control | quote | backslash) & HIGH != 0
}

/// Append `s` as a JSON string (quotes included), escaping exactly as `serde_json` does.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    write_str_contents(out, s);
    out.push(b'"');
}

/// True when `s` holds a byte that a JSON string must escape (`"`, `\`, a control byte).
pub fn needs_escape(s: &str) -> bool {
    let mut words = s.as_bytes().chunks_exact(8);
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        if word_needs_escape(u64::from_le_bytes(w)) {
            return true;
        }
    }
    words
        .remainder()
        .iter()
        .any(|&b| b == b'"' || b == b'\\' || b < 0x20)
}

/// The contents of `s` as a JSON string, without the quotes: `s`'s own buffer when nothing needs
/// escaping (no copy: megabytes of plain output go out as they are), else an escaped copy.
pub fn json_string_contents(s: String) -> Vec<u8> {
    if needs_escape(&s) {
        let mut out = Vec::with_capacity(s.len() + s.len() / 16 + 16);
        write_str_contents(&mut out, &s);
        out
    } else {
        s.into_bytes()
    }
}

/// Append `s` escaped as the inside of a JSON string (no quotes). Callers reserve room for it.
fn write_str_contents(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    let mut run = 0; // start of the bytes not yet copied
    let mut i = 0;
    while i < bytes.len() {
        if let Some(word) = bytes.get(i..i + 8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            if !word_needs_escape(u64::from_le_bytes(w)) {
                i += 8;
                continue;
            }
        }
        let byte = bytes[i];
        let short = match byte {
            b'"' => Some(b'"'),
            b'\\' => Some(b'\\'),
            b'\n' => Some(b'n'),
            b'\r' => Some(b'r'),
            b'\t' => Some(b't'),
            0x08 => Some(b'b'),
            0x0c => Some(b'f'),
            0..=0x1f => None,
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(&bytes[run..i]);
        match short {
            Some(c) => out.extend_from_slice(&[b'\\', c]),
            None => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xf)],
            ]),
        }
        i += 1;
        run = i;
    }
    out.extend_from_slice(&bytes[run..]);
}

/// A reply ready to be written: usually one buffer. A reply that carries one large string more than
/// once (`execute_code`'s output is both `result` and `output.stdout`, COMPAT.md) holds its escaped
/// contents once, in `body`, and is written as pieces with one vectored write: the string is neither
/// copied nor escaped twice, and a reply of plain text needs no buffer of its own at all.
#[derive(Debug)]
pub enum Reply {
    /// The common case: the whole reply in one buffer.
    One(Vec<u8>),
    /// Pieces, some of which are the shared `body`.
    Pieces { body: Vec<u8>, pieces: Vec<Piece> },
}

/// A part of [`Reply::Pieces`].
#[derive(Debug)]
pub enum Piece {
    Bytes(Vec<u8>),
    Body,
}

impl From<Vec<u8>> for Reply {
    fn from(bytes: Vec<u8>) -> Self {
        Self::One(bytes)
    }
}

impl Reply {
    /// A reply built of pieces around `body` (see [`Reply::push`], [`Reply::push_body`]).
    pub fn with_body(body: Vec<u8>) -> Self {
        Self::Pieces {
            body,
            pieces: Vec::new(),
        }
    }

    fn push_piece(&mut self, piece: Piece) {
        match self {
            Self::Pieces { pieces, .. } => pieces.push(piece),
            Self::One(first) => {
                let first = Piece::Bytes(std::mem::take(first));
                *self = Self::Pieces {
                    body: Vec::new(),
                    pieces: vec![first, piece],
                };
            }
        }
    }

    /// Append bytes of its own.
    pub fn push(&mut self, bytes: Vec<u8>) {
        self.push_piece(Piece::Bytes(bytes));
    }

    /// Append the shared body.
    pub fn push_body(&mut self) {
        self.push_piece(Piece::Body);
    }

    /// The pieces in order, for a vectored write.
    pub fn slices(&self) -> Vec<&[u8]> {
        match self {
            Self::One(bytes) => vec![bytes.as_slice()],
            Self::Pieces { body, pieces } => pieces
                .iter()
                .map(|p| match p {
                    Piece::Bytes(b) => b.as_slice(),
                    Piece::Body => body.as_slice(),
                })
                .collect(),
        }
    }

    /// The whole reply in one buffer (tests, and callers that need contiguous bytes).
    pub fn to_vec(&self) -> Vec<u8> {
        match self {
            Self::One(bytes) => bytes.clone(),
            Self::Pieces { .. } => self.slices().concat(),
        }
    }
}

/// Serialise any JSON value plus `\n`.
pub fn encode_value(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).unwrap_or_else(|e| {
        // Unreachable for a `Value` (its keys are strings), but never panic on a network thread.
        format!("{{\"status\":\"error\",\"message\":\"cannot encode reply: {e}\"}}").into_bytes()
    });
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map};

    #[test]
    fn writer_matches_serde_json_byte_for_byte() {
        let mut texts: Vec<String> = (0u8..0x80).map(|b| char::from(b).to_string()).collect();
        texts.push("h\u{e9}llo \u{1F600} \u{2028} \u{7f}".into());
        for pad in 0..17 {
            for special in ["\"", "\\", "\n", "\u{1}", "\u{1f}", " ", "\u{e9}"] {
                texts.push(format!(
                    "{}{special}{}",
                    "a".repeat(pad),
                    "b".repeat(17 - pad)
                ));
            }
        }
        for t in &texts {
            let want = serde_json::to_vec(t).unwrap_or_default();
            let mut out = Vec::new();
            write_str(&mut out, t);
            assert_eq!(out, want, "{t:?}");
            // The quote-less form used for large replies, and whether it had to escape at all.
            let inner = json_string_contents(t.clone());
            assert_eq!(inner, want[1..want.len() - 1], "{t:?}");
            assert_eq!(needs_escape(t), want.len() != t.len() + 2, "{t:?}");
        }
        let v = json!({"a": [1, -2, 3.5, 1e300, null, true, false, {"k\n": "v\"", "": []}], "z": {}, "m": u64::MAX});
        let mut out = Vec::new();
        write_json(&mut out, &v);
        assert_eq!(out, serde_json::to_vec(&v).unwrap_or_default());
    }

    #[test]
    fn a_reply_in_pieces_repeats_its_body_without_copying_it() {
        let text = "plain text, nothing to escape".to_string();
        let addr = text.as_ptr();
        let body = json_string_contents(text);
        assert_eq!(
            body.as_ptr(),
            addr,
            "plain text must be sent from its own buffer"
        );
        let mut r = Reply::with_body(body);
        r.push(b"[\"".to_vec());
        r.push_body();
        r.push(b"\",\"".to_vec());
        r.push_body();
        r.push(b"\"]".to_vec());
        let slices = r.slices();
        assert_eq!(slices.len(), 5);
        assert_eq!(slices[1].as_ptr(), slices[3].as_ptr());
        let v: Value = serde_json::from_slice(&r.to_vec()).unwrap_or(Value::Null);
        assert_eq!(
            v,
            json!([
                "plain text, nothing to escape",
                "plain text, nothing to escape"
            ])
        );
        let mut one = Reply::from(b"abc".to_vec());
        assert_eq!(one.to_vec(), b"abc");
        one.push(b"def".to_vec());
        assert_eq!(one.to_vec(), b"abcdef");
    }

    #[test]
    fn replies_are_one_line_with_id_echoed() {
        let r = encode_reply(Some(&json!(9)), &Outcome::Success(json!({"a": "x\ny"})));
        assert_eq!(r.last(), Some(&b'\n'));
        assert_eq!(memchr::memchr_iter(b'\n', &r).count(), 1);
        let v: Value = serde_json::from_slice(&r).unwrap_or(Value::Null);
        assert_eq!(
            v,
            json!({"id": 9, "status": "success", "result": {"a": "x\ny"}})
        );

        let mut extra = Map::new();
        extra.insert("traceback".into(), json!("tb"));
        extra.insert("status".into(), json!("ignored"));
        let v: Value =
            serde_json::from_slice(&encode_reply(None, &Outcome::error_with("boom", extra)))
                .unwrap_or(Value::Null);
        assert_eq!(
            v,
            json!({"status": "error", "message": "boom", "traceback": "tb"})
        );
    }
}
