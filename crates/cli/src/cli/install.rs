//! `bld-remote install` and `uninstall`: copy the installed `bld_remote` package into Blender's user
//! add-ons (staged, then renamed into place) and enable it, or disable and remove it. Blender itself is run
//! as a short background job ([`blender::set_enabled`]) to change and save its preferences. Runs on the
//! main thread.

use std::path::Path;

use serde_json::json;

use super::args::InstallArgs;
use super::{errln, find_blender, outln, package_dir, Host, EXIT_FAILURE};
use crate::blender;

const ADDON: &str = "bld_remote";

fn copy_package(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        let src = entry.path();
        if name == "__pycache__" {
            continue;
        }
        if entry.file_type()?.is_dir() {
            copy_package(&src, &to.join(&name))?;
        } else {
            std::fs::copy(&src, to.join(&name))?;
        }
    }
    Ok(())
}

pub(super) fn install(a: &InstallArgs, host: &Host<'_>) -> i32 {
    let package_dir = match package_dir(host) {
        Ok(d) => d,
        Err(rc) => return rc,
    };
    let (found, facts) = match blender_and_facts(a) {
        Ok(v) => v,
        Err(rc) => return rc,
    };
    let addons = facts.user_scripts.join("addons");
    let target = addons.join(ADDON);
    let staging = addons.join(format!(".{ADDON}.installing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let copied = copy_package(&package_dir, &staging).and_then(|()| {
        if target.exists() {
            std::fs::remove_dir_all(&target)?;
        }
        std::fs::rename(&staging, &target)
    });
    if let Err(e) = copied {
        let _ = std::fs::remove_dir_all(&staging);
        errln(&format!(
            "cannot copy the add-on to {}: {e}",
            target.display()
        ));
        return EXIT_FAILURE;
    }
    match blender::set_enabled(&found.path, ADDON, true) {
        Ok(v) if v["ok"] == json!(true) && v["enabled"] == json!(true) => {}
        Ok(v) => {
            errln(&format!(
                "copied to {}, but Blender could not enable it: {v}",
                target.display()
            ));
            return EXIT_FAILURE;
        }
        Err(e) => {
            errln(&format!(
                "copied to {}, but enabling it failed: {e}",
                target.display()
            ));
            return EXIT_FAILURE;
        }
    }
    let (major, minor, _) = facts.version;
    outln(&format!(
        "installed bld_remote {} into Blender {} at {} (enabled; preferences saved in {})",
        env!("CARGO_PKG_VERSION"),
        facts.version_string,
        target.display(),
        facts.user_config.display()
    ));
    if (major, minor) >= (4, 2) {
        outln("note: installed as a legacy add-on (Blender 4.2+ still loads these); not as an extension");
    }
    outln("start it with BLD_REMOTE_MCP_START_NOW=1 in the environment, or from the add-on's preferences");
    0
}

/// The Blender that `--blender` (or the search) names, and what it says of itself (user scripts folder,
/// version); an error is reported here and comes back as the exit status.
fn blender_and_facts(a: &InstallArgs) -> Result<(blender::Found, blender::Facts), i32> {
    let found = find_blender(a.blender.as_deref())?;
    match blender::facts(&found.path) {
        Ok(f) => Ok((found, f)),
        Err(e) => {
            errln(&e);
            Err(EXIT_FAILURE)
        }
    }
}

pub(super) fn uninstall(a: &InstallArgs) -> i32 {
    let (found, facts) = match blender_and_facts(a) {
        Ok(v) => v,
        Err(rc) => return rc,
    };
    let target = facts.user_scripts.join("addons").join(ADDON);
    let present = target.exists();
    match blender::set_enabled(&found.path, ADDON, false) {
        Ok(v) if v["ok"] == json!(true) => {}
        Ok(v) => {
            errln(&format!("Blender could not disable the add-on: {v}"));
            return EXIT_FAILURE;
        }
        Err(e) => {
            errln(&format!("disabling the add-on failed: {e}"));
            return EXIT_FAILURE;
        }
    }
    if present {
        if let Err(e) = std::fs::remove_dir_all(&target) {
            errln(&format!("cannot remove {}: {e}", target.display()));
            return EXIT_FAILURE;
        }
        outln(&format!("uninstalled bld_remote from {}", target.display()));
    } else {
        outln(&format!(
            "bld_remote was not installed in {} (nothing to remove)",
            target.display()
        ));
    }
    0
}
