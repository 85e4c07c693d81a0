//! The MCP tools: their argument types (whose doc comments become the JSON schemas the model reads), the
//! rmcp tool router and handlers, and how each reply or failure becomes the text or image the model gets.
//! Each handler is one request over [`Backend`]. Runs as tasks on the tokio runtime of `bld-remote mcp`
//! (see [`super::run`]).

// Doc comments here are user-facing text (JSON-schema descriptions the model reads).
#![allow(clippy::doc_markdown)]

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CancelTaskParams, ContentBlock,
    GetTaskParams, GetTaskResult, Implementation, ListResourceTemplatesResult, ListResourcesResult,
    PaginatedRequestParams, ProgressNotificationParam, ReadResourceRequestParams,
    ReadResourceResponse, ServerCapabilities, ServerConfig, SubscriptionFilter, UpdateTaskParams,
};
use rmcp::schemars::{self, JsonSchema};
use rmcp::service::{NotificationContext, RequestContext, SubscriptionContext};
use rmcp::{tool, tool_handler, tool_router, ErrorData, RoleServer, ServerHandler};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use bld_remote_core::client::ClientError;

use super::conn::{Backend, CallError, Chosen};
use super::{image, schemas, tasks};

// --- tool arguments ---------------------------------------------------------------------------------------

/// The `instance` argument every tool takes: a port or an id (the pid `bld-remote ls` prints), as a number
/// or a string, or an address `host:port`. Its schema is one short line (`integer` or `string`): it is
/// repeated in every tool, and tools/list has a size budget.
#[derive(Debug, Clone)]
pub struct Instance(pub String);

impl<'de> Deserialize<'de> for Instance {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Number(n) if n.is_u64() => Ok(Self(n.to_string())),
            Value::String(s) if !s.trim().is_empty() => Ok(Self(s.trim().to_string())),
            v => Err(serde::de::Error::custom(format!(
                "instance must be a port or an id from list_instances (a whole number or a string), got {v}"
            ))),
        }
    }
}

impl JsonSchema for Instance {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Instance".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": ["integer", "string"]})
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct InstanceArgs {
    /// Which Blender: its port or id (list_instances). Needed when several run.
    #[serde(default)]
    pub instance: Option<Instance>,
}

/// `fields` of get_scene_info: a list of names, or "all" (checked by the command, which lists the valid
/// names in its error).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Fields {
    All(String),
    Names(Vec<String>),
}

impl JsonSchema for Fields {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Fields".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": ["array", "string"], "items": {"type": "string"}})
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SceneArgs {
    /// Per-object fields, default name type location visible; also data rotation scale dimensions selected
    /// parent collections materials, or "all".
    #[serde(default)]
    pub fields: Option<Fields>,
    /// Only objects matching all of: type ("MESH" or a list), name (glob "Cube*"), collection, selected,
    /// visible.
    #[serde(default)]
    pub filter: Option<Map<String, Value>>,
    /// Objects per page, 0 to 1000 (default: 200, fewer if they pass about 8 KB).
    #[serde(default, deserialize_with = "page_limit")]
    #[schemars(range(min = 0, max = 1000))]
    pub limit: Option<u32>,
    /// Matches to skip: the next_offset of the previous page.
    #[serde(default, deserialize_with = "offset")]
    #[schemars(range(min = 0, max = 1_000_000_000))]
    pub offset: Option<u32>,
    /// true: counts by type, collection tree, camera, frame range; no object list.
    #[serde(default)]
    pub summary: Option<bool>,
    /// Which Blender: its port or id (list_instances). Needed when several run.
    #[serde(default)]
    pub instance: Option<Instance>,
}

// A list of get_object_info to page on its own (no doc comment: it would be repeated in the schema).
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ObjectList {
    Materials,
    Modifiers,
    VertexGroups,
    Collections,
    Children,
    Vertices,
}

