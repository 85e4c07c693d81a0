//! MCP tasks: long tool calls answered at once with a task handle that the client polls (the
//! `io.modelcontextprotocol/tasks` extension, SEP-2663, of the 2026-07-28 revision, as rmcp 3.11 implements
//! it: `tools/call` → `CreateTaskResult`, then `tasks/get`, `tasks/cancel`, `tasks/update`; there is no
//! `tasks/list` nor `tasks/result` in this revision: `tasks/get` carries the result once the task ended).
//!
//! Which tools run as tasks is the table [`TASK_TOOLS`] (one line per tool). A call becomes a task only
//! when the request declares the extension in its client capabilities and speaks 2026-07-28 or later;
//! every other call is answered as before. Two kinds:
//! - [`Kind::Call`]: the tool's own handler runs in a task of its own (on the runtime, outliving the
//!   request); `tasks/cancel` cancels its cancellation token, which sends the service's framed `cancel`:
//!   a request still queued in Blender never runs; one already running (a render) runs to its end in
//!   Blender and its result is discarded. Its progress lines become the task's `statusMessage` (progress
//!   notifications belong to a request, and this one has been answered).
//! - [`Kind::CodeJob`]: `execute_blender_code` backed by the service's job store (`submit_code_job`, then
//!   `get_job_result` polled without waiting, `cancel_job` on `tasks/cancel`): the job lives in Blender, so
//!   it survives the request, a lost connection to Blender (the poll reconnects), and its code sees the
//!   cancel at its next `check_cancelled()`.
//!
//! The store is one per `bld-remote mcp` process ([`store`]), shared by every session and transport (a
//! stateless 2026-07-28 HTTP request may come on any connection). Finished tasks are kept [`RETAIN`] after
//! they end, then dropped; at most [`MAX_TASKS`] are held (finished ones go first; with that many still
//! running, a new call is answered directly instead of as a task).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CreateTaskResult, DetailedTask,
    GetTaskResult, JsonObject, ProtocolVersion, Task, TaskPayload, TaskStatus,
};
use rmcp::service::RequestContext;
use rmcp::task_manager::current_timestamp;
use rmcp::{ErrorData, RoleServer};
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

use super::conn::{CallError, Chosen};
use super::tools::{
    call_error_result, error_result, exec_structured, exec_text, BlenderMcp, CodeArgs,
};

/// How a tool runs as a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Its handler, in a task.
    Call,
    /// Its code as a job in the service's job store (only `execute_blender_code`: `code`, `instance`).
    CodeJob,
}

/// The tools that run as tasks for clients that take them. A new long tool opts in with one line.
pub const TASK_TOOLS: &[(&str, Kind)] = &[
    ("render_image", Kind::Call),
    ("look", Kind::Call),
    ("export_scene", Kind::Call),
    ("execute_blender_code", Kind::CodeJob),
];

/// How long a finished task (and its result) is kept for `tasks/get`.
pub const RETAIN: Duration = Duration::from_secs(3600);
/// Most tasks held at once, running and finished.
pub const MAX_TASKS: usize = 256;
/// Most bytes of finished results held (their JSON size); the oldest finished go first past it.
pub const MAX_RESULT_BYTES: usize = 256 << 20;
/// The poll interval suggested to clients.
const POLL_MS: u64 = 500;
/// How often a code job's status is read from Blender (non-blocking reads on the network thread).
const JOB_POLL: Duration = Duration::from_millis(250);
/// Consecutive failed reads of a job's status before its task gives up (Blender gone).
const JOB_POLL_FAILURES: u32 = 5;

struct Entry {
    task: Task,
    /// Set once the task ended.
    payload: Option<TaskPayload>,
    created: Instant,
    ended: Option<Instant>,
    cancel: CancellationToken,
    bytes: usize,
}

/// The tasks of one `bld-remote mcp` process.
#[derive(Default)]
pub struct Store {
    tasks: Mutex<HashMap<String, Entry>>,
}

/// The process's task store.
pub fn store() -> &'static Store {
    static STORE: LazyLock<Store> = LazyLock::new(Store::default);
    &STORE
}

/// A running task's handle: its cancellation, and its status message.
#[derive(Clone)]
pub struct Handle {
    id: Arc<str>,
    cancel: CancellationToken,
    store: &'static Store,
}

tokio::task_local! {
    /// The task a tool handler runs in, if it runs as one (progress goes to its status message).
    static CURRENT: Handle;
}

