//! Finding a Blender executable, the environment to give it, the startup expression that loads `bld_remote`
//! from the installed package, and running short Blender jobs (asking it for its user folders, enabling the
//! add-on), and tying a launched Blender's life to its supervisor's. Used by `start` and `install` on the
//! main thread.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// Environment variables never passed to Blender. Debian's Blender honours `VIRTUAL_ENV` (it adds that venv's
/// site-packages, `.pth` files included) and the `PYTHON*` ones: they would mix the host Python's packages into
/// Blender's. The two `BLD_REMOTE_MCP_*` ones would make an installed, enabled add-on start a second service
/// on register, racing the one `bld-remote start` asks for.
pub const STRIPPED_ENV: [&str; 7] = [
    "VIRTUAL_ENV",
    "VIRTUAL_ENV_PROMPT",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "BLD_REMOTE_MCP_START_NOW",
    "BLD_REMOTE_MCP_PORT",
];

/// Overrides the built-in list of install locations searched after `--blender`, `$BLENDER` and `PATH`
/// (`os.pathsep`-separated files or folders; empty: search none).
pub const LOCATIONS_ENV: &str = "BLD_REMOTE_BLENDER_LOCATIONS";

/// Where Blender was found.
#[derive(Debug, Clone)]
pub struct Found {
    pub path: PathBuf,
}

/// Blender could not be found: everything that was tried, for the error message.
#[derive(Debug, Clone)]
pub struct NotFound {
    pub tried: Vec<String>,
    pub explicit: Option<String>,
}

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(e) = &self.explicit {
            return f.write_str(e);
        }
        writeln!(f, "Blender not found. Tried:")?;
        for t in &self.tried {
            writeln!(f, "  - {t}")?;
        }
        write!(
            f,
            "Pass --blender /path/to/blender, or set $BLENDER, or put `blender` on PATH."
        )
    }
}

fn exe_name() -> &'static str {
    if cfg!(windows) {
        "blender.exe"
    } else {
        "blender"
    }
}

fn is_executable(p: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(p) else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    true
}

/// A file, or a folder that holds Blender (an unpacked release, or `Blender.app`).
fn resolve_candidate(p: &Path) -> Option<PathBuf> {
    if is_executable(p) {
        return Some(p.to_path_buf());
    }
    if p.is_dir() {
        for inner in [
            p.join(exe_name()),
            p.join("Contents").join("MacOS").join("Blender"),
            p.join("Blender.app")
                .join("Contents")
                .join("MacOS")
                .join("Blender"),
        ] {
            if is_executable(&inner) {
                return Some(inner);
            }
        }
    }
    None
}

/// Children of `dir` whose names start with `prefix`, newest version first (by name, numbers compared as
/// numbers, so "blender-4.10" sorts above "blender-4.9").
fn versioned_children(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name().to_str().is_some_and(|n| {
                n.to_ascii_lowercase()
                    .starts_with(&prefix.to_ascii_lowercase())
            })
        })
        .map(|e| e.path())
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(version_key(p)));
    found
}

