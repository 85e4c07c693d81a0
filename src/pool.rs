//! The pool binding: `bld_remote._core.PoolClient`, the native half of `bld_remote.Pool`. It holds the
//! members (host, port, token, owned) and runs `bld_remote_core::pool::map` over them; process ownership
//! (launching the `bld-remote start --instances` supervisor) stays in `bld_remote/pool.py`.
//!
//! Runs on the calling Python thread: `map` releases the GIL for the whole map (its worker threads never
//! take it) and takes it back only to poll Python's signal handlers every 100 ms (Ctrl+C works).

use std::time::Duration;

use parking_lot::Mutex;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyList;

use bld_remote_core::instances;
use bld_remote_core::pool::{self, ItemError, MapError, MapOptions, Member};

use crate::convert::json_to_py;
use crate::error::{client_error, BlenderConnectionError, OutcomeUnknown};

/// The instances of a pool and the map over them. Use ``bld_remote.Pool``.
#[pyclass(module = "bld_remote", name = "PoolClient")]
pub struct PoolClient {
    members: Mutex<Vec<Member>>,
    /// Held for a whole map: a second map from another thread waits, so each instance keeps one item in
    /// flight. Taken with the GIL released (its holder takes the GIL to poll signals).
    mapping: Mutex<()>,
}

fn seconds(what: &str, s: Option<f64>) -> PyResult<Option<Duration>> {
    s.map(|s| bld_remote_core::config::positive_seconds(what, s))
        .transpose()
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

fn set<'py>(err: &PyErr, py: Python<'py>, name: &str, value: impl IntoPyObject<'py>) {
    let _ = err.value(py).setattr(name, value);
}

/// One item's error as the Python exception it is, with ``item`` (its index) set.
fn item_error(py: Python<'_>, index: usize, e: ItemError) -> PyErr {
    let text = e.to_string();
    let err = match e {
        ItemError::Failed(e) => client_error(py, e),
        ItemError::OutcomeUnknown { addr, detail } => {
            let err = OutcomeUnknown::new_err(text);
            set(&err, py, "address", addr);
            set(&err, py, "detail", detail);
            let _ = err.value(py).setattr("ran", py.None());
            err
        }
        ItemError::NoInstance { .. } => {
            let err = BlenderConnectionError::new_err(text);
            set(&err, py, "ran", false);
            err
        }
        ItemError::Interrupted => pyo3::exceptions::PyKeyboardInterrupt::new_err(text),
    };
    set(&err, py, "item", index);
    err
}

#[pymethods]
impl PoolClient {
    /// ``instances``: ``[(host, port), ...]`` to use, or None for every live instance on this machine (its
    /// descriptors; none → ``BlenderConnectionError``). ``token``: for all of them (default:
    /// ``$BLD_REMOTE_TOKEN``, else each one's descriptor). ``owned``: their supervisor restarts them on the
    /// same port, so a map waits for a dead one instead of dropping it. ``pids``: their process ids, when
    /// known (shown by ``instances`` until a map asks them).
    #[new]
    #[pyo3(signature = (instances=None, *, host=None, token=None, owned=false, pids=None))]
    fn new(
        py: Python<'_>,
        instances: Option<Vec<(String, u16)>>,
        host: Option<String>,
        token: Option<String>,
        owned: bool,
        pids: Option<Vec<u32>>,
    ) -> PyResult<Self> {
        let members = if let Some(list) = instances {
            {
                if list.is_empty() {
                    return Err(PyValueError::new_err(
                        "instances is empty: give (host, port) pairs, or None for every running instance",
                    ));
                }
                let pids = pids.unwrap_or_default();
                list.into_iter()
                    .enumerate()
                    .map(|(i, (h, p))| {
                        let mut m = Member::new(h, p, token.clone(), owned);
                        m.pid = pids.get(i).copied().unwrap_or(0);
                        m
                    })
                    .collect()
            }
        } else {
            {
                let (alive, _) = py.detach(|| instances::live(true));
                let found: Vec<Member> = alive
                    .into_iter()
                    .filter(|d| host.as_deref().is_none_or(|h| h == d.host))
                    .map(|d| {
                        let mut m = Member::new(d.host, d.port, token.clone(), owned);
                        m.pid = d.pid;
                        m
                    })
                    .collect();
                if found.is_empty() {
                    return Err(BlenderConnectionError::new_err(format!(
                        "no running bld_remote instance found to pool (descriptors in {}); start some with \
                         `bld-remote start --background --instances N`, or use Pool.start(n)",
                        instances::runtime_dir().display()
                    )));
                }
                found
            }
        };
        Ok(Self {
            members: Mutex::new(members),
            mapping: Mutex::new(()),
        })
    }

