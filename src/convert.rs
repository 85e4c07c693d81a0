//! JSON <-> Python: the request's params into Python objects for a handler, and whatever a handler (or
//! `Client.call`'s caller) hands back into JSON. `py_to_json` is total: anything it does not know becomes
//! its `str()`, so a reply can always be sent; `py_to_json_reported` also lists (a [`Report`]) every place
//! where the JSON is not exactly the Python value, so that the reply can say so.
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

/// Most problems a [`Report`] lists one by one; the rest are counted.
const MAX_LISTED: usize = 16;

/// What a conversion lost or could not do, each with the JSON Pointer (RFC 6901) of the place.
/// `warnings`: converted, but not exactly (NaN became null, a huge int became a string, two keys became
/// one); `errors`: a part could not be converted at all (it became null). Both are said in the reply,
/// never dropped silently (see `pump::handler_result` and docs/PROTOCOL.md, "Converting results").
#[derive(Debug, Default)]
pub struct Report {
    pub warnings: Vec<String>,
    pub errors: Vec<String>,
    more_warnings: usize,
    more_errors: usize,
}

impl Report {
    fn warn(&mut self, path: &Path<'_>, what: &str) {
        if self.warnings.len() < MAX_LISTED {
            self.warnings.push(format!("{}: {what}", path.pointer()));
        } else {
            self.more_warnings += 1;
        }
    }

    fn error(&mut self, path: &Path<'_>, what: &str) {
        if self.errors.len() < MAX_LISTED {
            self.errors.push(format!("{}: {what}", path.pointer()));
        } else {
            self.more_errors += 1;
        }
    }

    /// The warnings, with a last line counting those not listed.
    pub fn warnings(&self) -> Vec<String> {
        with_more(&self.warnings, self.more_warnings)
    }

    /// The errors, with a last line counting those not listed.
    pub fn errors(&self) -> Vec<String> {
        with_more(&self.errors, self.more_errors)
    }
}

fn with_more(listed: &[String], more: usize) -> Vec<String> {
    let mut v = listed.to_vec();
    if more > 0 {
        v.push(format!("... and {more} more"));
    }
    v
}

/// Where in the value a conversion is: built on the stack as it descends, rendered only for a report.
enum Path<'a> {
    Root,
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl Path<'_> {
    fn pointer(&self) -> String {
        match self {
            Path::Root => String::new(),
            Path::Key(parent, k) => {
                format!(
                    "{}/{}",
                    parent.pointer(),
                    k.replace('~', "~0").replace('/', "~1")
                )
            }
            Path::Index(parent, i) => format!("{}/{i}", parent.pointer()),
        }
    }
}

/// Python → JSON, total: anything it does not know becomes its `str()`, so a reply can always be sent.
/// Lossy parts are not reported; [`py_to_json_reported`] reports them.
pub fn py_to_json(obj: &Bound<'_, PyAny>, depth: usize) -> Value {
    let mut report = Report::default();
    convert(obj, depth, &Path::Root, &mut report)
}

/// Python → JSON, reporting every place where data was changed or lost (see [`Report`]).
pub fn py_to_json_reported(obj: &Bound<'_, PyAny>, report: &mut Report) -> Value {
    convert(obj, 0, &Path::Root, report)
}

