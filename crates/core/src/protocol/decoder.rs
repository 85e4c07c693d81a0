//! The incremental decoder: splits a byte stream into complete top-level JSON objects, enforcing the size
//! and depth limits as bytes arrive. Runs on each connection's reader thread.
//!
//! Existing clients (see COMPAT.md) send one JSON object per request with no delimiter and no length prefix.
//! The decoder therefore finds object boundaries itself: it scans each byte once, remembering where it stopped
//! (string, escape and nesting state survive between reads), so an N-byte request costs O(N) however it is
//! split into reads. Only `"`, `\`, `{`, `}`, `[` and `]` matter to the scanner; all are ASCII and can never
//! be part of a multi-byte UTF-8 sequence, so a character split across reads needs no special care.

use serde_json::Value;

use super::{encode_reply, parse_request, Outcome, MAX_SUPPORTED_DEPTH};

/// Why the byte stream cannot be decoded any further. Each is answered with an error reply, then a close:
/// the stream cannot be resynchronised after any of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// A byte outside any object that is neither whitespace nor `{`.
    Garbage { byte: u8, offset: u64 },
    /// The stream starts like an HTTP request (a browser, curl, or a misconfigured client).
    Http,
    /// One request grew past the size limit.
    TooLarge { limit: usize },
    /// Nesting deeper than the limit.
    TooDeep { limit: usize },
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Garbage { byte, offset } => write!(
                f,
                "malformed request: expected a JSON object, found byte 0x{byte:02x} at stream offset {offset}; \
                 closing the connection"
            ),
            Self::Http => write!(f, "this port speaks JSON over TCP, not HTTP; closing the connection"),
            Self::TooLarge { limit } => {
                write!(f, "request too large: limit is {limit} bytes; closing the connection")
            }
            Self::TooDeep { limit } => {
                write!(f, "request nested too deeply: limit is {limit} levels; closing the connection")
            }
        }
    }
}

/// Incremental splitter of a byte stream into complete top-level JSON objects.
///
/// It owns the connection's read buffer: the socket is read straight into it ([`Decoder::read_from`]),
/// frames are lent out of it ([`Decoder::next_frame`]) and never copied, and it keeps its size between
/// requests, so a client sending large requests on one connection pays for growing it (fresh pages) once.
/// Its size is bounded by the request size limit plus two reads; it is freed with the connection.
#[derive(Debug)]
pub struct Decoder {
    /// The bytes received; `buf[..filled]` is data, the rest is room for the next read (kept
    /// initialised, so reads need no `unsafe` and room is zeroed once, when the buffer grows).
    buf: Vec<u8>,
    filled: usize,
    /// Bytes of `buf` already handed out or skipped; dropped before the next read (one move per read,
    /// so many requests arriving in one read cost O(n), not O(n * requests)).
    head: usize,
    /// Bytes of `buf` already scanned.
    scanned: usize,
    /// Offset in `buf` of the current object's `{`, if one has started.
    start: Option<usize>,
    depth: usize,
    /// Which opener is at each open level (bit set: `{`, clear: `[`), innermost in bit 0. Depth never
    /// exceeds `MAX_SUPPORTED_DEPTH` (127), so 128 bits hold every level.
    openers: u128,
    in_string: bool,
    escaped: bool,
    /// Bytes consumed before `buf[0]`, for error messages.
    consumed: u64,
    max_bytes: usize,
    max_depth: usize,
    failed: bool,
}

const HTTP_METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

impl Decoder {
    pub fn new(max_bytes: usize, max_depth: usize) -> Self {
        Self {
            buf: Vec::new(),
            filled: 0,
            head: 0,
            scanned: 0,
            start: None,
            depth: 0,
            openers: 0,
            in_string: false,
            escaped: false,
            consumed: 0,
            max_bytes: max_bytes.max(2),
            max_depth: max_depth.clamp(1, MAX_SUPPORTED_DEPTH),
            failed: false,
        }
    }

