//! `bld-remote map FILE.py --items ITEMS.json`: the pool's map from the shell, over bld-remote-core's pool
//! (the same code as `bld_remote.Pool.map`). Results go to stdout as JSON lines in item order (each printed
//! as soon as it and every item before it are done), or one array with `--array`. Progress goes to stderr:
//! an indicatif bar on a terminal, plain lines otherwise.
//!
//! Runs on the main thread (the map's coordinator: events, output, Ctrl+C) plus the map's worker threads
//! (one per instance), joined before it returns.
//!
//! Exit status: 0 every item succeeded; 1 some failed (all are still printed); 2 usage (bad items file);
//! 3 no instance reachable, or one refused us; 130 interrupted.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use bld_remote_core::config::positive_seconds;
use bld_remote_core::pool::{self, Event, MapError, MapOptions, Member};

use super::args::MapArgs;
use super::{errln, outln, Host, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_UNREACHABLE, EXIT_USAGE};
use crate::instances;

fn read_text(path: &Path, what: &str) -> Result<String, String> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("cannot read {what} from standard input: {e}"))?;
        return Ok(s);
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The items as JSON texts: a JSON array, or one JSON value per line (blank lines skipped).
fn parse_items(text: &str, name: &str) -> Result<Vec<String>, String> {
    if text.trim_start().starts_with('[') {
        let list: Vec<Value> =
            serde_json::from_str(text).map_err(|e| format!("{name} is not a JSON array: {e}"))?;
        return Ok(list.iter().map(Value::to_string).collect());
    }
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| format!("{name} line {}: not JSON: {e}", n + 1))?;
        out.push(v.to_string());
    }
    Ok(out)
}

fn members(a: &MapArgs) -> Result<Vec<Member>, String> {
    if !a.ports.is_empty() {
        let host = a.host.clone().unwrap_or_else(|| "127.0.0.1".into());
        return Ok(a
            .ports
            .iter()
            .map(|p| Member::new(host.clone(), *p, a.token.clone(), false))
            .collect());
    }
    let (alive, _) = instances::live(true);
    let found: Vec<Member> = alive
        .into_iter()
        .filter(|d| a.host.as_deref().is_none_or(|h| h == d.host))
        .map(|d| {
            let mut m = Member::new(d.host, d.port, a.token.clone(), false);
            m.pid = d.pid;
            m
        })
        .collect();
    if found.is_empty() {
        return Err(format!(
            "no running bld_remote instance to map over (descriptors in {}); start some with \
             `bld-remote start --background --instances N`, or pass --port",
            instances::runtime_dir().display()
        ));
    }
    Ok(found)
}

/// Where progress goes.
enum Progress {
    Quiet,
    Bar(ProgressBar),
    Lines { done: usize, total: usize },
}

