//! The wire protocol: the limits, the `Outcome` of a request, and re-exports of its three parts —
//! `decoder` (splits a stream of bare JSON objects into frames), `request` (a frame → a `Request`) and
//! `encoder` (an outcome → reply bytes, `Reply` pieces for large output). Pure Rust; runs on the service's
//! connection threads (and in clients, for the encoder). See docs/PROTOCOL.md.

mod decoder;
mod encoder;
mod request;

use serde_json::{Map, Value};

pub use decoder::{fuzz_check_decoder, Decoder, StreamError};
pub use encoder::{
    begin_success_reply, encode_reply, encode_value, json_string_contents, needs_escape,
    write_field, write_json, write_str, Piece, Reply,
};
pub use request::{parse_request, BadRequest, Request};

/// Default cap on one request's size (bytes from its opening `{` to its closing `}`).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;
/// Default cap on JSON nesting depth (objects plus arrays, the request object itself counting as 1).
pub const DEFAULT_MAX_DEPTH: usize = 100;
/// The deepest nesting that can be configured: `serde_json` refuses 128 levels and more with its own,
/// less helpful "recursion limit exceeded", so the decoder stops below that with a clear message.
pub const MAX_SUPPORTED_DEPTH: usize = 127;
/// The outcome of one request, before it is shaped for the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success(Value),
    /// `message` plus extra fields merged into the error reply (traceback, output, exception, ran...).
    Error {
        message: String,
        extra: Map<String, Value>,
    },
}

impl Outcome {
    pub fn error(message: impl Into<String>) -> Self {
        Self::Error {
            message: message.into(),
            extra: Map::new(),
        }
    }

    pub fn error_with(message: impl Into<String>, extra: Map<String, Value>) -> Self {
        Self::Error {
            message: message.into(),
            extra,
        }
    }
}