/// The task the calling tool handler runs in, if any.
pub fn current() -> Option<Handle> {
    CURRENT.try_with(Clone::clone).ok()
}

impl Handle {
    /// Show `message` as the task's `statusMessage`.
    pub fn status(&self, message: impl Into<String>) {
        self.store.set_status(&self.id, message.into());
    }

    /// A service progress line (`{progress, total?, message?}`) → the status message.
    pub fn progress(&self, p: &Value) {
        let message = p.get("message").and_then(Value::as_str);
        let n = p.get("progress").and_then(Value::as_f64);
        let total = p.get("total").and_then(Value::as_f64);
        let text = match (n, total, message) {
            (Some(n), Some(t), Some(m)) => format!("{m} ({n}/{t})"),
            (_, _, Some(m)) => m.to_string(),
            (Some(n), Some(t), None) => format!("{n}/{t}"),
            _ => return,
        };
        self.status(text);
    }

    fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

fn unknown(id: &str) -> ErrorData {
    ErrorData::invalid_params(
        format!(
            "unknown task id {id:?}: this server has no such task (never created here, dropped {} s \
             after it ended, or the server restarted)",
            RETAIN.as_secs()
        ),
        Some(json!({"taskId": id})),
    )
}

fn status_name(s: TaskStatus) -> &'static str {
    match s {
        TaskStatus::Working => "working",
        TaskStatus::InputRequired => "input_required",
        TaskStatus::Completed => "completed",
        TaskStatus::Failed => "failed",
        TaskStatus::Cancelled => "cancelled",
        _ => "ended",
    }
}

impl Store {
    /// A new task running `work`; `None` when [`MAX_TASKS`] are running (answer the call directly).
    fn spawn<F, Fut>(&'static self, status: String, work: F) -> Option<Task>
    where
        F: FnOnce(Handle) -> Fut,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let id = match bld_remote_core::auth::random_hex(16) {
            Ok(hex) => format!("task-{hex}"),
            Err(_) => return None,
        };
        let now = current_timestamp();
        let mut task = Task::new(id.clone(), TaskStatus::Working, now.clone(), now)
            .with_poll_interval_ms(POLL_MS)
            .with_status_message(status);
        // Unlimited while it runs; set once it ends (kept RETAIN after that).
        task.ttl_ms = None;
        let cancel = CancellationToken::new();
        {
            let mut tasks = self.tasks.lock();
            prune(&mut tasks);
            if tasks.len() >= MAX_TASKS {
                return None;
            }
            tasks.insert(
                id.clone(),
                Entry {
                    task: task.clone(),
                    payload: None,
                    created: Instant::now(),
                    ended: None,
                    cancel: cancel.clone(),
                    bytes: 0,
                },
            );
        }
        let handle = Handle {
            id: Arc::from(id.as_str()),
            cancel,
            store: self,
        };
        let fut = work(handle.clone());
        tokio::spawn(async move {
            let outcome = CURRENT.scope(handle.clone(), fut).await;
            self.finish(&handle.id, outcome);
        });
        Some(task)
    }

    fn set_status(&self, id: &str, message: String) {
        if let Some(e) = self.tasks.lock().get_mut(id) {
            if e.payload.is_none() {
                e.task.status_message = Some(message);
                e.task.last_updated_at = current_timestamp();
            }
        }
    }

    fn finish(&self, id: &str, outcome: Outcome) {
        let mut tasks = self.tasks.lock();
        let Some(e) = tasks.get_mut(id) else { return };
        let (payload, message) = match outcome {
            Outcome::Completed(r, message) => {
                let result = match serde_json::to_value(&r) {
                    Ok(Value::Object(m)) => m,
                    _ => JsonObject::new(),
                };
                (TaskPayload::Completed { result }, message)
            }
            Outcome::Cancelled(message) => (TaskPayload::Cancelled, Some(message)),
            Outcome::Failed(error) => {
                let message = error.message.to_string();
                let error = match serde_json::to_value(&error) {
                    Ok(Value::Object(m)) => m,
                    _ => JsonObject::new(),
                };
                (TaskPayload::Failed { error }, Some(message))
            }
        };
        e.bytes = match &payload {
            TaskPayload::Completed { result } => {
                serde_json::to_string(result).map_or(0, |s| s.len())
            }
            _ => 0,
        };
        let now = Instant::now();
        e.task.status = payload.status();
        e.task.status_message = message.or_else(|| e.task.status_message.take());
        e.task.last_updated_at = current_timestamp();
        let lived = now.saturating_duration_since(e.created) + RETAIN;
        e.task.ttl_ms = Some(u64::try_from(lived.as_millis()).unwrap_or(u64::MAX));
        e.payload = Some(payload);
        e.ended = Some(now);
        prune(&mut tasks);
    }