    /// A decoder that starts with `buf` as its read buffer (its contents are ignored): a buffer kept
    /// from an earlier connection, whose pages are already in memory.
    pub fn with_buffer(max_bytes: usize, max_depth: usize, buf: Vec<u8>) -> Self {
        Self {
            buf,
            ..Self::new(max_bytes, max_depth)
        }
    }

    /// The read buffer, for a later connection (see [`Decoder::with_buffer`]).
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }

    /// One `read` from `r` straight into the buffer (no intermediate copy), with room for at least
    /// `chunk` bytes. `Ok(0)` is the end of the stream.
    pub fn read_from(
        &mut self,
        r: &mut impl std::io::Read,
        chunk: usize,
    ) -> std::io::Result<usize> {
        let room = self.make_room(chunk);
        let n = r.read(room)?;
        self.filled += n;
        if self.failed {
            // Nothing after a stream error is ever decoded; keep nothing.
            self.filled = 0;
        }
        Ok(n)
    }

    /// Append bytes (as if read from the socket).
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed {
            return;
        }
        self.make_room(bytes.len())[..bytes.len()].copy_from_slice(bytes);
        self.filled += bytes.len();
    }

    /// Drop what was handed out, then make sure at least `want` bytes of room follow the data; return
    /// the room. The buffer doubles (amortised O(1) per byte) but stops doubling past the size limit:
    /// a request can never need more than the limit plus what one read brings.
    fn make_room(&mut self, want: usize) -> &mut [u8] {
        if self.head > 0 {
            self.buf.copy_within(self.head..self.filled, 0);
            self.filled -= self.head;
            self.scanned -= self.head;
            if let Some(s) = self.start.as_mut() {
                *s -= self.head;
            }
            self.consumed += self.head as u64;
            self.head = 0;
        }
        let need = self.filled + want;
        if self.buf.len() < need {
            let cap = self.max_bytes.saturating_add(2 * want);
            let doubled = (self.buf.len() * 2).min(cap);
            self.buf.resize(need.max(doubled), 0);
        }
        &mut self.buf[self.filled..]
    }

    /// Bytes held that do not yet form a complete object (0 when idle between requests).
    pub fn pending_bytes(&self) -> usize {
        self.filled
            - self
                .start
                .unwrap_or(self.head.max(self.scanned))
                .min(self.filled)
    }

    /// Bytes the buffer holds room for (what the connection keeps between requests).
    pub fn buffer_bytes(&self) -> usize {
        self.buf.len()
    }

    /// True when a request has begun but is not complete (a disconnect now is "mid-request").
    pub fn in_request(&self) -> bool {
        self.start.is_some()
    }

    /// The next complete object's bytes, lent out of the buffer (valid until the next read or call),
    /// `Ok(None)` when more input is needed, or the error that ends the stream.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, StreamError> {
        if self.failed {
            return Ok(None);
        }
        match self.scan() {
            Ok(Some(end)) => {
                let start = self.start.take().unwrap_or(0);
                self.depth = 0;
                self.openers = 0;
                self.head = end;
                self.scanned = end;
                Ok(Some(&self.buf[start..end]))
            }
            Ok(None) => {
                if let Some(start) = self.start {
                    if self.filled - start > self.max_bytes {
                        return Err(self.fail(StreamError::TooLarge {
                            limit: self.max_bytes,
                        }));
                    }
                } else {
                    // Nothing started: the whitespace scanned so far is dropped on the next feed.
                    self.head = self.scanned;
                    if self.head == self.filled {
                        self.consumed += self.head as u64;
                        self.filled = 0;
                        self.head = 0;
                        self.scanned = 0;
                    }
                }
                Ok(None)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    fn fail(&mut self, e: StreamError) -> StreamError {
        self.failed = true;
        self.buf = Vec::new();
        self.filled = 0;
        e
    }

    /// Scan forward; return the end offset (exclusive) of a complete object.
    fn scan(&mut self) -> Result<Option<usize>, StreamError> {
        let buf = &self.buf[..self.filled];
        let mut i = self.scanned;
        while i < buf.len() {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                    i += 1;
                    continue;
                }
                // Skip the string body in one SIMD search.
                match memchr::memchr2(b'"', b'\\', &buf[i..]) {
                    None => {
                        i = buf.len();
                        break;
                    }
                    Some(k) => {
                        i += k;
                        if buf[i] == b'\\' {
                            self.escaped = true;
                        } else {
                            self.in_string = false;
                        }
                        i += 1;
                        continue;
                    }
                }
            }
            let b = buf[i];
            if self.start.is_none() {
                match b {
                    b' ' | b'\t' | b'\r' | b'\n' => {}
                    b'{' => {
                        self.start = Some(i);
                        self.depth = 1;
                        self.openers = 1;
                    }
                    _ => {
                        let rest = &buf[i..];
                        if HTTP_METHODS
                            .iter()
                            .any(|m| rest.starts_with(m) || m.starts_with(rest))
                        {
                            if HTTP_METHODS.iter().any(|m| rest.starts_with(m)) {
                                return Err(StreamError::Http);
                            }
                            // A prefix of an HTTP method: wait for more bytes to decide.
                            self.scanned = i;
                            return Ok(None);
                        }
                        return Err(StreamError::Garbage {
                            byte: b,
                            offset: self.consumed + i as u64,
                        });
                    }
                }
                i += 1;
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.depth > self.max_depth {
                        return Err(StreamError::TooDeep {
                            limit: self.max_depth,
                        });
                    }
                    self.openers = (self.openers << 1) | u128::from(b == b'{');
                }
                b'}' | b']' => {
                    let matches = (self.openers & 1 == 1) == (b == b'}');
                    self.openers >>= 1;
                    self.depth = self.depth.saturating_sub(1);
                    // A closer of the wrong kind (`{"a":[1}`) ends the request here: it is answered
                    // as malformed JSON and the next request starts clean, instead of swallowing what
                    // follows until the counts happen to balance.
                    if self.depth == 0 || !matches {
                        self.depth = 0;
                        self.openers = 0;
                        self.scanned = i + 1;
                        return Ok(Some(i + 1));
                    }
                }
                _ => {}
            }
            i += 1;
            if let Some(start) = self.start {
                if i - start > self.max_bytes {
                    return Err(StreamError::TooLarge {
                        limit: self.max_bytes,
                    });
                }
            }
        }
        self.scanned = i;
        if let Some(start) = self.start {
            if i - start > self.max_bytes {
                return Err(StreamError::TooLarge {
                    limit: self.max_bytes,
                });
            }
        }
        Ok(None)
    }
}