fn version_key(p: &Path) -> Vec<u64> {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The usual install locations for this platform, in the order they are searched.
fn default_locations() -> Vec<PathBuf> {
    if let Some(list) = std::env::var_os(LOCATIONS_ENV) {
        return std::env::split_paths(&list)
            .filter(|p| !p.as_os_str().is_empty())
            .collect();
    }
    let home = std::env::var_os("HOME")
        .or_else(|| std::env::var_os("USERPROFILE"))
        .map(PathBuf::from);
    let mut out = Vec::new();
    if cfg!(target_os = "macos") {
        out.push(PathBuf::from("/Applications/Blender.app"));
        out.extend(versioned_children(Path::new("/Applications"), "Blender"));
        if let Some(h) = &home {
            out.push(h.join("Applications/Blender.app"));
            out.extend(versioned_children(&h.join("Applications"), "Blender"));
        }
        out.push(PathBuf::from("/opt/homebrew/bin/blender"));
        out.push(PathBuf::from("/usr/local/bin/blender"));
    } else if cfg!(windows) {
        for var in ["ProgramFiles", "ProgramW6432", "ProgramFiles(x86)"] {
            if let Some(pf) = std::env::var_os(var).map(PathBuf::from) {
                out.extend(versioned_children(
                    &pf.join("Blender Foundation"),
                    "Blender",
                ));
                out.push(
                    pf.join("Steam")
                        .join("steamapps")
                        .join("common")
                        .join("Blender"),
                );
            }
        }
        if let Some(local) = std::env::var_os("LOCALAPPDATA").map(PathBuf::from) {
            out.extend(versioned_children(&local.join("Programs"), "Blender"));
        }
    } else {
        out.push(PathBuf::from("/usr/bin/blender"));
        out.push(PathBuf::from("/usr/local/bin/blender"));
        out.push(PathBuf::from("/snap/bin/blender"));
        out.push(PathBuf::from(
            "/var/lib/flatpak/exports/bin/org.blender.Blender",
        ));
        if let Some(h) = &home {
            out.push(h.join(".local/share/flatpak/exports/bin/org.blender.Blender"));
            out.push(h.join(".local/bin/blender"));
            out.extend(versioned_children(&h.join("Applications"), "blender"));
            out.extend(versioned_children(h, "blender-"));
            out.push(h.join(".steam/steam/steamapps/common/Blender/blender"));
        }
        out.extend(versioned_children(Path::new("/opt"), "blender"));
    }
    out
}

/// Find Blender: `explicit` (`--blender`), then `$BLENDER`, then `PATH`, then the usual install locations.
/// An explicit choice that is not a Blender is an error, never silently skipped.
pub fn find(explicit: Option<&Path>) -> Result<Found, NotFound> {
    if let Some(p) = explicit {
        return resolve_candidate(p)
            .map(|path| Found { path })
            .ok_or_else(|| NotFound {
                tried: vec![p.display().to_string()],
                explicit: Some(format!(
                    "--blender {}: not an executable file (nor a folder holding one)",
                    p.display()
                )),
            });
    }
    if let Some(env) = std::env::var_os("BLENDER").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(&env);
        // A bare name ("blender-4.2") is looked up on PATH.
        let resolved = resolve_candidate(&p).or_else(|| {
            if p.components().count() == 1 {
                search_path(&env)
            } else {
                None
            }
        });
        return resolved.map(|path| Found { path }).ok_or_else(|| NotFound {
            tried: vec![format!("$BLENDER={}", p.display())],
            explicit: Some(format!(
                "$BLENDER is {}, which is not an executable file (nor a folder holding one)",
                p.display()
            )),
        });
    }
    let mut tried = vec![
        "--blender (not given)".to_string(),
        "$BLENDER (not set)".to_string(),
    ];
    if let Some(path) = search_path(&OsString::from(exe_name())) {
        return Ok(Found { path });
    }
    tried.push(format!("`{}` on PATH", exe_name()));
    for loc in default_locations() {
        if let Some(path) = resolve_candidate(&loc) {
            return Ok(Found { path });
        }
        tried.push(loc.display().to_string());
    }
    if std::env::var_os(LOCATIONS_ENV).is_some() {
        tried.push(format!("(install locations taken from ${LOCATIONS_ENV})"));
    }
    Err(NotFound {
        tried,
        explicit: None,
    })
}

fn search_path(name: &std::ffi::OsStr) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