    /// `tasks/get`.
    pub fn get(&self, id: &str) -> Result<GetTaskResult, ErrorData> {
        let mut tasks = self.tasks.lock();
        prune(&mut tasks);
        let e = tasks.get(id).ok_or_else(|| unknown(id))?;
        let payload = e.payload.clone().unwrap_or(TaskPayload::Working);
        Ok(GetTaskResult::new(DetailedTask::new(
            e.task.clone(),
            payload,
        )))
    }

    /// `tasks/cancel`: asks a running task to stop (acknowledged at once; the task reports `cancelled`
    /// once its work has stopped, or `completed` if it finished first). A finished task is an error.
    pub fn cancel(&self, id: &str) -> Result<(), ErrorData> {
        let mut tasks = self.tasks.lock();
        prune(&mut tasks);
        let e = tasks.get_mut(id).ok_or_else(|| unknown(id))?;
        if e.payload.is_some() {
            return Err(ErrorData::invalid_params(
                format!(
                    "task {id:?} already finished ({}): there is nothing to cancel; tasks/get returns how it \
                     ended",
                    status_name(e.task.status)
                ),
                Some(json!({"taskId": id, "status": status_name(e.task.status)})),
            ));
        }
        if !e.cancel.is_cancelled() {
            e.cancel.cancel();
            e.task.status_message = Some("cancel requested".into());
            e.task.last_updated_at = current_timestamp();
        }
        Ok(())
    }

    /// `tasks/update`: these tasks never ask for input, so responses are ignored (as the spec says for
    /// keys that are not outstanding); an unknown id is an error.
    pub fn update(&self, id: &str) -> Result<(), ErrorData> {
        let mut tasks = self.tasks.lock();
        prune(&mut tasks);
        if tasks.contains_key(id) {
            Ok(())
        } else {
            Err(unknown(id))
        }
    }
}

/// Drop tasks finished more than [`RETAIN`] ago; past [`MAX_TASKS`] or [`MAX_RESULT_BYTES`], the oldest
/// finished ones too.
fn prune(tasks: &mut HashMap<String, Entry>) {
    tasks.retain(|_, e| e.ended.is_none_or(|t| t.elapsed() < RETAIN));
    let mut bytes: usize = tasks.values().map(|e| e.bytes).sum();
    if tasks.len() < MAX_TASKS && bytes <= MAX_RESULT_BYTES {
        return;
    }
    let mut ended: Vec<(Instant, String, usize)> = tasks
        .iter()
        .filter_map(|(k, e)| e.ended.map(|t| (t, k.clone(), e.bytes)))
        .collect();
    ended.sort();
    for (_, k, b) in ended {
        if tasks.len() < MAX_TASKS && bytes <= MAX_RESULT_BYTES {
            break;
        }
        tasks.remove(&k);
        bytes = bytes.saturating_sub(b);
    }
}

/// How a task's work ended.
enum Outcome {
    /// A tool result (an `isError` one included), and an optional final status message.
    Completed(CallToolResult, Option<String>),
    /// Stopped on `tasks/cancel`, with what happened.
    Cancelled(String),
    /// A JSON-RPC error.
    Failed(ErrorData),
}

/// Whether this call may become a task: the tool opted in, the request declares the tasks extension,
/// and it speaks 2026-07-28 or later (the extension's revision; older sessions get plain results).
fn kind_for(name: &str, context: &RequestContext<RoleServer>) -> Option<Kind> {
    let kind = TASK_TOOLS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, k)| *k)?;
    let declared = context
        .client_capabilities()
        .is_some_and(|c| c.supports_tasks());
    let modern = context
        .protocol_version()
        .is_some_and(|v| v.as_str() >= ProtocolVersion::V_2026_07_28.as_str());
    (declared && modern).then_some(kind)
}

