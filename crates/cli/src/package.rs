//! Where the installed `bld_remote` Python package is: `bld-remote start` and `install` load it into
//! Blender straight from there. The command ships in its own wheel, so it asks, in order:
//! `$BLD_REMOTE_PACKAGE_DIR`; the Python next to this executable (a venv's `bin/`); `python3` on PATH.
//! Asked on the main thread, only by `start` and `install` (see docs/PACKAGING.md).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Finds the spec without importing the package (no native module is loaded to answer).
const ASK: &str = "import importlib.util as u; s = u.find_spec('bld_remote'); \
                   print(s.submodule_search_locations[0] if s and s.submodule_search_locations else '')";

fn is_package(dir: &Path) -> bool {
    dir.join("__init__.py").is_file()
}

fn ask(python: &Path) -> Option<PathBuf> {
    let out = Command::new(python)
        .args(["-P", "-c", ASK])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && is_package(&dir)).then_some(dir)
}

pub fn find() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("BLD_REMOTE_PACKAGE_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if is_package(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "BLD_REMOTE_PACKAGE_DIR={} holds no bld_remote package (no __init__.py)",
                dir.display()
            ))
        };
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    let mut tried = Vec::new();
    for name in ["python3", "python"] {
        if let Some(python) = beside
            .as_ref()
            .map(|b| b.join(name))
            .filter(|p| p.is_file())
        {
            if let Some(dir) = ask(&python) {
                return Ok(dir);
            }
            tried.push(python.display().to_string());
        }
    }
    if let Some(dir) = ask(Path::new("python3")) {
        return Ok(dir);
    }
    tried.push("python3 (PATH)".into());
    Err(format!(
        "the bld_remote Python package is not installed where this command can find it (asked {}): \
         `pip install bld-remote` into the same environment, or set BLD_REMOTE_PACKAGE_DIR",
        tried.join(", ")
    ))
}
