//! JSON <-> Python: the request's params into Python objects for a handler, and whatever a handler (or
//! `Client.call`'s caller) hands back into JSON. `py_to_json` is total: anything it does not know becomes
//! its `str()`, so a reply can always be sent.
//!
//! Runs on the thread holding the GIL: Blender's main thread for jobs, the calling Python thread for the
//! Client binding.

use base64::Engine as _;
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyBytes, PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PySet, PyString, PyTuple,
};
use serde_json::{Map, Number, Value};

use crate::capture::OutputCapture;

/// Deepest Python structure converted to JSON; deeper parts become their `repr`.
const MAX_CONVERT_DEPTH: usize = 200;

/// JSON → Python (dict, list, str, int, float, bool, None).
pub fn json_to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(json_to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(m) => {
            let d = PyDict::new(py);
            for (k, item) in m {
                d.set_item(k, json_to_py(py, item)?)?;
            }
            d.into_any()
        }
    })
}

/// Python → JSON, total: anything it does not know becomes its `str()`, so a reply can always be sent.
pub fn py_to_json(obj: &Bound<'_, PyAny>, depth: usize) -> Value {
    if depth > MAX_CONVERT_DEPTH {
        return Value::String(repr(obj));
    }
    if obj.is_none() {
        return Value::Null;
    }
    if let Ok(capture) = obj.cast::<OutputCapture>() {
        // execute_code's stdout/stderr: the captured text moves into the reply, uncopied.
        return match capture.try_borrow_mut() {
            Ok(mut c) => Value::String(c.take()),
            Err(_) => Value::String(repr(obj)),
        };
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Value::Bool(b.is_true());
    }
    if obj.cast::<PyInt>().is_ok() {
        if let Ok(i) = obj.extract::<i64>() {
            return Value::from(i);
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Value::from(u);
        }
        return Value::String(repr(obj));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        return Number::from_f64(f.value()).map_or(Value::Null, Value::Number);
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Value::String(s.to_string_lossy().into_owned());
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut m = Map::new();
        for (k, v) in d.iter() {
            let key = match k.cast::<PyString>() {
                Ok(s) => s.to_string_lossy().into_owned(),
                Err(_) => k
                    .str()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            };
            m.insert(key, py_to_json(&v, depth + 1));
        }
        return Value::Object(m);
    }
    if let Ok(l) = obj.cast::<PyList>() {
        return Value::Array(l.iter().map(|v| py_to_json(&v, depth + 1)).collect());
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return Value::Array(t.iter().map(|v| py_to_json(&v, depth + 1)).collect());
    }
    if obj.cast::<PySet>().is_ok() || obj.cast::<PyFrozenSet>().is_ok() {
        if let Ok(it) = obj.try_iter() {
            return Value::Array(
                it.filter_map(Result::ok)
                    .map(|v| py_to_json(&v, depth + 1))
                    .collect(),
            );
        }
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Value::String(base64::engine::general_purpose::STANDARD.encode(b.as_bytes()));
    }
    Value::String(
        obj.str()
            .map_or_else(|_| repr(obj), |s| s.to_string_lossy().into_owned()),
    )
}

fn repr(obj: &Bound<'_, PyAny>) -> String {
    obj.repr().map_or_else(
        |_| "<unrepresentable>".into(),
        |s| s.to_string_lossy().into_owned(),
    )
}

/// A Python dict (keyword arguments, `info`) as a JSON object; anything else as an empty one.
pub fn dict_to_map(d: Option<&Bound<'_, PyDict>>) -> Map<String, Value> {
    match d.map(|d| py_to_json(d.as_any(), 0)) {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    }
}