/// The conversion, deliberate for each type (docs/PROTOCOL.md, "Converting results"):
/// None → null; bool; int → a number when it fits i64 or u64, else its decimal digits as a string
/// (warned); float (and its subclasses, e.g. numpy.float64) → a number, NaN and ±inf → null (warned); str;
/// bytes → base64 (standard alphabet, padded); dict → object, keys: a str as is, anything else its
/// `str()` (1 → "1", True → "True", None → "None"), two keys that become the same string keep the
/// later value (warned); list, tuple → array; set, frozenset → array in iteration order; an
/// `OutputCapture` → its text, moved out; anything else → its `str()`. Deeper than 200 levels → the
/// `repr` of the rest (warned). A `str()` or iteration that raises is an error at that place (null).
#[allow(clippy::too_many_lines)] // one arm per Python type
fn convert(obj: &Bound<'_, PyAny>, depth: usize, path: &Path<'_>, report: &mut Report) -> Value {
    if depth > MAX_CONVERT_DEPTH {
        report.warn(
            path,
            &format!("nested deeper than {MAX_CONVERT_DEPTH} levels: the rest became its repr"),
        );
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
        report.warn(
            path,
            "an int beyond 64 bits became a string of its decimal digits",
        );
        return match obj.str() {
            Ok(s) => Value::String(s.to_string_lossy().into_owned()),
            Err(_) => Value::String(repr(obj)),
        };
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        let v = f.value();
        if let Some(n) = Number::from_f64(v) {
            return Value::Number(n);
        }
        report.warn(path, &format!("{v} is not a JSON number: it became null"));
        return Value::Null;
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Value::String(s.to_string_lossy().into_owned());
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut m = Map::new();
        for (k, v) in d.iter() {
            let key = match k.cast::<PyString>() {
                Ok(s) => s.to_string_lossy().into_owned(),
                Err(_) => match k.str() {
                    Ok(s) => s.to_string_lossy().into_owned(),
                    Err(e) => {
                        report.error(
                            path,
                            &format!(
                                "str() of the key {} raised {e}: the entry was left out",
                                repr(&k)
                            ),
                        );
                        continue;
                    }
                },
            };
            let value = convert(&v, depth + 1, &Path::Key(path, &key), report);
            if m.contains_key(&key) {
                report.warn(
                    &Path::Key(path, &key),
                    &format!(
                        "two keys became {key:?} (the later, {}, was kept)",
                        repr(&k)
                    ),
                );
            }
            m.insert(key, value);
        }
        return Value::Object(m);
    }
    if let Ok(l) = obj.cast::<PyList>() {
        return Value::Array(
            l.iter()
                .enumerate()
                .map(|(i, v)| convert(&v, depth + 1, &Path::Index(path, i), report))
                .collect(),
        );
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return Value::Array(
            t.iter()
                .enumerate()
                .map(|(i, v)| convert(&v, depth + 1, &Path::Index(path, i), report))
                .collect(),
        );
    }
    if obj.cast::<PySet>().is_ok() || obj.cast::<PyFrozenSet>().is_ok() {
        let mut items = Vec::new();
        match obj.try_iter() {
            Ok(it) => {
                for (i, v) in it.enumerate() {
                    match v {
                        Ok(v) => items.push(convert(&v, depth + 1, &Path::Index(path, i), report)),
                        Err(e) => {
                            report.error(path, &format!("iterating the set raised {e}"));
                            break;
                        }
                    }
                }
            }
            Err(e) => report.error(path, &format!("iterating the set raised {e}")),
        }
        return Value::Array(items);
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Value::String(base64::engine::general_purpose::STANDARD.encode(b.as_bytes()));
    }
    match obj.str() {
        Ok(s) => Value::String(s.to_string_lossy().into_owned()),
        Err(e) => {
            report.error(
                path,
                &format!(
                    "a {} could not be converted: str() raised {e}",
                    obj.get_type()
                        .name()
                        .map_or_else(|_| "?".into(), |n| n.to_string())
                ),
            );
            Value::Null
        }
    }
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

/// A Python argument taken as it is, so that its number can be checked together with its name
/// ([`whole_arg`], [`seconds_arg`]): `PyO3`'s own conversions raise `OverflowError`/`TypeError` messages that
/// name neither the argument nor its range. `Default`: the caller left it out.
pub enum Arg<'py> {
    Default,
    Given(Bound<'py, PyAny>),
}

impl<'py> FromPyObject<'_, 'py> for Arg<'py> {
    type Error = PyErr;

    fn extract(obj: pyo3::Borrowed<'_, 'py, PyAny>) -> PyResult<Self> {
        Ok(Self::Given(obj.to_owned()))
    }
}

fn type_and_repr(v: &Bound<'_, PyAny>) -> String {
    let type_name = v
        .get_type()
        .name()
        .map_or_else(|_| "?".into(), |n| n.to_string());
    format!("{type_name} {}", repr(v))
}

/// `v` as a whole number for the argument `name`: any `int` (negative, or past `u64`: the caller's range
/// check then names the range; past `i128` it saturates, still out of every range). A bool, a float, a
/// string... raise `TypeError` naming the argument.
pub fn whole_arg(name: &str, v: &Bound<'_, PyAny>) -> PyResult<i128> {
    if v.cast::<PyBool>().is_ok() || v.cast::<PyInt>().is_err() {
        return Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "{name} must be a whole number (int), got {}",
            type_and_repr(v)
        )));
    }
    if let Ok(n) = v.extract::<i128>() {
        return Ok(n);
    }
    Ok(if v.lt(0i32).unwrap_or(false) {
        i128::MIN
    } else {
        i128::MAX
    })
}

/// `v` as seconds for the argument `name`: an `int` or a `float` (NaN and infinities pass through, for
/// the caller's range check to refuse by name); an int too large for a float is infinity. A bool, a string...
/// raise `TypeError` naming the argument.
pub fn seconds_arg(name: &str, v: &Bound<'_, PyAny>) -> PyResult<f64> {
    if v.cast::<PyBool>().is_err() {
        if let Ok(f) = v.cast::<PyFloat>() {
            return Ok(f.value());
        }
        if v.cast::<PyInt>().is_ok() {
            return Ok(v
                .extract::<f64>()
                .unwrap_or(if v.lt(0i32).unwrap_or(false) {
                    f64::NEG_INFINITY
                } else {
                    f64::INFINITY
                }));
        }
    }
    Err(pyo3::exceptions::PyTypeError::new_err(format!(
        "{name} must be a number of seconds, got {}",
        type_and_repr(v)
    )))
}
