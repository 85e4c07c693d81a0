//! The one seam where Rust errors become Python exceptions. Each exception subclasses the closest builtin, so
//! `except ConnectionError` / `except TimeoutError` / `except RuntimeError` in user code catch ours too.
//!
//! Runs on the calling Python thread (with the GIL).

use pyo3::exceptions::{PyConnectionError, PyRuntimeError, PyTimeoutError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::Value;

use bld_remote_core::client::ClientError;

use crate::convert::json_to_py;

pyo3::create_exception!(
    bld_remote,
    BlenderConnectionError,
    PyConnectionError,
    "Cannot reach the bld_remote service, or the connection broke before the reply was complete."
);
pyo3::create_exception!(
    bld_remote,
    OutcomeUnknown,
    BlenderConnectionError,
    "A pool item whose Blender died (or whose connection broke) while it ran: it may have run, in part or \
     whole, and it is not sent again unless ``retries > 0``. Attributes: ``item`` (its index), ``address``, \
     ``detail``, ``ran`` (None: nobody can tell)."
);
pyo3::create_exception!(
    bld_remote,
    BlenderTimeoutError,
    PyTimeoutError,
    "No reply in time. ``ran``: True if the request had started in Blender, False if it never ran, None: unknown."
);
pyo3::create_exception!(
    bld_remote,
    JobCancelled,
    pyo3::exceptions::PyException,
    "Raised by ``check_cancelled()`` in a job's code once a cancel was asked for (``cancel_job``)."
);
pyo3::create_exception!(
    bld_remote,
    JobTimedOut,
    pyo3::exceptions::PyException,
    "Raised by ``check_cancelled()`` in a job's code once it ran past its ``job_timeout_seconds``."
);
pyo3::create_exception!(
    bld_remote,
    RemoteError,
    PyRuntimeError,
    "The service answered with an error: the remote code raised, an unknown command, a bad parameter...\n\n\
     Attributes: ``message``, ``exception`` (the remote exception's type name or None), ``traceback`` (str or \
     None), ``output`` (``{'stdout', 'stderr'}`` printed before the failure, or None), ``reply`` (the whole \
     error reply as a dict)."
);

/// Convert a client error into the matching Python exception, with its details as attributes.
pub fn client_error(py: Python<'_>, e: ClientError) -> PyErr {
    let text = e.to_string();
    match e {
        ClientError::Connect { addr, source } => {
            let err = BlenderConnectionError::new_err(text);
            set(py, &err, "address", Some(addr.as_str()));
            set(
                py,
                &err,
                "reason",
                Some(format!("{:?}", source.kind()).as_str()),
            );
            err
        }
        ClientError::Lost { addr, .. }
        | ClientError::Protocol { addr, .. }
        | ClientError::Unverified { addr, .. } => {
            let err = BlenderConnectionError::new_err(text);
            set(py, &err, "address", Some(addr.as_str()));
            err
        }
        ClientError::Timeout { addr, ran, .. } => {
            let err = BlenderTimeoutError::new_err(text);
            set(py, &err, "address", Some(addr.as_str()));
            let _ = err.value(py).setattr("ran", ran);
            err
        }
        ClientError::Remote {
            message,
            exception,
            traceback,
            reply,
        } => {
            let err = RemoteError::new_err(message.clone());
            let v = err.value(py);
            let _ = v.setattr("message", message);
            let _ = v.setattr("exception", exception);
            let _ = v.setattr("traceback", traceback);
            let output = reply
                .get("output")
                .and_then(|o| json_to_py(py, o).ok())
                .map(Bound::unbind);
            let _ = v.setattr("output", output);
            let dict = json_to_py(py, &Value::Object(reply))
                .ok()
                .map_or_else(|| PyDict::new(py).into_any().unbind(), Bound::unbind);
            let _ = v.setattr("reply", dict);
            err
        }
        ClientError::Interrupted => pyo3::exceptions::PyKeyboardInterrupt::new_err(text),
    }
}

fn set(py: Python<'_>, err: &PyErr, name: &str, value: Option<&str>) {
    let _ = err.value(py).setattr(name, value);
}

/// Register the exception classes on the module.
pub fn add_to_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add(
        "BlenderConnectionError",
        py.get_type::<BlenderConnectionError>(),
    )?;
    m.add("BlenderTimeoutError", py.get_type::<BlenderTimeoutError>())?;
    m.add("OutcomeUnknown", py.get_type::<OutcomeUnknown>())?;
    m.add("RemoteError", py.get_type::<RemoteError>())?;
    m.add("JobCancelled", py.get_type::<JobCancelled>())?;
    m.add("JobTimedOut", py.get_type::<JobTimedOut>())?;
    Ok(())
}

/// The interrupt hook of a wait done with the GIL released (`Client` calls, `Pool.map`): it takes the GIL
/// for a moment to run Python's signal handlers, and keeps the exception one raised (Ctrl+C's
/// `KeyboardInterrupt`) for the caller to re-raise once the wait has ended.
#[derive(Default)]
pub struct PySignals {
    raised: parking_lot::Mutex<Option<PyErr>>,
}

impl PySignals {
    /// True when a signal handler raised: the wait should end.
    pub fn check(&self) -> bool {
        Python::attach(|py| match py.check_signals() {
            Ok(()) => false,
            Err(e) => {
                *self.raised.lock() = Some(e);
                true
            }
        })
    }

    /// The exception a handler raised, if any.
    pub fn take(&self) -> Option<PyErr> {
        self.raised.lock().take()
    }
}
