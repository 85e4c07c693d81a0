//! `bld_remote._core.OutputCapture`: the `sys.stdout`/`sys.stderr` of client code run by `execute_code`.
//!
//! A text file that appends to a Rust `String`. `io.StringIO` cost three copies of the output on
//! Blender's main thread (the write into its buffer, `getvalue()`, the conversion to the reply), each a
//! fresh block from Blender's allocator: 64 MB of output took ~45 ms per copy. Here the text is copied
//! once, into a `String` that grows by doubling, and the reply takes that buffer as it is: converting an
//! `OutputCapture` to JSON (`convert::py_to_json`) moves its text out.
//!
//! It behaves as `io.StringIO` does for writing (`write` takes `str` only and returns the number of
//! characters; `writelines`, `flush`, `getvalue`, `isatty`, `fileno` raising `io.UnsupportedOperation`)
//! and is registered as an `io.TextIOBase` (`bld_remote/commands.py`). Differences, on purpose: `encoding`
//! is `"utf-8"` (what the reply is), and `close()` keeps the text, which is still sent.
//!
//! Runs on Blender's main thread: client code writes to it inside a job, holding the GIL.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyString;

#[pyclass(module = "bld_remote._core")]
#[derive(Default)]
pub struct OutputCapture {
    text: String,
    closed: bool,
}

impl OutputCapture {
    /// The captured text, leaving the capture empty.
    pub fn take(&mut self) -> String {
        std::mem::take(&mut self.text)
    }

    fn check_open(&self) -> PyResult<()> {
        if self.closed {
            Err(PyValueError::new_err("I/O operation on closed file."))
        } else {
            Ok(())
        }
    }
}

// Python methods take `self` whether they use it or not.
#[allow(clippy::unused_self)]
#[pymethods]
impl OutputCapture {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// Append `s` (a `str`); returns its length in characters.
    fn write(&mut self, s: &Bound<'_, PyAny>) -> PyResult<usize> {
        self.check_open()?;
        let s = s.cast::<PyString>().map_err(|_| {
            let kind = s
                .get_type()
                .name()
                .map_or_else(|_| "?".to_string(), |n| n.to_string());
            PyTypeError::new_err(format!("string argument expected, got '{kind}'"))
        })?;
        match s.to_str() {
            Ok(text) => self.text.push_str(text),
            // Lone surrogates cannot be UTF-8 (nor JSON): replaced, as the reply would have them.
            Err(_) => self.text.push_str(&s.to_string_lossy()),
        }
        s.len()
    }

    fn writelines(&mut self, lines: &Bound<'_, PyAny>) -> PyResult<()> {
        self.check_open()?;
        for line in lines.try_iter()? {
            self.write(&line?)?;
        }
        Ok(())
    }

    fn flush(&self) -> PyResult<()> {
        self.check_open()
    }

    /// The text captured so far.
    fn getvalue(&self) -> PyResult<String> {
        self.check_open()?;
        Ok(self.text.clone())
    }

    fn isatty(&self) -> PyResult<bool> {
        self.check_open()?;
        Ok(false)
    }

    fn readable(&self) -> bool {
        false
    }

    fn writable(&self) -> bool {
        true
    }

    fn seekable(&self) -> bool {
        false
    }

    fn fileno(&self, py: Python<'_>) -> PyResult<usize> {
        let unsupported = py.import("io")?.getattr("UnsupportedOperation")?;
        Err(PyErr::from_value(unsupported.call1(("fileno",))?))
    }

    /// Further writes raise `ValueError`; the text captured so far is kept (it is still sent).
    fn close(&mut self) {
        self.closed = true;
    }

    #[getter]
    fn closed(&self) -> bool {
        self.closed
    }

    #[getter]
    fn encoding(&self) -> &'static str {
        "utf-8"
    }

    #[getter]
    fn errors(&self) -> &'static str {
        "strict"
    }

    #[getter]
    fn newlines(&self) -> Option<&'static str> {
        None
    }

    #[getter]
    fn line_buffering(&self) -> bool {
        false
    }

    fn __repr__(&self) -> String {
        format!("<bld_remote captured output: {} bytes>", self.text.len())
    }
}