    /// ``[{"host", "port", "pid"}, ...]``: the members now (pid 0: not seen yet).
    #[getter]
    fn instances<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for m in self.members.lock().iter() {
            let d = pyo3::types::PyDict::new(py);
            d.set_item("host", &m.host)?;
            d.set_item("port", m.port)?;
            d.set_item("pid", m.pid)?;
            list.append(d)?;
        }
        Ok(list)
    }

    /// Run ``code`` once per item (each a JSON text; ``item`` is bound to it, parsed). Returns one entry per
    /// item, in order: ``(True, result)`` or ``(False, exception)``. Members that died and were dropped
    /// (attached, or owned and not back within ``restart_wait``) leave the pool. One map at a time: a map
    /// from another thread waits for this one.
    #[pyo3(signature = (code, items, *, timeout=None, retries=0, restart_wait=120.0))]
    fn map<'py>(
        &self,
        py: Python<'py>,
        code: &str,
        items: Vec<String>,
        timeout: Option<f64>,
        retries: i64,
        restart_wait: f64,
    ) -> PyResult<Bound<'py, PyList>> {
        let timeout = seconds("timeout", timeout)?;
        let restart_wait = seconds("restart_wait", Some(restart_wait))?.unwrap_or_default();
        let retries = u32::try_from(retries)
            .ok()
            .filter(|r| *r <= pool::MAX_RETRIES)
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "retries must be an integer from 0 to {}, got {retries}",
                    pool::MAX_RETRIES
                ))
            })?;
        for (i, text) in items.iter().enumerate() {
            if let Err(e) = serde_json::from_str::<serde_json::Value>(text) {
                return Err(PyValueError::new_err(format!(
                    "items[{i}] is not JSON text: {e}"
                )));
            }
        }
        let opts = MapOptions {
            timeout,
            retries,
            restart_wait,
            events: false,
        };
        let signals = crate::error::PySignals::default();
        let interrupted = || signals.check();
        let report = py.detach(|| {
            let _one_map_at_a_time = self.mapping.lock();
            let members = self.members.lock().clone();
            pool::map(&members, code, &items, &opts, &interrupted, &mut |_| {})
        });
        let report = match report {
            Ok(r) => r,
            Err(MapError::Interrupted) => {
                return Err(signals.take().unwrap_or_else(|| {
                    pyo3::exceptions::PyKeyboardInterrupt::new_err("interrupted")
                }))
            }
            // Nothing ran: no instance answers, or one refused us (its token).
            Err(e @ (MapError::NoInstances(_) | MapError::Refused { .. })) => {
                let err = BlenderConnectionError::new_err(e.to_string());
                set(&err, py, "ran", false);
                return Err(err);
            }
        };
        {
            let mut kept = self.members.lock();
            for (i, pid) in report.pids.iter().enumerate() {
                if let Some(m) = kept.get_mut(i) {
                    if *pid != 0 {
                        m.pid = *pid;
                    }
                }
            }
            let gone: Vec<usize> = report.dropped.iter().map(|(i, _)| *i).collect();
            let mut index = 0;
            kept.retain(|_| {
                let keep = !gone.contains(&index);
                index += 1;
                keep
            });
        }
        if report.interrupted {
            if let Some(e) = signals.take() {
                return Err(e);
            }
        }
        let out = PyList::empty(py);
        for (i, outcome) in report.outcomes.into_iter().enumerate() {
            let entry = match outcome {
                Ok(v) => (
                    true,
                    match v {
                        Some(v) => json_to_py(py, &v)?.unbind(),
                        None => py.None(),
                    },
                ),
                Err(e) => (false, item_error(py, i, e).into_value(py).into_any()),
            };
            out.append(entry)?;
        }
        Ok(out)
    }

    fn __len__(&self) -> usize {
        self.members.lock().len()
    }

    fn __repr__(&self) -> String {
        let list: Vec<String> = self.members.lock().iter().map(Member::addr_text).collect();
        format!("PoolClient([{}])", list.join(", "))
    }
}