/// `tools/call`: as a task when [`kind_for`] says so, else the tool's handler answers directly.
pub async fn call_tool(
    mcp: &BlenderMcp,
    request: CallToolRequestParams,
    context: RequestContext<RoleServer>,
) -> Result<CallToolResponse, ErrorData> {
    // An unknown name passes: the router answers it.
    let writes = mcp
        .tool_router
        .map
        .get(request.name.as_ref())
        .is_some_and(|route| !super::tools::is_read_only(&route.attr));
    if mcp.backend.forced_read_only() && writes {
        return Ok(CallToolResponse::Complete(error_result(format!(
            "forbidden: this MCP server runs --read-only, and {} can change Blender (its tools are in \
             tools/list)",
            request.name
        ))));
    }
    match kind_for(&request.name, &context) {
        Some(Kind::Call) if mcp.tool_router.has_route(&request.name) => {
            let this = mcp.clone();
            let name = request.name.to_string();
            let (request2, context2) = (request.clone(), context.clone());
            let spawned = store().spawn(format!("{name}: started"), move |h| {
                run_call(this, request2, context2, h)
            });
            match spawned {
                Some(task) => Ok(CallToolResponse::Task(CreateTaskResult::new(task))),
                None => route(mcp, request, context).await,
            }
        }
        Some(Kind::CodeJob) => code_job(mcp, request, context).await,
        _ => route(mcp, request, context).await,
    }
}

/// The tool's own handler (the router), as without tasks.
async fn route(
    mcp: &BlenderMcp,
    request: CallToolRequestParams,
    context: RequestContext<RoleServer>,
) -> Result<CallToolResponse, ErrorData> {
    let tcc = ToolCallContext::new(mcp, request, context);
    mcp.tool_router.call(tcc).await
}

/// A tool handler run in a task: its own cancellation token (cancelled by `tasks/cancel`), no progress
/// token (its progress goes to the status message, see [`Handle::progress`]).
async fn run_call(
    mcp: BlenderMcp,
    request: CallToolRequestParams,
    mut context: RequestContext<RoleServer>,
    handle: Handle,
) -> Outcome {
    context.ct = handle.cancel.clone();
    context.meta.0 .0.remove("progressToken");
    match route(&mcp, request, context).await {
        Ok(CallToolResponse::Complete(r)) if handle.cancelled() && r.is_error == Some(true) => {
            Outcome::Cancelled(
                "cancelled: a request still queued in Blender never runs; one already running (a render) \
                 runs to its end in Blender and its result is discarded"
                    .into(),
            )
        }
        Ok(CallToolResponse::Complete(r)) => Outcome::Completed(r, None),
        Ok(_) => Outcome::Failed(ErrorData::internal_error(
            "the tool answered with neither a result nor an error",
            None,
        )),
        Err(e) => Outcome::Failed(e),
    }
}

/// `execute_blender_code` as a job: the arguments are checked, the instance chosen and the job submitted
/// before the task exists, so a bad call is an ordinary (error) result and a task always has a job.
async fn code_job(
    mcp: &BlenderMcp,
    request: CallToolRequestParams,
    context: RequestContext<RoleServer>,
) -> Result<CallToolResponse, ErrorData> {
    let args: CodeArgs = match serde_json::from_value(Value::Object(
        request.arguments.clone().unwrap_or_default(),
    )) {
        Ok(a) => a,
        // The handler words argument errors as every other tool does.
        Err(_) => return route(mcp, request, context).await,
    };
    let at = match mcp.at(args.instance.as_ref()).await {
        Ok(at) => at,
        Err(e) => return Ok(e.into()),
    };
    let mut params = Map::new();
    params.insert("code".into(), Value::String(args.code));
    let submitted = mcp
        .backend
        .call(&at, "submit_code_job", params, None, None, &context.ct)
        .await;
    let job_id = match submitted {
        Ok(s) => match s.get("job_id").and_then(Value::as_str) {
            Some(id) => id.to_string(),
            None => {
                return Ok(error_result(format!(
                    "Blender accepted the job but returned no job_id: {s}"
                ))
                .into())
            }
        },
        Err(e) => return Ok(call_error_result(&e).into()),
    };
    let this = mcp.clone();
    let status = format!("job {job_id} queued in Blender at {}", at.addr);
    let (job, at2) = (job_id.clone(), at.clone());
    if let Some(task) = store().spawn(status, move |h| follow_job(this, at2, job, h)) {
        return Ok(CallToolResponse::Task(CreateTaskResult::new(task)));
    }
    // Too many tasks running: this one is followed to its end here, as a plain call.
    match wait_job(mcp, &at, &job_id, &context.ct, None).await {
        Outcome::Completed(r, _) => Ok(r.into()),
        Outcome::Cancelled(m) => Ok(error_result(m).into()),
        Outcome::Failed(e) => Err(e),
    }
}