/// The decoder's invariants, checked on arbitrary input: used by the `cargo fuzz` target
/// (fuzz/fuzz_targets/decoder.rs) and by a randomized `cargo test`. Panics when an invariant breaks;
/// never called on a client's path.
///
/// The first two bytes of `data` pick the read sizes; the rest is the byte stream. Checked: feeding the
/// stream whole and in pieces yields the same frames and the same final error (the decoder's state
/// survives read boundaries), whether fed (`feed`) or read (`read_from`, as connections do); every frame
/// is a balanced `{...}` within the size limit; the decoder holds no more than it was fed, and its buffer
/// stays within the size limit plus a few reads; after an error it yields nothing; parsing a frame and encoding a reply for it
/// never panic and give one line of valid JSON.
#[doc(hidden)]
pub fn fuzz_check_decoder(data: &[u8]) {
    const MAX_BYTES: usize = 4096;
    const MAX_DEPTH: usize = 16;
    let (sizes, stream) = match data {
        [a, b, rest @ ..] => ([usize::from(*a) % 64 + 1, usize::from(*b) % 7 + 1], rest),
        _ => ([1, 1], data),
    };
    let run = |pieces: &mut dyn Iterator<Item = &[u8]>, read: bool| {
        let mut d = Decoder::new(MAX_BYTES, MAX_DEPTH);
        let mut events: Vec<Result<Vec<u8>, StreamError>> = Vec::new();
        let mut fed = 0usize;
        let mut largest = 0usize;
        'outer: for piece in pieces {
            if read {
                let mut from = piece;
                let n = d.read_from(&mut from, piece.len());
                assert!(
                    n.is_ok_and(|n| n == piece.len()),
                    "read_from read less than offered"
                );
            } else {
                d.feed(piece);
            }
            fed += piece.len();
            largest = largest.max(piece.len());
            assert!(
                d.buffer_bytes() <= MAX_BYTES + 3 * largest + 64,
                "the buffer grew past the size limit plus a few reads"
            );
            loop {
                match d.next_frame() {
                    Ok(Some(frame)) => events.push(Ok(frame.to_vec())),
                    Ok(None) => break,
                    Err(e) => {
                        events.push(Err(e));
                        break 'outer;
                    }
                }
            }
            assert!(
                d.pending_bytes() <= fed,
                "decoder holds more than it was fed"
            );
        }
        if events.last().is_some_and(Result::is_err) {
            d.feed(b"{\"type\":\"ping\"}");
            assert_eq!(
                d.next_frame(),
                Ok(None),
                "decoder yielded after a stream error"
            );
        }
        events
    };
    // Fed in one piece; then read in pieces.
    let whole = run(&mut std::iter::once(stream), false);
    // Alternate two read sizes, so boundaries fall everywhere.
    let mut at = 0usize;
    let mut turn = 0usize;
    let mut pieces = std::iter::from_fn(|| {
        if at >= stream.len() {
            return None;
        }
        let n = sizes[turn % 2].min(stream.len() - at);
        turn += 1;
        at += n;
        Some(&stream[at - n..at])
    });
    let split = run(&mut pieces, true);
    // A stream error can be found at a different point when the input stops mid-way, but the frames
    // before it and the error kind must agree.
    assert_eq!(
        whole, split,
        "reads of different sizes gave different results"
    );
    for event in &whole {
        let Ok(frame) = event else { continue };
        assert!(frame.len() <= MAX_BYTES, "frame over the size limit");
        assert_eq!(frame.first(), Some(&b'{'));
        assert!(matches!(frame.last(), Some(b'}' | b']')));
        let outcome = match parse_request(frame) {
            Ok(req) => {
                assert!(!req.command.is_empty() || !req.legacy);
                (req.id, Outcome::Success(Value::Object(req.params)))
            }
            Err(bad) => (bad.id, Outcome::error(bad.message)),
        };
        let reply = encode_reply(outcome.0.as_ref(), &outcome.1);
        assert_eq!(reply.last(), Some(&b'\n'));
        assert_eq!(
            memchr::memchr_iter(b'\n', &reply).count(),
            1,
            "a reply must be one line"
        );
        // serde_json refuses nesting of 128 and more; params may be 16 deep here.
        assert!(
            serde_json::from_slice::<Value>(&reply).is_ok_and(|v| v.is_object()),
            "reply is not a JSON object"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::{DEFAULT_MAX_DEPTH, DEFAULT_MAX_REQUEST_BYTES};
    use super::*;
    use serde_json::json;

    fn decoder() -> Decoder {
        Decoder::new(DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_DEPTH)
    }

    fn frames(d: &mut Decoder) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(Some(f)) = d.next_frame() {
            out.push(String::from_utf8(f.to_vec()).unwrap_or_default());
        }
        out
    }

    /// The next frame, copied (frames are lent out of the decoder's buffer).
    fn next(d: &mut Decoder) -> Result<Option<Vec<u8>>, StreamError> {
        d.next_frame().map(|f| f.map(<[u8]>::to_vec))
    }

    #[test]
    fn splits_concatenated_objects_with_and_without_whitespace() {
        let mut d = decoder();
        d.feed(
            br#"{"type":"a"}{"type":"b"} {"type":"c"}
{"type":"d"}"#,
        );
        assert_eq!(
            frames(&mut d),
            vec![
                r#"{"type":"a"}"#,
                r#"{"type":"b"}"#,
                r#"{"type":"c"}"#,
                r#"{"type":"d"}"#
            ]
        );
        assert_eq!(d.pending_bytes(), 0);
    }

    #[test]
    fn braces_inside_strings_and_escaped_quotes_do_not_end_an_object() {
        let mut d = decoder();
        d.feed(br#"{"code":"print('}{\"\\')","x":[1,{"y":"]"}]}"#);
        let f = frames(&mut d);
        assert_eq!(f.len(), 1);
        let v: Value = serde_json::from_str(&f[0]).unwrap_or(Value::Null);
        assert_eq!(v["code"], json!("print('}{\"\\')"));
    }

    #[test]
    fn object_split_at_every_byte_boundary() {
        let text =
            r#"{"type":"execute_code","params":{"code":"print(\"h\u00e9llo\\n}\")","id":7}}"#;
        let bytes = text.as_bytes();
        for cut in 0..bytes.len() {
            let mut d = decoder();
            d.feed(&bytes[..cut]);
            assert!(frames(&mut d).is_empty(), "premature frame at cut {cut}");
            d.feed(&bytes[cut..]);
            assert_eq!(frames(&mut d), vec![text.to_string()], "cut {cut}");
        }
    }

    #[test]
    fn utf8_character_split_across_reads() {
        let text = "{\"type\":\"execute_code\",\"params\":{\"code\":\"print('\u{1F600} é 中')\"}}";
        let bytes = text.as_bytes();
        let emoji = text.find('\u{1F600}').unwrap_or(0);
        let mut d = decoder();
        d.feed(&bytes[..emoji + 2]); // inside the 4-byte emoji
        assert!(frames(&mut d).is_empty());
        d.feed(&bytes[emoji + 2..]);
        let f = frames(&mut d);
        assert_eq!(f, vec![text.to_string()]);
        let req = parse_request(f[0].as_bytes()).unwrap();
        assert_eq!(req.params["code"], json!("print('\u{1F600} é 中')"));
    }

    #[test]
    fn byte_at_a_time_feeding_is_linear_and_correct() {
        let body = "x".repeat(10_000);
        let text = format!(r#"{{"type":"execute_code","params":{{"code":"{body}"}}}}"#);
        let mut d = decoder();
        let mut got = Vec::new();
        for b in text.as_bytes() {
            d.feed(std::slice::from_ref(b));
            got.extend(frames(&mut d));
        }
        assert_eq!(got, vec![text]);
    }

    #[test]
    fn garbage_between_objects_is_a_stream_error() {
        let mut d = decoder();
        d.feed(b"{\"type\":\"ping\"} xyz");
        assert_eq!(next(&mut d), Ok(Some(b"{\"type\":\"ping\"}".to_vec())));
        assert!(matches!(
            next(&mut d),
            Err(StreamError::Garbage {
                byte: b'x',
                offset: 16
            })
        ));
        // After a stream error the decoder yields nothing more.
        d.feed(b"{\"type\":\"ping\"}");
        assert_eq!(next(&mut d), Ok(None));
    }

    #[test]
    fn large_frames_are_lent_with_what_follows_them_kept() {
        let big = format!(
            r#"{{"type":"put","params":{{"data":"{}"}}}}"#,
            "x".repeat(200_000)
        );
        // Preceded by a small request, followed by a newline, a whole request and half of another,
        // then garbage: every frame comes out whole and the garbage's offset counts every byte.
        let mut d = decoder();
        d.feed(b" {\"type\":\"a\"}");
        d.feed(big.as_bytes());
        d.feed(b"\n{\"type\":\"b\"}{\"type\":");
        assert_eq!(
            frames(&mut d),
            vec![
                r#"{"type":"a"}"#.to_string(),
                big.clone(),
                r#"{"type":"b"}"#.to_string()
            ]
        );
        d.feed(b"\"c\"} x");
        assert_eq!(next(&mut d), Ok(Some(br#"{"type":"c"}"#.to_vec())));
        let offset = 1 + 12 + big.len() as u64 + 1 + 12 + 12 + 1;
        assert_eq!(
            next(&mut d),
            Err(StreamError::Garbage { byte: b'x', offset })
        );
        // The same stream in one read.
        let mut d = decoder();
        d.feed(format!(" {{\"type\":\"a\"}}{big}\n{{\"type\":\"b\"}}").as_bytes());
        assert_eq!(
            frames(&mut d),
            vec![
                r#"{"type":"a"}"#.to_string(),
                big,
                r#"{"type":"b"}"#.to_string()
            ]
        );
    }

    #[test]
    fn the_read_buffer_is_kept_between_requests_and_bounded() {
        let big = format!(
            r#"{{"type":"put","params":{{"data":"{}"}}}}"#,
            "x".repeat(3000)
        );
        let mut d = Decoder::new(4096, DEFAULT_MAX_DEPTH);
        let mut stream = big.as_bytes();
        while !stream.is_empty() {
            assert!(d.read_from(&mut stream, 256).is_ok_and(|n| n > 0));
        }
        assert_eq!(next(&mut d), Ok(Some(big.clone().into_bytes())));
        let kept = d.buffer_bytes();
        assert!(kept >= big.len(), "the buffer was given away");
        // The next request of the same size reuses it; one over the limit does not grow it unbounded.
        d.feed(big.as_bytes());
        assert_eq!(next(&mut d), Ok(Some(big.clone().into_bytes())));
        assert_eq!(d.buffer_bytes(), kept);
        d.feed(b"{\"a\":\"");
        let mut end = Ok(None);
        for _ in 0..40 {
            d.feed(&[b'y'; 200]);
            assert!(d.buffer_bytes() <= kept.max(4096 + 3 * 256));
            end = next(&mut d);
            if end.is_err() {
                break;
            }
        }
        assert_eq!(end, Err(StreamError::TooLarge { limit: 4096 }));
    }

    #[test]
    fn binary_garbage_and_top_level_arrays_are_errors() {
        for input in [&b"\x00\xff\xfe"[..], b"[1,2]", b"\"str\"", b"42"] {
            let mut d = decoder();
            d.feed(input);
            assert!(
                matches!(next(&mut d), Err(StreamError::Garbage { .. })),
                "{input:?}"
            );
        }
    }

    #[test]
    fn http_request_is_recognised_even_when_split() {
        let mut d = decoder();
        d.feed(b"GE");
        assert_eq!(next(&mut d), Ok(None));
        d.feed(b"T / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(next(&mut d), Err(StreamError::Http));
        let mut d = decoder();
        d.feed(b"POST /mcp HTTP/1.1\r\n");
        assert_eq!(next(&mut d), Err(StreamError::Http));
    }

    #[test]
    fn size_limit_is_enforced_before_the_object_ends() {
        let mut d = Decoder::new(100, DEFAULT_MAX_DEPTH);
        d.feed(b"{\"code\":\"");
        d.feed(&[b'a'; 200]);
        assert_eq!(next(&mut d), Err(StreamError::TooLarge { limit: 100 }));
        let mut d = Decoder::new(100, DEFAULT_MAX_DEPTH);
        d.feed(&[b'{'; 1]);
        d.feed(&[b' '; 150]);
        assert_eq!(next(&mut d), Err(StreamError::TooLarge { limit: 100 }));
    }

    #[test]
    fn depth_limit() {
        let mut d = Decoder::new(1000, 4);
        d.feed(b"{\"a\":[[[1]]]}");
        assert!(next(&mut d).is_ok_and(|f| f.is_some()));
        d.feed(b"{\"a\":[[[[1]]]]}");
        assert_eq!(next(&mut d), Err(StreamError::TooDeep { limit: 4 }));
    }

    #[test]
    fn every_depth_the_decoder_accepts_parses() {
        for depth in [DEFAULT_MAX_DEPTH, MAX_SUPPORTED_DEPTH] {
            let inner = depth - 1;
            let text = format!(
                r#"{{"type":"x","params":{{"a":{}1{}}}}}"#,
                "[".repeat(inner - 1),
                "]".repeat(inner - 1)
            );
            let mut d = Decoder::new(DEFAULT_MAX_REQUEST_BYTES, depth);
            d.feed(text.as_bytes());
            let frame = next(&mut d);
            assert!(matches!(frame, Ok(Some(_))), "depth {depth}: {frame:?}");
            let parsed = parse_request(text.as_bytes());
            assert!(parsed.is_ok(), "depth {depth}: {parsed:?}");
            let mut d = Decoder::new(DEFAULT_MAX_REQUEST_BYTES, depth);
            d.feed(format!(r#"{{"a":{}1{}}}"#, "[".repeat(depth), "]".repeat(depth)).as_bytes());
            assert_eq!(next(&mut d), Err(StreamError::TooDeep { limit: depth }));
        }
        // Asking for more than serde_json can parse is capped.
        let mut d = Decoder::new(DEFAULT_MAX_REQUEST_BYTES, 10_000);
        d.feed(format!(r#"{{"a":{}1{}}}"#, "[".repeat(200), "]".repeat(200)).as_bytes());
        assert_eq!(
            next(&mut d),
            Err(StreamError::TooDeep {
                limit: MAX_SUPPORTED_DEPTH
            })
        );
    }

    #[test]
    fn a_mismatched_closer_ends_the_request_and_the_next_one_parses() {
        let mut d = decoder();
        d.feed(br#"{"a":[1}{"type":"ping"}{"b":{"c":2]]}"#);
        let mut got = Vec::new();
        let err = loop {
            match next(&mut d) {
                Ok(Some(f)) => got.push(String::from_utf8(f).unwrap_or_default()),
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        assert_eq!(
            got,
            vec![r#"{"a":[1}"#, r#"{"type":"ping"}"#, r#"{"b":{"c":2]"#]
        );
        assert!(parse_request(got[0].as_bytes()).is_err());
        assert!(parse_request(got[1].as_bytes()).is_ok());
        // What follows a mismatch outside any object is garbage: error, then close.
        assert!(matches!(err, Some(StreamError::Garbage { byte: b']', .. })));
    }

    #[test]
    fn idle_whitespace_is_not_retained() {
        let mut d = decoder();
        d.feed(&[b'\n'; 4096]);
        assert_eq!(next(&mut d), Ok(None));
        assert_eq!(d.pending_bytes(), 0);
        assert!(!d.in_request());
    }

    /// A libFuzzer-free stand-in for the fuzz target (fuzz/): random and mutated requests through the
    /// same invariant checker, so plain `cargo test` exercises it everywhere.
    #[test]
    fn randomized_streams_keep_the_decoder_invariants() {
        let seeds: [&[u8]; 8] = [
            br#"{"type":"ping","id":1}"#,
            br#"{"type":"execute_code","params":{"code":"print('}{\"')"},"id":"x","timeout":2}"#,
            br#"{"code":"print(1)","message":"m"}"#,
            b"{\"a\":[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]}",
            b"GET / HTTP/1.1\r\n\r\n",
            "{\"type\":\"x\",\"params\":{\"s\":\"\u{1F600}\u{e9}\\u00e9\"}}".as_bytes(),
            b" \n\t{\"type\":\"get_status\",\"token\":\"t\"}\n{}",
            b"{\"type\":\"\xff\"}",
        ];
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let iterations = std::env::var("BLD_REMOTE_FUZZ_ITERATIONS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20_000u64);
        for _ in 0..iterations {
            let mut data = vec![(next() & 0xff) as u8, (next() & 0xff) as u8];
            for _ in 0..=(next() % 4) {
                let seed = seeds[(next() % seeds.len() as u64) as usize];
                data.extend_from_slice(seed);
            }
            for _ in 0..(next() % 6) {
                let i = (next() % data.len() as u64) as usize;
                match next() % 4 {
                    0 => data[i] = (next() & 0xff) as u8,
                    1 => data.insert(i, b"{}[]\"\\ "[(next() % 7) as usize]),
                    2 => {
                        data.remove(i);
                    }
                    _ => data.truncate(i.max(2)),
                }
                if data.len() < 2 {
                    data.extend_from_slice(b"{}");
                }
            }
            fuzz_check_decoder(&data);
        }
        // Plain random bytes too.
        for _ in 0..2_000 {
            let data: Vec<u8> = (0..(next() % 300)).map(|_| (next() & 0xff) as u8).collect();
            fuzz_check_decoder(&data);
        }
    }
}