impl ObjectList {
    fn wire(self) -> &'static str {
        match self {
            Self::Materials => "materials",
            Self::Modifiers => "modifiers",
            Self::VertexGroups => "vertex_groups",
            Self::Collections => "collections",
            Self::Children => "children",
            Self::Vertices => "vertices",
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ObjectArgs {
    /// The object's name, exactly as in get_scene_info (e.g. "Cube").
    pub name: String,
    /// Return only this list, paged by limit/offset (vertices: local [x,y,z] of a mesh).
    #[serde(default)]
    pub list: Option<ObjectList>,
    /// Items per list, 0 to 1000 (default 100).
    #[serde(default, deserialize_with = "page_limit")]
    #[schemars(range(min = 0, max = 1000))]
    pub limit: Option<u32>,
    /// Items of each list to skip (a list's next offset).
    #[serde(default, deserialize_with = "offset")]
    #[schemars(range(min = 0, max = 1_000_000_000))]
    pub offset: Option<u32>,
    /// Which Blender: its port or id (list_instances). Needed when several run.
    #[serde(default)]
    pub instance: Option<Instance>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct CodeArgs {
    /// Python code to run in Blender, with `bpy` imported. print() output is returned; assign a variable
    /// named `result` to return a value (converted to JSON).
    pub code: String,
    /// Report what the code changed in the scene (default true).
    #[serde(default)]
    pub changes: Option<bool>,
    /// Which Blender: its port or id (list_instances). Needed when several run.
    #[serde(default)]
    pub instance: Option<Instance>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ScreenshotArgs {
    /// Longest side of the screenshot in pixels, 1 to 16384 (default 800).
    #[serde(default, deserialize_with = "max_size")]
    #[schemars(range(min = 1, max = 16384))]
    pub max_size: Option<u32>,
    /// Which Blender: its port or id (list_instances). Needed when several run.
    #[serde(default)]
    pub instance: Option<Instance>,
}

/// Render engine.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
pub enum Engine {
    /// Fast solid shading (seconds).
    #[serde(rename = "WORKBENCH", alias = "workbench")]
    Workbench,
    /// Path tracing on the CPU (slower, realistic).
    #[serde(rename = "CYCLES", alias = "cycles")]
    Cycles,
    /// Rasterised PBR (BLENDER_EEVEE, or BLENDER_EEVEE_NEXT in Blender 4.2-4.x); slow without a GPU.
    #[serde(rename = "EEVEE", alias = "eevee")]
    Eevee,
}

impl Engine {
    fn wire(self) -> &'static str {
        match self {
            Self::Workbench => "WORKBENCH",
            Self::Cycles => "CYCLES",
            Self::Eevee => "EEVEE",
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct RenderArgs {
    /// Image width in pixels, 1 to 8192 (default: the scene's output width, at most 1920).
    #[serde(default, deserialize_with = "width")]
    #[schemars(range(min = 1, max = 8192))]
    pub width: Option<u32>,
    /// Image height in pixels, 1 to 8192 (default: the scene's output height, at most 1920).
    #[serde(default, deserialize_with = "height")]
    #[schemars(range(min = 1, max = 8192))]
    pub height: Option<u32>,
    /// Render engine (default WORKBENCH, the fastest).
    #[serde(default)]
    pub engine: Option<Engine>,
    /// Samples for CYCLES / EEVEE, 1 to 65536 (default: 16 for CYCLES, the scene's setting for EEVEE).
    #[serde(default, deserialize_with = "samples")]
    #[schemars(range(min = 1, max = 65536))]
    pub samples: Option<u32>,
    /// Which Blender: its port or id (list_instances). Needed when several run.
    #[serde(default)]
    pub instance: Option<Instance>,
}

// Every number a tool takes is range-checked here, where it enters, with an error naming the argument and
// its range (the same ranges the add-on's commands check, bld_remote/commands.py). Absent or null: the
// default.

/// Render sizes, in pixels.
const MAX_SIDE: u32 = 8192;
const MAX_SCREENSHOT_SIZE: u32 = 16384;
const MAX_SAMPLES: u32 = 65536;

/// An optional whole number from `min` to `max` (an integral float such as 800.0 counts).
fn bounded<'de, D: serde::Deserializer<'de>>(
    d: D,
    name: &str,
    min: u32,
    max: u32,
) -> Result<Option<u32>, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let n = match &v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(f))
                // In range and integral (checked just above): the cast is exact.
                .map(|f| {
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                    let n = f as u64;
                    n
                })
        }),
        _ => None,
    };
    match n
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| (min..=max).contains(n))
    {
        Some(n) => Ok(Some(n)),
        None => Err(serde::de::Error::custom(format!(
            "{name} must be a whole number from {min} to {max}, got {v}"
        ))),
    }
}

fn max_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    bounded(d, "max_size", 1, MAX_SCREENSHOT_SIZE)
}

fn width<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    bounded(d, "width", 1, MAX_SIDE)
}

fn height<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    bounded(d, "height", 1, MAX_SIDE)
}

fn samples<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    bounded(d, "samples", 1, MAX_SAMPLES)
}

/// Scene and object pages (the command itself takes up to 10^9; a tool reply stays readable).
const MAX_PAGE_LIMIT: u32 = 1000;
const MAX_OFFSET: u32 = 1_000_000_000;

fn page_limit<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    bounded(d, "limit", 0, MAX_PAGE_LIMIT)
}

fn offset<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    bounded(d, "offset", 0, MAX_OFFSET)
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct PutArgs {
    /// The key to store the value under.
    pub key: String,
    /// Any JSON value.
    pub data: Value,
    /// Which Blender: its port or id (list_instances). Needed when several run.
    #[serde(default)]
    pub instance: Option<Instance>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct GetArgs {
    /// The key to look up.
    pub key: String,
    /// Returned when the key is not stored (default null).
    #[serde(default)]
    pub default: Option<Value>,
    /// Which Blender: its port or id (list_instances). Needed when several run.
    #[serde(default)]
    pub instance: Option<Instance>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct KeyArgs {
    /// The key to remove.
    pub key: String,
    /// Which Blender: its port or id (list_instances). Needed when several run.
    #[serde(default)]
    pub instance: Option<Instance>,
}

// --- the server -------------------------------------------------------------------------------------------

/// The MCP tools over one [`Backend`]. Cheap to clone: the HTTP transport makes one per session, all
/// sharing the same connection to Blender.
#[derive(Clone)]
pub struct BlenderMcp {
    pub(super) backend: Arc<Backend>,
    max_image: usize,
    pub(super) tool_router: ToolRouter<Self>,
    /// This session's view of the resource list (resources.rs).
    pub(super) resources_seen: super::resources::Seen,
}

const INSTRUCTIONS: &str = "Drive a running Blender. Start with get_scene_info to see the scene; use \
get_object_info for details of one object; change anything with execute_blender_code (Python with bpy); \
look at the result with render_image (works headless) or get_viewport_screenshot (needs Blender's UI). \
check_connection_status tells whether Blender is reachable. The persist data tools keep small JSON values \
in the service between calls. With several Blenders running, list_instances shows them and every tool takes \
`instance` (a port or id) to say which one.";

fn text_result(text: impl Into<String>) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(text)])
}

pub(crate) fn error_result(text: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(text)])
}