async fn follow_job(mcp: BlenderMcp, at: Chosen, job_id: String, handle: Handle) -> Outcome {
    let ct = handle.cancel.clone();
    wait_job(&mcp, &at, &job_id, &ct, Some(&handle)).await
}

/// Polls the job until it ends; on `ct`, asks Blender to cancel it (`cancel_job`) and goes on polling
/// until the job says how it ended.
async fn wait_job(
    mcp: &BlenderMcp,
    at: &Chosen,
    job_id: &str,
    ct: &CancellationToken,
    handle: Option<&Handle>,
) -> Outcome {
    let never = CancellationToken::new();
    let mut cancel_sent = false;
    let mut failures = 0;
    let started = Instant::now();
    loop {
        if ct.is_cancelled() && !cancel_sent {
            cancel_sent = true;
            let mut p = Map::new();
            p.insert("job_id".into(), json!(job_id));
            p.insert("reason".into(), json!("tasks/cancel"));
            let r = mcp
                .backend
                .call(
                    at,
                    "cancel_job",
                    p,
                    Some(Duration::from_secs(10)),
                    None,
                    &never,
                )
                .await;
            if let (Some(h), Ok(s)) = (handle, &r) {
                h.status(format!(
                    "cancel requested: job {job_id} is {} (code running in Blender stops at its next \
                     check_cancelled())",
                    s.get("status").and_then(Value::as_str).unwrap_or("?")
                ));
            }
        }
        let mut p = Map::new();
        p.insert("job_id".into(), json!(job_id));
        let r = mcp
            .backend
            .call(
                at,
                "get_job_result",
                p,
                Some(Duration::from_secs(10)),
                None,
                &never,
            )
            .await;
        match r {
            Ok(snap) if snap.get("found") == Some(&Value::Bool(false)) => {
                return Outcome::Completed(
                    error_result(format!(
                        "job {job_id} is no longer known to Blender at {} (did Blender restart?)",
                        at.addr
                    )),
                    None,
                );
            }
            Ok(snap) if snap.get("terminal") == Some(&Value::Bool(true)) => {
                return job_outcome(job_id, &snap);
            }
            Ok(snap) => {
                failures = 0;
                if let (Some(h), false) = (handle, cancel_sent) {
                    h.status(format!(
                        "job {job_id} {} in Blender at {} ({:.1} s)",
                        snap.get("status").and_then(Value::as_str).unwrap_or("?"),
                        at.addr,
                        started.elapsed().as_secs_f64()
                    ));
                }
            }
            Err(CallError::Cancelled) => {}
            Err(e) => {
                failures += 1;
                if failures >= JOB_POLL_FAILURES {
                    let mut r = call_error_result(&e);
                    r.content.push(rmcp::model::ContentBlock::text(format!(
                        "(lost track of job {job_id}: {failures} reads of its status failed)"
                    )));
                    return Outcome::Completed(r, None);
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(JOB_POLL) => {}
            () = ct.cancelled(), if !cancel_sent => {}
        }
    }
}

/// A terminal job snapshot → how the task ends.
fn job_outcome(job_id: &str, snap: &Value) -> Outcome {
    let status = snap.get("status").and_then(Value::as_str).unwrap_or("");
    let cancel_requested = snap.get("cancel_requested") == Some(&Value::Bool(true));
    match status {
        "completed" => {
            let empty = json!({});
            let result = snap.get("result").unwrap_or(&empty);
            let text = format!("{}\n\n(job {job_id})", exec_text(result, None));
            let message = cancel_requested.then(|| {
                "completed: the code ended before it reached a check_cancelled() after the cancel".into()
            });
            let mut r = CallToolResult::success(vec![rmcp::model::ContentBlock::text(text)]);
            let mut structured = exec_structured(result.clone());
            if let Value::Object(m) = &mut structured {
                m.insert("job_id".into(), Value::String(job_id.into()));
            }
            r.structured_content = Some(structured);
            Outcome::Completed(r, message)
        }
        "cancelled" => Outcome::Cancelled(format!(
            "cancelled: job {job_id} {}",
            if snap.get("started_at").is_some_and(|v| !v.is_null()) {
                "stopped at check_cancelled()"
            } else {
                "never ran"
            }
        )),
        _ => {
            let message = snap
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or(status)
                .to_string();
            let text = format!(
                "{}\n\n(job {job_id}, {status})",
                exec_text(snap, Some(&message))
            );
            Outcome::Completed(error_result(text), None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn static_store() -> &'static Store {
        Box::leak(Box::default())
    }

    #[tokio::test]
    async fn a_task_runs_ends_and_is_kept_and_a_finished_one_cannot_be_cancelled() {
        let s = static_store();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = s
            .spawn("started".into(), move |h| async move {
                h.status("half way");
                let _ = rx.await;
                Outcome::Completed(CallToolResult::success(vec![]), None)
            })
            .unwrap();
        let id = task.task_id.clone();
        assert!(id.starts_with("task-") && id.len() == 37, "{id}");
        let got = s.get(&id).unwrap();
        assert_eq!(got.task.status(), TaskStatus::Working);
        tx.send(()).unwrap();
        for _ in 0..200 {
            if s.get(&id).unwrap().task.status() == TaskStatus::Completed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let got = s.get(&id).unwrap();
        assert_eq!(got.task.status(), TaskStatus::Completed);
        assert!(got
            .task
            .task
            .ttl_ms
            .is_some_and(|t| t >= RETAIN.as_millis() as u64));
        let e = s.cancel(&id).unwrap_err();
        assert!(
            e.message.contains("already finished (completed)"),
            "{}",
            e.message
        );
        assert_eq!(e.code, rmcp::model::ErrorCode::INVALID_PARAMS);
        let e = s.get("task-nope").unwrap_err();
        assert!(
            e.message.contains("unknown task id \"task-nope\""),
            "{}",
            e.message
        );
        assert!(s.cancel("task-nope").is_err() && s.update("task-nope").is_err());
        assert!(s.update(&id).is_ok());
    }

    #[tokio::test]
    async fn cancel_reaches_the_work_and_the_task_says_cancelled() {
        let s = static_store();
        let task = s
            .spawn("started".into(), |h| async move {
                h.cancel.cancelled().await;
                Outcome::Cancelled("stopped".into())
            })
            .unwrap();
        s.cancel(&task.task_id).unwrap();
        s.cancel(&task.task_id).unwrap(); // twice while running: still an ack
        for _ in 0..200 {
            if s.get(&task.task_id).unwrap().task.status() == TaskStatus::Cancelled {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let got = s.get(&task.task_id).unwrap();
        assert_eq!(got.task.status(), TaskStatus::Cancelled);
        assert_eq!(got.task.task.status_message.as_deref(), Some("stopped"));
    }

    #[test]
    fn prune_drops_the_oldest_finished_first() {
        let mut tasks = HashMap::new();
        let now = Instant::now();
        for i in 0..MAX_TASKS {
            tasks.insert(
                format!("t{i}"),
                Entry {
                    task: Task::new(format!("t{i}"), TaskStatus::Working, "", ""),
                    payload: None,
                    created: now,
                    ended: (i < 2).then(|| now + Duration::from_millis(i as u64)),
                    cancel: CancellationToken::new(),
                    bytes: 0,
                },
            );
        }
        prune(&mut tasks);
        assert_eq!(tasks.len(), MAX_TASKS - 1);
        assert!(!tasks.contains_key("t0") && tasks.contains_key("t1"));
    }

    #[test]
    fn job_outcomes() {
        let done = json!({"status": "completed", "terminal": true, "cancel_requested": false,
                          "result": {"output": {"stdout": "hi\n", "stderr": ""}, "value": 3}});
        let Outcome::Completed(r, None) = job_outcome("bld-job-1", &done) else {
            panic!("completed")
        };
        let t = serde_json::to_string(&r).unwrap();
        assert!(t.contains("stdout:\\nhi") && t.contains("result = 3") && t.contains("bld-job-1"));
        let sc = r.structured_content.as_ref().unwrap();
        assert_eq!(sc["job_id"], json!("bld-job-1"));
        assert_eq!(sc["output"]["stdout"], json!("hi\n"));
        assert_eq!(sc["value"], json!(3));
        let failed = json!({"status": "failed", "terminal": true, "error": "ZeroDivisionError: x",
                            "traceback": "Traceback ...", "output": {"stdout": "before\n"}});
        let Outcome::Completed(r, _) = job_outcome("bld-job-2", &failed) else {
            panic!("failed → a tool error")
        };
        assert_eq!(r.is_error, Some(true));
        let cancelled = json!({"status": "cancelled", "terminal": true, "started_at": 1.0});
        let Outcome::Cancelled(m) = job_outcome("bld-job-3", &cancelled) else {
            panic!("cancelled")
        };
        assert!(m.contains("check_cancelled()"), "{m}");
    }
}