/// A `Command` for Blender with a clean environment (see [`STRIPPED_ENV`]).
pub fn command(blender: &Path) -> Command {
    let mut cmd = Command::new(blender);
    for k in STRIPPED_ENV {
        cmd.env_remove(k);
    }
    if let Some(path) = path_without_venvs() {
        cmd.env("PATH", path);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Linux: Blender gets SIGTERM (a graceful stop: the service's signal handler) when the thread that
/// spawned it ends, so a supervisor killed outright (SIGKILL) leaves no Blender behind. Spawn from a thread
/// that lives as long as the supervisor (its main thread). Elsewhere: nothing.
#[allow(unsafe_code)]
pub fn stop_with_spawner(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the hook runs in the forked child before exec, and calls only prctl(2), which is
        // async-signal-safe and touches no memory shared with the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// `PATH` without virtual-environment `bin` folders. Blender's embedded Python looks `sys.executable` up on
/// `PATH`; a `pyvenv.cfg` beside the `python3` it finds switches that venv on, and its site-packages
/// (another `bld_remote` among them) would shadow Blender's own. `None`: nothing to remove.
fn path_without_venvs() -> Option<std::ffi::OsString> {
    let path = std::env::var_os("PATH")?;
    let dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    let kept: Vec<&PathBuf> = dirs
        .iter()
        .filter(|d| {
            !d.parent()
                .is_some_and(|venv| venv.join("pyvenv.cfg").is_file())
        })
        .collect();
    if kept.len() == dirs.len() {
        return None;
    }
    std::env::join_paths(kept).ok()
}

/// A Python string literal for `s` (JSON string syntax is valid Python).
pub fn py_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "''".into())
}

/// Exit status Blender gets from the startup expression when the service cannot start.
pub const START_FAILED_RC: i32 = 75;

/// The `--python-expr` that `bld-remote start` gives Blender: load `bld_remote` from the installed package
/// folder (only that folder: the host's other site-packages stay out of Blender), start the service, and in
/// background mode serve on the main thread until it stops.
pub fn bootstrap_expr(package_dir: &Path, host: &str, port: u16) -> String {
    let dir = py_str(&package_dir.to_string_lossy());
    let host = py_str(host);
    format!(
        r#"import importlib.util as _u, os as _o, sys as _s
import bpy as _b
_d = {dir}
try:
    # An add-on copy imported earlier (enabled in the user's preferences) must not shadow the package.
    _old = _s.modules.get("bld_remote")
    if _old is not None and _o.path.dirname(getattr(_old, "__file__", "") or "") != _d:
        for _k in [k for k in _s.modules if k == "bld_remote" or k.startswith("bld_remote.")]:
            del _s.modules[_k]
    _spec = _u.spec_from_file_location("bld_remote", _o.path.join(_d, "__init__.py"), submodule_search_locations=[_d])
    _m = _u.module_from_spec(_spec)
    _s.modules["bld_remote"] = _m
    _spec.loader.exec_module(_m)
    _m.start_mcp_service(port={port}, host={host})
except Exception as _e:
    print("bld-remote: the service could not start in Blender: %s: %s" % (type(_e).__name__, _e), file=_s.stderr, flush=True)
    _s.stdout.flush()
    _o._exit({START_FAILED_RC})
# The GUI never returns to this script: start_mcp_service() registered the stop (which removes the
# instance descriptor) for when Blender exits.
if _b.app.background:
    _m.keep_alive()
"#
    )
}

/// What Blender says about itself and its user folders.
#[derive(Debug, Clone)]
pub struct Facts {
    pub version: (u64, u64, u64),
    pub version_string: String,
    /// `bpy.utils.user_resource('SCRIPTS')`: honours `BLENDER_USER_SCRIPTS`.
    pub user_scripts: PathBuf,
    pub user_config: PathBuf,
}

const MARK: &str = "BLD_REMOTE_JSON ";

/// Run a short Python job in `blender -b` and return the JSON it printed after [`MARK`].
pub fn run_job(blender: &Path, factory: bool, code: &str) -> Result<Value, String> {
    let mut cmd = command(blender);
    cmd.arg("-b");
    if factory {
        cmd.arg("--factory-startup");
    }
    cmd.args(["--python-exit-code", "3", "--python-expr", code]);
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", blender.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines() {
        if let Some(json) = line.strip_prefix(MARK) {
            return serde_json::from_str(json).map_err(|e| format!("bad answer from Blender: {e}"));
        }
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(format!(
        "{} did not answer (exit status {}):\n{}{}",
        blender.display(),
        out.status
            .code()
            .map_or_else(|| "killed".into(), |c| c.to_string()),
        tail(&stdout, 20),
        tail(&stderr, 20)
    ))
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut s = lines[start..].join("\n");
    if !s.is_empty() {
        s.push('\n');
    }
    s
}

/// Ask Blender for its version and user folders.
pub fn facts(blender: &Path) -> Result<Facts, String> {
    let code = format!(
        "import bpy, json\nprint({mark} + json.dumps({{'version': list(bpy.app.version), \
         'version_string': bpy.app.version_string, 'scripts': bpy.utils.user_resource('SCRIPTS'), \
         'config': bpy.utils.user_resource('CONFIG')}}), flush=True)\n",
        mark = py_str(MARK)
    );
    let v = run_job(blender, true, &code)?;
    let n = |i: usize| v["version"].get(i).and_then(Value::as_u64).unwrap_or(0);
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    if s("scripts").is_empty() {
        return Err("Blender reported no user scripts folder".into());
    }
    Ok(Facts {
        version: (n(0), n(1), n(2)),
        version_string: s("version_string"),
        user_scripts: PathBuf::from(s("scripts")),
        user_config: PathBuf::from(s("config")),
    })
}

/// Enable (or disable) the add-on in Blender's preferences and save them. Runs without
/// `--factory-startup`, so the user's other preferences are loaded and saved back unchanged.
pub fn set_enabled(blender: &Path, module: &str, enable: bool) -> Result<Value, String> {
    let module = py_str(module);
    let action = if enable {
        format!(
            "mod = addon_utils.enable({module}, default_set=True, persistent=True)\n\
             ok = mod is not None\n"
        )
    } else {
        format!(
            "addon_utils.disable({module}, default_set=True)\n\
             ok = True\n"
        )
    };
    let code = format!(
        "import addon_utils, bpy, json\n{action}\
         if ok:\n    bpy.ops.wm.save_userpref()\n\
         enabled = {module} in bpy.context.preferences.addons\n\
         print({mark} + json.dumps({{'ok': ok, 'enabled': enabled}}), flush=True)\n",
        mark = py_str(MARK)
    );
    run_job(blender, false, &code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically() {
        let mut v = [
            PathBuf::from("blender-4.9.1"),
            PathBuf::from("blender-4.10.0"),
            PathBuf::from("blender-3.6.2"),
        ];
        v.sort_by_key(|p| std::cmp::Reverse(version_key(p)));
        assert_eq!(v[0], PathBuf::from("blender-4.10.0"));
        assert_eq!(v[2], PathBuf::from("blender-3.6.2"));
    }

    #[test]
    fn explicit_missing_blender_is_a_clear_error() {
        let e = find(Some(Path::new("/nonexistent/blender"))).err();
        let text = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(text.contains("/nonexistent/blender"), "{text}");
    }

    #[test]
    fn bootstrap_quotes_paths() {
        let e = bootstrap_expr(Path::new("/a \"b\"/bld_remote"), "127.0.0.1", 0);
        assert!(e.contains(r#"_d = "/a \"b\"/bld_remote""#), "{e}");
        assert!(e.contains("start_mcp_service(port=0, host=\"127.0.0.1\")"));
    }
}