/// A failed call → the tool error the model reads.
pub(crate) fn call_error_result(e: &CallError) -> CallToolResult {
    match e {
        CallError::Service(ClientError::Remote {
            message, traceback, ..
        }) => {
            let mut text = format!("Blender reported an error: {message}");
            if let Some(tb) = traceback {
                text.push_str("\n\n");
                text.push_str(tb.trim_end());
            }
            error_result(text)
        }
        // `ran` comes from the reply's fields (bld-remote-core's interpret_reply), never from its text.
        CallError::Service(ClientError::Timeout { detail, ran, .. }) => error_result(match ran {
            Some(false) => format!("Timed out: {detail} (it did not run)"),
            _ => format!("Timed out: {detail}"),
        }),
        CallError::Service(e) => error_result(e.to_string()),
        CallError::Cancelled => error_result("Cancelled."),
        CallError::Unreachable(m) | CallError::Lost(m) => error_result(m.clone()),
    }
}

fn str_field<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// Whether a tool is annotated read-only (`readOnlyHint: true`): the tools a read-only token may call.
pub(crate) fn is_read_only(tool: &rmcp::model::Tool) -> bool {
    tool.annotations
        .as_ref()
        .and_then(|a| a.read_only_hint)
        .unwrap_or(false)
}

/// An `execute_code` reply as `execute_blender_code`'s structured content: the whole reply (changes
/// included) without `result`, which is `output.stdout` again (or its base64), and output can be megabytes.
pub(crate) fn exec_structured(mut reply: Value) -> Value {
    if let Value::Object(m) = &mut reply {
        m.remove("result");
        m.remove("result_is_base64");
    }
    reply
}

/// The `execute_code` reply (success or error) → one text the model can act on.
pub(crate) fn exec_text(reply: &Value, failed: Option<&str>) -> String {
    let output = reply.get("output");
    let stdout = output.map_or_else(|| str_field(reply, "stdout"), |o| str_field(o, "stdout"));
    let stderr = output.map_or("", |o| str_field(o, "stderr"));
    let mut parts = Vec::new();
    if let Some(message) = failed {
        parts.push(format!("The code raised an exception: {message}"));
        if let Some(tb) = reply.get("traceback").and_then(Value::as_str) {
            parts.push(tb.trim_end().to_string());
        }
    }
    if !stdout.is_empty() {
        parts.push(format!(
            "stdout{}:\n{}",
            if failed.is_some() {
                " (before the error)"
            } else {
                ""
            },
            stdout.trim_end_matches('\n')
        ));
    }
    if !stderr.is_empty() {
        parts.push(format!("stderr:\n{}", stderr.trim_end_matches('\n')));
    }
    if let Some(changes) = reply.get("changes") {
        parts.push(changes_text(changes, failed.is_some()));
    }
    if failed.is_none() {
        if let Some(v) = reply.get("value") {
            parts.push(format!(
                "result = {}",
                serde_json::to_string(v).unwrap_or_default()
            ));
        }
        if parts.is_empty() {
            parts.push("Done (no output; assign `result` or print() to return something).".into());
        }
        if let Some(d) = reply.get("duration").and_then(Value::as_f64) {
            parts.push(format!("(ran in {d:.3} s)"));
        }
    }
    parts.join("\n\n")
}

/// A number as the model reads it best: at most 4 decimals, no trailing zeros (`1`, `0.5`, `-2.3333`).
fn short_number(f: f64) -> String {
    let s = format!("{f:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

/// A before or after value of a change, compactly: numbers shortened, names unquoted.
fn short_value(v: &Value) -> String {
    match v {
        Value::Null => "none".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.as_f64().map_or_else(|| n.to_string(), short_number),
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(short_value).collect();
            format!("[{}]", inner.join(", "))
        }
        other => other.to_string(),
    }
}

/// `changes` of an `execute_code` reply → one short line per change (docs/MCP.md): `+` added, `-` removed,
/// `>` renamed, `~` modified (each property `before -> after`), `data` for data-blocks per type.
fn changes_text(changes: &Value, failed: bool) -> String {
    let when = if failed { " before the error" } else { "" };
    if let Some(e) = changes.get("error").and_then(Value::as_str) {
        return format!("Changes{when}: unknown ({e})");
    }
    let list = |k: &str| {
        changes
            .get(k)
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice)
    };
    let more = |lines: &mut Vec<String>, k: &str, what: &str| {
        let shown = list(k).len();
        if let Some(total) = changes.get(format!("{k}_total")).and_then(Value::as_u64) {
            lines.push(format!(
                "  ... {} more {what} ({total} in all)",
                total.saturating_sub(shown as u64)
            ));
        }
    };
    let mut lines = Vec::new();
    for e in list("added") {
        lines.push(format!(
            "+ {} ({})",
            str_field(e, "name"),
            str_field(e, "type")
        ));
    }
    more(&mut lines, "added", "added");
    for e in list("removed") {
        lines.push(format!(
            "- {} ({})",
            str_field(e, "name"),
            str_field(e, "type")
        ));
    }
    more(&mut lines, "removed", "removed");
    for e in list("renamed") {
        lines.push(format!(
            "> {} renamed to {}",
            str_field(e, "from"),
            str_field(e, "to")
        ));
    }
    more(&mut lines, "renamed", "renamed");
    for e in list("modified") {
        let Some(m) = e.as_object() else { continue };
        let props: Vec<String> = m
            .iter()
            .filter(|(k, _)| k.as_str() != "name")
            .map(|(k, v)| match v.as_array().map(Vec::as_slice) {
                Some([before, after]) => {
                    format!("{k} {} -> {}", short_value(before), short_value(after))
                }
                _ => format!("{k} {}", short_value(v)),
            })
            .collect();
        lines.push(format!("~ {}: {}", str_field(e, "name"), props.join("; ")));
    }
    more(&mut lines, "modified", "modified");
    if let Some(data) = changes.get("data").and_then(Value::as_object) {
        for (kind, part) in data {
            let names = |k: &str, sign: char| {
                let shown = part
                    .get(k)
                    .and_then(Value::as_array)
                    .map_or(&[][..], Vec::as_slice);
                let mut out: Vec<String> = shown
                    .iter()
                    .map(|n| format!("{sign}{}", n.as_str().unwrap_or("?")))
                    .collect();
                if let Some(total) = part.get(format!("{k}_total")).and_then(Value::as_u64) {
                    out.push(format!(
                        "{sign}{} more",
                        total.saturating_sub(shown.len() as u64)
                    ));
                }
                out
            };
            let mut all = names("added", '+');
            all.extend(names("removed", '-'));
            let count = match part
                .get("count")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
            {
                Some([before, after]) => {
                    format!(" ({} -> {})", short_value(before), short_value(after))
                }
                _ => String::new(),
            };
            lines.push(format!("data {kind}{count}: {}", all.join(" ")));
        }
    }
    if lines.is_empty() {
        format!("Changes{when}: none in the scene.")
    } else {
        format!("Changes{when}:\n{}", lines.join("\n"))
    }
}

