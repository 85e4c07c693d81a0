//! Cooperative cancellation for code run by `execute_code` and `submit_code_job`: `check_cancelled()`
//! (in the code's namespace, and `bld_remote._core.check_cancelled`) raises `JobCancelled` once a
//! cancel was asked for (`cancel_job`, or `cancel` of a framed request), and `JobTimedOut` once the job
//! ran past its `job_timeout_seconds`. Nothing can interrupt Python or a C-level Blender operation that
//! does not come back to a checkpoint: long code calls it between expensive steps.
//!
//! Runs on Blender's main thread (the running job); the cancel flag is set by a network thread.

use std::sync::Arc;

use bld_remote_core::jobs::JobState;
use parking_lot::Mutex;
use pyo3::prelude::*;

use crate::error::{JobCancelled, JobTimedOut};

/// The state of the job running now. A global, like the progress sink: only the main thread runs jobs.
static RUNNING: Mutex<Option<Arc<JobState>>> = Mutex::new(None);

/// Make `state` the running job's (a nested job saves and restores the outer one); returns the previous.
pub fn swap(state: Option<Arc<JobState>>) -> Option<Arc<JobState>> {
    std::mem::replace(&mut *RUNNING.lock(), state)
}

/// Raise `JobCancelled` if a cancel was asked for the job running now, `JobTimedOut` if it ran past its
/// `job_timeout_seconds`; else return. Outside a job it does nothing.
#[pyfunction]
pub fn check_cancelled() -> PyResult<()> {
    let Some(state) = RUNNING.lock().clone() else {
        return Ok(());
    };
    if state.cancel_requested() {
        return Err(JobCancelled::new_err("the job was cancelled"));
    }
    if state.over_budget() {
        return Err(JobTimedOut::new_err(
            "the job ran past its job_timeout_seconds",
        ));
    }
    Ok(())
}

/// Whether a cancel was asked for the job running now (no exception).
#[pyfunction]
pub fn cancel_requested() -> bool {
    RUNNING
        .lock()
        .as_ref()
        .is_some_and(|s| s.cancel_requested())
}