impl Progress {
    fn new(quiet: bool, total: usize) -> Self {
        if quiet {
            return Self::Quiet;
        }
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total as u64);
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} items ({per_sec}, eta {eta}) {msg}",
            ) {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(200));
            return Self::Bar(bar);
        }
        Self::Lines { done: 0, total }
    }

    fn event(&mut self, e: &Event, members: &[Member], failed: usize) {
        let addr = |m: Option<usize>| {
            m.and_then(|m| members.get(m))
                .map_or_else(|| "-".into(), Member::addr_text)
        };
        match self {
            Self::Quiet => {}
            Self::Bar(bar) => match e {
                Event::Finished { .. } => {
                    bar.inc(1);
                    if failed > 0 {
                        bar.set_message(format!("{failed} failed"));
                    }
                }
                Event::MemberDown { member, detail, .. } => {
                    bar.println(format!(
                        "bld-remote: {} is down: {detail}",
                        addr(Some(*member))
                    ));
                }
                _ => {}
            },
            Self::Lines { done, total } => match e {
                Event::Finished {
                    item,
                    member,
                    ok,
                    seconds,
                    ..
                } => {
                    *done += 1;
                    errln(&format!(
                        "map: item {item} {} on {} in {seconds:.2} s ({done}/{total} done, {failed} failed)",
                        if *ok { "done" } else { "failed" },
                        addr(*member)
                    ));
                }
                Event::MemberDown {
                    member,
                    detail,
                    waiting,
                } => errln(&format!(
                    "map: {} is down ({detail}){}",
                    addr(Some(*member)),
                    if *waiting {
                        "; waiting for its restart"
                    } else {
                        "; dropped"
                    }
                )),
                Event::MemberBack { member, pid } => {
                    errln(&format!("map: {} is back (pid {pid})", addr(Some(*member))));
                }
                Event::Started { .. } => {}
            },
        }
    }

    fn finish(&self) {
        if let Self::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// The code and the items (JSON texts), read from their files (or standard input).
fn inputs(a: &MapArgs) -> Result<(String, Vec<String>), String> {
    if a.file.as_os_str() == "-" && a.items.as_os_str() == "-" {
        return Err("FILE.py and --items cannot both be standard input".into());
    }
    let code = read_text(&a.file, "the code")?;
    let items = parse_items(
        &read_text(&a.items, "the items")?,
        &a.items.display().to_string(),
    )?;
    Ok((code, items))
}

pub(super) fn map(a: &MapArgs, host: &Host<'_>) -> i32 {
    let timeout = match a
        .timeout
        .map(|t| positive_seconds("--timeout", t))
        .transpose()
    {
        Ok(t) => t,
        Err(e) => {
            errln(&e.0);
            return EXIT_USAGE;
        }
    };
    let (code, items) = match inputs(a) {
        Ok(i) => i,
        Err(e) => {
            errln(&e);
            return EXIT_USAGE;
        }
    };
    if items.is_empty() {
        if a.array {
            outln("[]");
        }
        return 0;
    }
    let members = match members(a) {
        Ok(m) => m,
        Err(e) => {
            errln(&e);
            return EXIT_UNREACHABLE;
        }
    };
    let opts = MapOptions {
        timeout,
        retries: a.retries,
        events: true,
        ..MapOptions::default()
    };
    let mut progress = Progress::new(a.quiet, items.len());
    let mut failed = 0usize;
    // Finished lines waiting for an earlier item, so that stdout stays in item order.
    let mut waiting: BTreeMap<usize, Value> = BTreeMap::new();
    let mut next = 0usize;
    let mut all: Vec<Value> = Vec::new();
    let array = a.array;
    let mut on_event = |e: &Event| {
        if let Event::Finished {
            item, ok, outcome, ..
        } = e
        {
            if !ok {
                failed += 1;
            }
            if let Some(o) = outcome {
                waiting.insert(*item, o.clone());
            }
            while let Some(o) = waiting.remove(&next) {
                match &progress {
                    _ if array => all.push(o),
                    Progress::Bar(bar) => bar.suspend(|| outln(&o.to_string())),
                    _ => outln(&o.to_string()),
                }
                next += 1;
            }
        }
        progress.event(e, &members, failed);
    };
    let report = pool::map(
        &members,
        &code,
        &items,
        &opts,
        host.interrupted,
        &mut on_event,
    );
    progress.finish();
    let report = match report {
        Ok(r) => r,
        Err(MapError::Interrupted) => return EXIT_INTERRUPTED,
        Err(e) => {
            errln(&e.to_string());
            return EXIT_UNREACHABLE;
        }
    };
    if array {
        outln(&Value::Array(all).to_string());
    }
    if report.interrupted {
        errln(
            "interrupted: items still running in Blender were abandoned (their outcome is unknown)",
        );
        return EXIT_INTERRUPTED;
    }
    let failed = report.outcomes.iter().filter(|o| o.is_err()).count();
    if failed > 0 {
        errln(&format!(
            "{failed} of {} items failed",
            report.outcomes.len()
        ));
        return EXIT_FAILURE;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_as_array_or_lines() {
        assert_eq!(
            parse_items(" [1, {\"a\": [2]}, \"x\"]", "i").unwrap(),
            vec!["1", "{\"a\":[2]}", "\"x\""]
        );
        assert_eq!(
            parse_items("1\n\n{\"a\": 2}\n", "i").unwrap(),
            vec!["1", "{\"a\":2}"]
        );
        let e = parse_items("1\n{oops\n", "f.json").unwrap_err();
        assert!(e.contains("f.json line 2"), "{e}");
        assert!(parse_items("[1, 2", "f.json").is_err());
    }
}