impl BlenderMcp {
    pub fn new(backend: Arc<Backend>, max_image: usize) -> Self {
        let mut tool_router = Self::tool_router()
            + Self::export_router()
            + Self::look_router()
            + Self::lookup_router();
        schemas::apply(&mut tool_router);
        Self {
            backend,
            max_image,
            tool_router,
            resources_seen: super::resources::Seen::default(),
        }
    }

    /// The connections to Blender (the resources use them too).
    pub(crate) fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// The instance a call goes to (see [`Backend::choose`]); an error result when it names none, or
    /// names none and several run.
    pub(super) async fn at(&self, instance: Option<&Instance>) -> Result<Chosen, CallToolResult> {
        self.backend
            .choose(instance.map(|i| i.0.as_str()))
            .await
            .map_err(error_result)
    }

    async fn simple(
        &self,
        instance: Option<&Instance>,
        command: &str,
        params: Map<String, Value>,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<Value, CallToolResult> {
        let at = self.at(instance).await?;
        self.backend
            .call(&at, command, params, None, None, &ctx.ct)
            .await
            .map_err(|e| call_error_result(&e))
    }

    /// A call whose service progress lines become MCP progress notifications (when the client asked for
    /// them with a progress token).
    pub(crate) async fn with_progress(
        &self,
        at: &Chosen,
        command: &str,
        params: Map<String, Value>,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<Value, CallError> {
        let token = ctx.meta.get_progress_token();
        // Run as an MCP task (tasks.rs): progress goes to the task's status message instead.
        let task = tasks::current();
        let (tx, mut rx) = mpsc::unbounded_channel::<Value>();
        let call = self.backend.call(
            at,
            command,
            params,
            None,
            (token.is_some() || task.is_some()).then_some(tx),
            &ctx.ct,
        );
        tokio::pin!(call);
        let mut last = f64::NEG_INFINITY;
        loop {
            tokio::select! {
                r = &mut call => return r,
                Some(p) = rx.recv() => {
                    if let Some(task) = &task {
                        task.progress(&p);
                    }
                    let Some(token) = token.clone() else { continue };
                    let Some(progress) = p.get("progress").and_then(Value::as_f64) else { continue };
                    // MCP progress must increase; the service's normally does.
                    if progress <= last {
                        continue;
                    }
                    last = progress;
                    let mut n = ProgressNotificationParam::new(token, progress);
                    if let Some(t) = p.get("total").and_then(Value::as_f64) {
                        n = n.with_total(t);
                    }
                    if let Some(m) = p.get("message").and_then(Value::as_str) {
                        n = n.with_message(m.to_string());
                    }
                    let _ = ctx.peer.notify_progress(n).await;
                }
            }
        }
    }

    /// PNG bytes from a reply: inline `data` (base64), else the file at `filepath` (removed afterwards when
    /// `temporary`).
    pub(crate) async fn image_bytes(reply: &Value) -> Result<Vec<u8>, String> {
        if let Some(data) = reply.get("data").and_then(Value::as_str) {
            return base64::engine::general_purpose::STANDARD
                .decode(data)
                .map_err(|e| format!("the image data from Blender is not valid base64: {e}"));
        }
        let path = reply
            .get("filepath")
            .and_then(Value::as_str)
            .ok_or_else(|| "Blender returned no image (no data, no filepath)".to_string())?;
        let bytes = tokio::fs::read(path).await.map_err(|e| {
            format!("cannot read the image Blender wrote to {path}: {e} (is Blender on another machine?)")
        })?;
        if reply.get("temporary").and_then(Value::as_bool) == Some(true) {
            let _ = tokio::fs::remove_file(path).await;
        }
        Ok(bytes)
    }

    /// Image content fitted to the byte budget, plus a caption.
    pub(crate) async fn image_result(&self, bytes: Vec<u8>, caption: String) -> CallToolResult {
        let budget = self.max_image;
        let fitted = tokio::task::spawn_blocking(move || image::fit_png(bytes, budget)).await;
        match fitted {
            Ok(Ok(f)) => {
                let mut caption = caption;
                if let Some((w, h)) = f.scaled_from {
                    let _ = write!(
                        caption,
                        " (scaled down from {w}x{h} to {}x{} to fit {budget} bytes)",
                        f.width, f.height
                    );
                }
                CallToolResult::success(vec![
                    ContentBlock::image(
                        base64::engine::general_purpose::STANDARD.encode(&f.png),
                        "image/png",
                    ),
                    ContentBlock::text(caption),
                ])
            }
            Ok(Err(e)) => error_result(format!(
                "Blender produced an image that cannot be used: {e}"
            )),
            Err(e) => error_result(format!("image processing failed: {e}")),
        }
    }
}

/// The objects one get_scene_info tool call returns by default, and the bytes of JSON they may take.
const SCENE_PAGE: u32 = 200;
const SCENE_PAGE_BYTES: usize = 8 * 1024;

/// A get_scene_info page for the model: cut to `budget` bytes of object JSON (when given; at least one
/// object is kept), with `truncated`/`next_offset` kept true to the cut, and a `hint` saying how to get the
/// next page.
fn fit_scene_page(v: &mut Value, budget: Option<usize>) {
    let Value::Object(m) = v else { return };
    let offset = m.get("offset").and_then(Value::as_u64).unwrap_or(0);
    let total = m.get("total").and_then(Value::as_u64).unwrap_or(0);
    if let (Some(budget), Some(Value::Array(objects))) = (budget, m.get_mut("objects")) {
        let mut used = 0;
        let keep = objects
            .iter()
            .position(|o| {
                used += o.to_string().len() + 1;
                used > budget
            })
            .map_or(objects.len(), |i| i.max(1));
        if keep < objects.len() {
            objects.truncate(keep);
            let next = offset + u64::try_from(keep).unwrap_or(u64::MAX);
            m.insert("truncated".into(), json!(true));
            m.insert("next_offset".into(), json!(next));
            m.insert("budget_bytes".into(), json!(budget));
        }
    }
    let shown = m
        .get("objects")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    if let Some(next) = m.get("next_offset").and_then(Value::as_u64) {
        m.insert(
            "hint".into(),
            json!(format!(
                "showing {shown} of {total} matching objects from offset {offset}: call get_scene_info again \
                 with offset={next} and the same filter and fields for the next page"
            )),
        );
    }
}

fn one(key: &str, v: Value) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(key.into(), v);
    m
}

#[tool_router]
impl BlenderMcp {
    #[tool(
        description = "The running Blenders: for each, `instance` (its port) and `id` (its pid, as `bld-remote \
                       ls` shows it), host, mode, Blender version, open file, and whether it answers now. \
                       With several running, pass one's port or id as `instance` to the other tools.",
        annotations(
            title = "List Blender instances",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn list_instances(&self) -> Result<CallToolResult, ErrorData> {
        let instances = self.backend.survey().await;
        let mut v = json!({ "instances": instances });
        if let (Ok(Some(port)), Value::Object(m)) = (self.backend.pinned(), &mut v) {
            let at = self
                .backend
                .choose(None)
                .await
                .map(|c| c.addr)
                .unwrap_or_default();
            m.insert(
                "pinned".into(),
                json!(format!(
                    "this server is pinned to {at} (--port {port}): every tool goes there, and `instance` may \
                     only name that one"
                )),
            );
        }
        Ok(CallToolResult::structured(v))
    }

    #[tool(
        description = "The open scene: name, frame range, active object, render engine, and its objects \
                       (a page: see truncated and next_offset). summary=true gives counts by type and the \
                       collection tree instead.",
        annotations(
            title = "Get scene info",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn get_scene_info(
        &self,
        Parameters(a): Parameters<SceneArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let mut params = Map::new();
        match a.fields {
            Some(Fields::All(s)) => params.insert("fields".into(), Value::String(s)),
            Some(Fields::Names(v)) => params.insert("fields".into(), json!(v)),
            None => None,
        };
        if let Some(f) = a.filter {
            params.insert("filter".into(), Value::Object(f));
        }
        let summary = a.summary.unwrap_or(false);
        if summary {
            params.insert("summary".into(), json!(true));
        } else {
            params.insert("limit".into(), json!(a.limit.unwrap_or(SCENE_PAGE)));
        }
        if let Some(o) = a.offset {
            params.insert("offset".into(), json!(o));
        }
        Ok(
            match self
                .simple(a.instance.as_ref(), "get_scene_info", params, &ctx)
                .await
            {
                Ok(mut v) => {
                    if !summary {
                        fit_scene_page(&mut v, a.limit.is_none().then_some(SCENE_PAGE_BYTES));
                    }
                    CallToolResult::structured(v)
                }
                Err(e) => e,
            },
        )
    }

    #[tool(
        description = "Details of one object by name: transform (rotation: Euler radians), dimensions, \
                       visibility, parent, mesh counts, and its lists (materials, modifiers, vertex_groups, \
                       collections, children), each cut at limit with totals. list pages one of them, or \
                       vertex positions.",
        annotations(
            title = "Get object info",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn get_object_info(
        &self,
        Parameters(a): Parameters<ObjectArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let mut params = one("name", Value::String(a.name));
        if let Some(l) = a.list {
            params.insert("list".into(), json!(l.wire()));
        }
        if let Some(l) = a.limit {
            params.insert("limit".into(), json!(l));
        }
        if let Some(o) = a.offset {
            params.insert("offset".into(), json!(o));
        }
        Ok(
            match self
                .simple(a.instance.as_ref(), "get_object_info", params, &ctx)
                .await
            {
                Ok(mut v) => {
                    let next = v.get("next_offset").and_then(Value::as_u64);
                    if let (Value::Object(m), Some(next)) = (&mut v, next) {
                        let list = m
                            .get("list")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string();
                        m.insert(
                            "hint".into(),
                            json!(format!(
                                "more items: call get_object_info again with list=\"{list}\" and offset={next}"
                            )),
                        );
                    }
                    CallToolResult::structured(v)
                }
                Err(e) => e,
            },
        )
    }

    #[tool(
        description = "Run Python code inside Blender (the `bpy` module is imported) to create, change or \
                       delete anything. Returns what the code printed (stdout, stderr) and the value of a \
                       variable named `result` if the code sets one. If the code raises, the result is an \
                       error with the traceback and the output printed before it: fix the code and retry. \
                       Each call runs in a fresh namespace. In Blender's UI each call is one undo step.",
        annotations(
            title = "Execute Blender Python code",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = false,
            open_world_hint = true
        )
    )]
    async fn execute_blender_code(
        &self,
        Parameters(a): Parameters<CodeArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let at = match self.at(a.instance.as_ref()).await {
            Ok(at) => at,
            Err(e) => return Ok(e),
        };
        let mut params = one("code", Value::String(a.code));
        if let Some(changes) = a.changes {
            params.insert("changes".into(), Value::Bool(changes));
        }
        let r = self
            .backend
            .call(&at, "execute_code", params, None, None, &ctx.ct)
            .await;
        super::resources::code_ran();
        Ok(match r {
            Ok(v) => {
                let mut r = text_result(exec_text(&v, None));
                r.structured_content = Some(exec_structured(v));
                r
            }
            Err(CallError::Service(ClientError::Remote { message, reply, .. }))
                if reply.contains_key("traceback") || reply.contains_key("output") =>
            {
                error_result(exec_text(&Value::Object(reply.clone()), Some(&message)))
            }
            Err(e) => call_error_result(&e),
        })
    }

    #[tool(
        description = "Screenshot of Blender's largest 3D viewport as an image. Needs Blender running with \
                       its user interface; a headless (background) Blender has no viewport: use \
                       render_image there.",
        annotations(
            title = "Viewport screenshot",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn get_viewport_screenshot(
        &self,
        Parameters(a): Parameters<ScreenshotArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let mut params = Map::new();
        params.insert("max_size".into(), json!(a.max_size.unwrap_or(800)));
        params.insert("format".into(), json!("png"));
        let at = match self.at(a.instance.as_ref()).await {
            Ok(at) => at,
            Err(e) => return Ok(e),
        };
        let r = self
            .backend
            .call(&at, "get_viewport_screenshot", params, None, None, &ctx.ct)
            .await;
        let reply = match r {
            Ok(v) => v,
            Err(CallError::Service(ClientError::Remote { message, .. }))
                if message.contains("background mode") =>
            {
                return Ok(error_result(format!(
                    "No viewport to capture: this Blender runs headless (background mode), without a \
                     user interface. Use the render_image tool to see the scene instead. ({message})"
                )));
            }
            Err(e) => return Ok(call_error_result(&e)),
        };
        let bytes = match Self::image_bytes(&reply).await {
            Ok(b) => b,
            Err(e) => return Ok(error_result(e)),
        };
        let caption = format!(
            "Viewport screenshot, {}x{} pixels.",
            reply.get("width").and_then(Value::as_u64).unwrap_or(0),
            reply.get("height").and_then(Value::as_u64).unwrap_or(0)
        );
        Ok(self.image_result(bytes, caption).await)
    }

    #[tool(
        description = "Render the scene from its active camera and return the image (PNG). Works in headless \
                       Blender too. engine: WORKBENCH (fast, default), CYCLES (realistic, slower) or EEVEE \
                       (slow without a GPU). Sends progress notifications while rendering. The scene's own \
                       render settings are restored afterwards.",
        annotations(
            title = "Render image",
            read_only_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn render_image(
        &self,
        Parameters(a): Parameters<RenderArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let mut params = Map::new();
        if let Some(w) = a.width {
            params.insert("width".into(), json!(w));
        }
        if let Some(h) = a.height {
            params.insert("height".into(), json!(h));
        }
        if let Some(s) = a.samples {
            params.insert("samples".into(), json!(s));
        }
        params.insert(
            "engine".into(),
            json!(a.engine.unwrap_or(Engine::Workbench).wire()),
        );
        let at = match self.at(a.instance.as_ref()).await {
            Ok(at) => at,
            Err(e) => return Ok(e),
        };
        // Blender on another machine: its temp file is not readable here, so ask for the bytes inline.
        params.insert("inline".into(), json!(!at.is_local()));
        let reply = match self.with_progress(&at, "render_image", params, &ctx).await {
            Ok(v) => v,
            Err(e) => return Ok(call_error_result(&e)),
        };
        let bytes = match Self::image_bytes(&reply).await {
            Ok(b) => b,
            Err(e) => return Ok(error_result(e)),
        };
        let caption = format!(
            "Rendered {}x{} with {} in {:.1} s.",
            reply.get("width").and_then(Value::as_u64).unwrap_or(0),
            reply.get("height").and_then(Value::as_u64).unwrap_or(0),
            str_field(&reply, "engine"),
            reply.get("duration").and_then(Value::as_f64).unwrap_or(0.0)
        );
        Ok(self.image_result(bytes, caption).await)
    }

    #[tool(
        description = "Whether Blender is reachable, and what it is: address, Blender version, GUI or \
                       background mode, open .blend file, queue length, the request running now.",
        annotations(
            title = "Check connection",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn check_connection_status(
        &self,
        Parameters(a): Parameters<InstanceArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let at = match self.at(a.instance.as_ref()).await {
            Ok(at) => at,
            Err(e) => return Ok(e),
        };
        let r = self
            .backend
            .call(
                &at,
                "get_status",
                Map::new(),
                Some(Duration::from_secs(10)),
                None,
                &ctx.ct,
            )
            .await;
        Ok(match r {
            Ok(s) => {
                let v = json!({
                    "connected": true,
                    "address": at.addr,
                    "blender_version": s.get("blender_version"),
                    "mode": s.get("mode"),
                    "blend_file": s.get("blend_file"),
                    "pid": s.get("pid"),
                    "queue_length": s.get("queue_length"),
                    "running_job": s.get("running_job"),
                    "requests_served": s.get("requests_served"),
                    "bld_remote_version": s.get("version"),
                    // What this server's token may do there ("read": inspect only).
                    "role": s.get("role"),
                });
                CallToolResult::structured(v)
            }
            Err(CallError::Cancelled) => error_result("Cancelled."),
            Err(e) => CallToolResult::structured(
                json!({"connected": false, "address": at.addr, "reason": e.to_string()}),
            ),
        })
    }

    #[tool(
        description = "Store a JSON value under a key in the bld_remote service (kept while Blender runs, \
                       shared by all clients; not saved in the .blend file). Overwrites an existing key.",
        annotations(
            title = "Put persist data",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn put_persist_data(
        &self,
        Parameters(a): Parameters<PutArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let mut p = one("key", Value::String(a.key));
        p.insert("data".into(), a.data);
        Ok(
            match self
                .simple(a.instance.as_ref(), "put_persist_data", p, &ctx)
                .await
            {
                Ok(Value::String(s)) => text_result(s),
                Ok(v) => CallToolResult::structured(v),
                Err(e) => e,
            },
        )
    }

    #[tool(
        description = "Read the JSON value stored under a key (see put_persist_data). Returns \
                       {\"data\": value, \"found\": true|false}; `default` is returned when the key is absent.",
        annotations(
            title = "Get persist data",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn get_persist_data(
        &self,
        Parameters(a): Parameters<GetArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let mut p = one("key", Value::String(a.key));
        p.insert("default".into(), a.default.unwrap_or(Value::Null));
        Ok(
            match self
                .simple(a.instance.as_ref(), "get_persist_data", p, &ctx)
                .await
            {
                Ok(v) => CallToolResult::structured(v),
                Err(e) => e,
            },
        )
    }

    #[tool(
        description = "Remove the value stored under a key. Returns {\"removed\": true|false}.",
        annotations(
            title = "Remove persist data",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn remove_persist_data(
        &self,
        Parameters(a): Parameters<KeyArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        Ok(
            match self
                .simple(
                    a.instance.as_ref(),
                    "remove_persist_data",
                    one("key", Value::String(a.key)),
                    &ctx,
                )
                .await
            {
                Ok(v) => CallToolResult::structured(v),
                Err(e) => e,
            },
        )
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for BlenderMcp {
    /// Every tool; with a read-only token only those annotated read-only (the service refuses the rest).
    async fn list_tools(
        &self,
        _request: Option<rmcp::model::PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ListToolsResult, ErrorData> {
        let supports_cache_hints = context
            .protocol_version()
            .is_some_and(|v| v >= rmcp::model::ProtocolVersion::V_2026_07_28);
        let mut tools = self.tool_router.list_all();
        if self.backend.read_only().await {
            tools.retain(is_read_only);
        }
        Ok(rmcp::model::ListToolsResult {
            result_type: Some(rmcp::model::ResultType::COMPLETE),
            tools,
            meta: None,
            next_cursor: None,
            ttl_ms: supports_cache_hints.then_some(0),
            cache_scope: supports_cache_hints.then_some(rmcp::model::CacheScope::Public),
        })
    }

    // MCP tasks (tasks.rs): long tools answer a task handle to clients that take one.
    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        tasks::call_tool(self, request, context).await
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        _: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, ErrorData> {
        tasks::store().get(&request.task_id)
    }

    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        _: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        tasks::store().cancel(&request.task_id)
    }

    async fn update_task(
        &self,
        request: UpdateTaskParams,
        _: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        tasks::store().update(&request.task_id)
    }

    fn get_info(&self) -> ServerConfig {
        let mut info = Implementation::new("bld_remote", env!("CARGO_PKG_VERSION"));
        info.title = Some("Blender (bld_remote)".into());
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .enable_resources_list_changed()
                .enable_tasks()
                .build(),
        )
        .with_server_info(info)
        .with_instructions(INSTRUCTIONS)
    }

    // The resources (resources.rs).
    async fn list_resources(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        self.resource_list(request, &context).await
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        Ok(Self::resource_templates())
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        self.resource_read(&request.uri, &context)
            .await
            .map(Into::into)
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        self.watch_session(context.peer);
    }

    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        Self::subscription_filter(requested)
    }

    async fn listen(&self, context: SubscriptionContext) -> Result<(), ErrorData> {
        self.watch_subscription(context).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tools/list as a client gets it, in bytes (docs/MCP.md records it; issue 16 caps it at 16 KiB).
    #[test]
    fn tools_list_is_small_and_every_blender_tool_takes_instance() {
        let mut router = BlenderMcp::tool_router()
            + BlenderMcp::look_router()
            + BlenderMcp::export_router()
            + BlenderMcp::lookup_router();
        schemas::apply(&mut router);
        let tools = router.list_all();
        let size = serde_json::to_string(&json!({ "tools": tools }))
            .unwrap()
            .len();
        eprintln!("tools/list: {size} bytes");
        assert!(size < 16 * 1024, "{size}");
        for t in tools.iter().filter(|t| t.name != "list_instances") {
            let p = t
                .input_schema
                .get("properties")
                .and_then(|p| p.get("instance"));
            assert!(p.is_some(), "{} has no instance argument", t.name);
            eprintln!("{}: {}", t.name, p.unwrap_or(&Value::Null));
            let required = t.input_schema.get("required").cloned().unwrap_or(json!([]));
            assert!(!required.to_string().contains("instance"), "{}", t.name);
        }
    }

    #[test]
    fn every_tool_is_listed_with_a_description_schema_and_annotations() {
        let tools = (BlenderMcp::tool_router() + BlenderMcp::look_router()).list_all();
        let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            vec![
                "check_connection_status",
                "execute_blender_code",
                "get_object_info",
                "get_persist_data",
                "get_scene_info",
                "get_viewport_screenshot",
                "list_instances",
                "look",
                "put_persist_data",
                "remove_persist_data",
                "render_image",
            ]
        );
        for t in &tools {
            assert!(
                t.description.as_ref().is_some_and(|d| d.len() > 20),
                "{}",
                t.name
            );
            assert!(t.annotations.is_some(), "{}", t.name);
            assert_eq!(
                t.input_schema.get("type"),
                Some(&json!("object")),
                "{}",
                t.name
            );
        }
        let code = tools.iter().find(|t| t.name == "execute_blender_code");
        let a = code.and_then(|t| t.annotations.clone());
        assert_eq!(a.as_ref().and_then(|a| a.read_only_hint), Some(false));
        assert_eq!(a.as_ref().and_then(|a| a.destructive_hint), Some(true));
        let required = code.and_then(|t| t.input_schema.get("required").cloned());
        assert_eq!(required, Some(json!(["code"])));
    }

    /// The text a failed call shows the model, through bld-remote-core's reply interpreter.
    fn failure_text(reply: Value) -> String {
        let Value::Object(reply) = reply else {
            return String::new();
        };
        let e = bld_remote_core::client::interpret_reply("127.0.0.1:1", reply).unwrap_err();
        serde_json::to_string(&call_error_result(&CallError::Service(e))).unwrap()
    }

    #[test]
    fn a_timeout_says_whether_it_ran_from_the_reply_fields() {
        let never = failure_text(
            json!({"id": 1, "status": "error", "message": "queued too long",
                                        "timeout": true, "ran": false}),
        );
        assert!(
            never.contains("Timed out: queued too long (it did not run)"),
            "{never}"
        );
        let started = failure_text(json!({"id": 1, "status": "error", "message": "too slow",
                                          "timeout": true, "ran": "unknown", "state": "running"}));
        assert!(started.contains("Timed out: too slow"), "{started}");
        assert!(!started.contains("did not run"), "{started}");
        let raised = failure_text(json!({"id": 1, "status": "error", "message": "boom",
                                         "traceback": "Traceback ...\nValueError: boom"}));
        assert!(
            raised.contains("Blender reported an error: boom"),
            "{raised}"
        );
        assert!(raised.contains("ValueError: boom"), "{raised}");
    }

    #[test]
    fn changes_are_one_short_line_each() {
        let reply = json!({"output": {"stdout": "", "stderr": ""}, "duration": 0.01, "changes": {
            "added": [{"name": "Sphere", "type": "MESH"}], "added_total": 120,
            "removed": [{"name": "Cube", "type": "MESH"}],
            "renamed": [{"from": "Light", "to": "Sun"}],
            "modified": [{"name": "Camera", "location": [[0.0, -0.5, 1.0], [1.25, 0.333_333_3, 1.0]],
                          "hide_render": [false, true], "parent": [null, "Sun"]}],
            "data": {"materials": {"count": [1, 2], "added": ["Red"], "removed": []}}}});
        let t = exec_text(&reply, None);
        for line in [
            "Changes:",
            "+ Sphere (MESH)",
            "  ... 119 more added (120 in all)",
            "- Cube (MESH)",
            "> Light renamed to Sun",
            "~ Camera: ",
            "location [0, -0.5, 1] -> [1.25, 0.3333, 1]",
            "hide_render false -> true",
            "parent none -> Sun",
            "data materials (1 -> 2): +Red",
        ] {
            assert!(t.contains(line), "{line:?} not in\n{t}");
        }
        let none = exec_text(
            &json!({"changes": {"added": [], "removed": [], "renamed": [],
                                                 "modified": [], "data": {}}}),
            None,
        );
        assert!(none.contains("Changes: none in the scene."), "{none}");
        let failed = exec_text(
            &json!({"traceback": "T", "changes": {"added": [{"name": "A", "type": "EMPTY"}]}}),
            Some("ValueError: x"),
        );
        assert!(
            failed.contains("Changes before the error:\n+ A (EMPTY)"),
            "{failed}"
        );
    }

    #[test]
    fn exec_text_success_and_failure() {
        let ok = json!({"executed": true, "result": "hi\n", "output": {"stdout": "hi\n", "stderr": ""},
                        "value": [1, 2], "duration": 0.01});
        let t = exec_text(&ok, None);
        assert!(t.contains("stdout:\nhi"));
        assert!(t.contains("result = [1,2]"));
        let bad = json!({"status": "error", "traceback": "Traceback (most recent call last):\nZeroDivisionError",
                         "output": {"stdout": "before\n", "stderr": ""}});
        let t = exec_text(&bad, Some("ZeroDivisionError: division by zero"));
        assert!(t.starts_with("The code raised an exception: ZeroDivisionError"));
        assert!(t.contains("Traceback"));
        assert!(t.contains("stdout (before the error):\nbefore"));
    }
}
