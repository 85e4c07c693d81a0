//! MCP resources: `blender://scene`, `blender://object/{name}`, `blender://material/{name}` and
//! `blender://collection/{name}` (offered as resource templates); `resources/list`, paged with an MCP
//! cursor over the scene, the current scene's objects, then the file's materials and collections; reading
//! one returns, as `application/json`, what its wire command returns (`get_scene_info {summary: true}`,
//! `get_object_info`, `get_material_info`, `get_collection_info`). And `notifications/resources/list_changed`
//! when objects, materials or collections are added or removed, at most one per [`DEBOUNCE`].
//!
//! Which Blender: a URI may end in `?instance=PORT_OR_ID`; without it, the instance the tools reach when
//! their `instance` is left out (the pinned one, or the only one running). With several running and none
//! pinned, `resources/list` lists `blender://scene?instance=P` for each.
//!
//! Change notifications: while a client session is connected (2025-era: from its `initialized` notification
//! until its transport closes; 2026-07-28: while a `subscriptions/listen` asking for
//! `resourcesListChanged` is open), a task asks the instance's `get_status` every [`POLL`] (answered on
//! a network thread in Blender, never its main thread) and compares `scene_generation` (bumped inside
//! Blender when the counts change: src/scene_events.rs), the pid and start time; a tool call of
//! `execute_blender_code` wakes it at once. Runs as tasks on the runtime of `bld-remote mcp`.

use std::fmt::Write as _;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rmcp::model::{
    ListResourceTemplatesResult, ListResourcesResult, PaginatedRequestParams, ReadResourceResult,
    Resource, ResourceContents, ResourceTemplate, SubscriptionFilter,
};
use rmcp::service::{Peer, RequestContext, SubscriptionContext, SubscriptionSink};
use rmcp::{ErrorData, RoleServer};
use serde_json::{json, Map, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use bld_remote_core::client::ClientError;

use super::conn::{CallError, Chosen};
use super::tools::BlenderMcp;

const MIME: &str = "application/json";
/// Concrete resources per `resources/list` page.
pub const PAGE: usize = 100;
/// How often a connected session asks Blender's `get_status` whether the lists changed.
pub const POLL: Duration = Duration::from_millis(250);
/// At most one `list_changed` per this long; changes within it are coalesced into the next one.
pub const DEBOUNCE: Duration = Duration::from_millis(500);
/// The listable kinds, in listing order, with their `list_datablocks` type and URI path.
const KINDS: [(&str, &str); 3] = [
    ("objects", "object"),
    ("materials", "material"),
    ("collections", "collection"),
];

/// What the resource list depended on when this session last listed it (or when its watch began): the
/// watch compares Blender's state with this, so a change after a `resources/list` is always told.
#[derive(Clone, Default)]
pub struct Seen(Arc<Mutex<Option<Value>>>);

/// Woken after each `execute_blender_code` call: the watchers look at once instead of at their next poll.
static CODE_RAN: LazyLock<Notify> = LazyLock::new(Notify::new);

/// Called by the `execute_blender_code` tool when its call returns.
pub fn code_ran() {
    CODE_RAN.notify_waiters();
}

// --- URIs -------------------------------------------------------------------------------------------------

/// What a `blender://` URI names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Scene,
    /// (kind as in the URI: object, material, collection; the name, decoded)
    Named(&'static str, String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedUri {
    pub target: Target,
    pub instance: Option<String>,
}

/// Percent-encode everything but RFC 3986's unreserved characters (names may hold spaces, slashes,
/// `?`, `#`, `%` and any Unicode: each UTF-8 byte becomes `%XX`).
pub fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Undo [`encode`] (any `%XX` is decoded; other characters, Unicode too, are taken as they are).
pub fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    format!("bad percent-encoding at byte {i} of {s:?} (a % must be followed by two hex digits)")
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8 text"))
}

pub fn uri(kind: &str, name: &str, instance: Option<&str>) -> String {
    with_instance(format!("blender://{kind}/{}", encode(name)), instance)
}

fn with_instance(mut uri: String, instance: Option<&str>) -> String {
    if let Some(i) = instance {
        uri.push_str("?instance=");
        uri.push_str(&encode(i));
    }
    uri
}

/// A `blender://` URI → what it names; `Err` is the message of a resource-not-found error.
pub fn parse(uri: &str) -> Result<ParsedUri, String> {
    let rest = uri.strip_prefix("blender://").ok_or_else(|| {
        format!("unknown resource {uri:?}: resources are blender://scene, blender://object/{{name}}, blender://material/{{name}}, blender://collection/{{name}}")
    })?;
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let mut instance = None;
    for pair in query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("instance", v)) if !v.is_empty() => instance = Some(decode(v)?),
            _ => {
                return Err(format!(
                    "unknown resource {uri:?}: the only query parameter is instance=PORT_OR_ID, got {pair:?}"
                ))
            }
        }
    }
    let target = if path == "scene" || path == "scene/" {
        Target::Scene
    } else {
        let (kind, name) = path.split_once('/').unwrap_or((path, ""));
        let kind = KINDS
            .iter()
            .map(|(_, k)| *k)
            .find(|k| *k == kind)
            .ok_or_else(|| {
                format!(
                    "unknown resource {uri:?}: the kinds are scene, object, material, collection"
                )
            })?;
        let name = decode(name)?;
        if name.is_empty() {
            return Err(format!(
                "unknown resource {uri:?}: blender://{kind}/ needs a name"
            ));
        }
        Target::Named(kind, name)
    };
    Ok(ParsedUri { target, instance })
}

/// `resources/list` cursors: `KIND:OFFSET` (where the next page starts).
fn parse_cursor(cursor: &str) -> Option<(usize, usize)> {
    let (kind, offset) = cursor.split_once(':')?;
    let k = KINDS.iter().position(|(t, _)| *t == kind)?;
    Some((k, offset.parse().ok()?))
}

// --- the handlers -----------------------------------------------------------------------------------------

fn templates() -> Vec<ResourceTemplate> {
    let t = |uri: &str, name: &str, description: &str| {
        ResourceTemplate::new(uri, name)
            .with_description(description)
            .with_mime_type(MIME)
    };
    vec![
        t(
            "blender://scene",
            "scene",
            "The open scene's summary (get_scene_info summary): counts by type, collection tree, camera, \
             frames. Append ?instance=PORT_OR_ID when several Blenders run.",
        ),
        t(
            "blender://object/{name}",
            "object",
            "One object (get_object_info): transform, dimensions, materials, modifiers, mesh counts. \
             The name is percent-encoded.",
        ),
        t(
            "blender://material/{name}",
            "material",
            "One material (get_material_info): users, nodes, Principled BSDF inputs.",
        ),
        t(
            "blender://collection/{name}",
            "collection",
            "One collection (get_collection_info): its objects (first 100, total), children, hide flags.",
        ),
    ]
}

/// The wire error of a read whose name Blender does not know (the add-on's `not_found: true`, or the
/// "... not found" message of `get_object_info`).
fn is_not_found(e: &CallError) -> Option<String> {
    match e {
        CallError::Service(ClientError::Remote { message, reply, .. })
            if reply.get("not_found") == Some(&Value::Bool(true))
                || message.contains("not found") =>
        {
            Some(message.clone())
        }
        _ => None,
    }
}

fn call_failed(e: &CallError) -> ErrorData {
    ErrorData::internal_error(e.to_string(), None)
}

fn json_contents(uri: &str, v: &Value) -> ReadResourceResult {
    ReadResourceResult::new(vec![
        ResourceContents::text(v.to_string(), uri).with_mime_type(MIME)
    ])
}

impl BlenderMcp {
    pub(crate) fn resource_templates() -> ListResourceTemplatesResult {
        ListResourceTemplatesResult::with_all_items(templates())
    }

    /// The instances a resource URI may name when several run (and none is pinned), or `None` when
    /// one is chosen without a name.
    async fn several(&self) -> Result<Option<Vec<String>>, ErrorData> {
        match self.backend().choose(None).await {
            Ok(_) => Ok(None),
            Err(message) => {
                let found = tokio::task::spawn_blocking(crate::instances::running)
                    .await
                    .unwrap_or_default();
                let mut ports = Vec::new();
                for d in found {
                    let p = d.port.to_string();
                    if self.backend().choose(Some(&p)).await.is_ok() {
                        ports.push(p);
                    }
                }
                if ports.is_empty() {
                    return Err(ErrorData::internal_error(message, None));
                }
                Ok(Some(ports))
            }
        }
    }

    pub(crate) async fn resource_list(
        &self,
        request: Option<PaginatedRequestParams>,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        let cursor = request.and_then(|r| r.cursor);
        if let Some(ports) = self.several().await? {
            let resources = ports
                .iter()
                .map(|p| {
                    Resource::new(with_instance("blender://scene".into(), Some(p)), "scene")
                        .with_title(format!("Scene of the Blender on port {p}"))
                        .with_mime_type(MIME)
                })
                .collect();
            return Ok(ListResourcesResult::with_all_items(resources));
        }
        let at = self
            .backend()
            .choose(None)
            .await
            .map_err(|m| ErrorData::internal_error(m, None))?;
        let mut out = Vec::new();
        let (mut kind, mut offset) = match cursor.as_deref() {
            None => {
                // What this listing reflects (taken first: a change while it is paged is told).
                let key = self.list_key().await;
                *self.resources_seen.0.lock() = Some(key);
                out.push(
                    Resource::new("blender://scene", "scene")
                        .with_title("Scene summary")
                        .with_mime_type(MIME),
                );
                (0, 0)
            }
            Some(c) => parse_cursor(c).ok_or_else(|| {
                ErrorData::invalid_params(
                    format!("bad cursor {c:?}: pass the nextCursor of a previous resources/list"),
                    None,
                )
            })?,
        };
        while out.len() < PAGE && kind < KINDS.len() {
            let (list_type, uri_kind) = KINDS[kind];
            let mut p = Map::new();
            p.insert("type".into(), json!(list_type));
            p.insert("limit".into(), json!(PAGE - out.len()));
            p.insert("offset".into(), json!(offset));
            let r = self
                .backend()
                .call(&at, "list_datablocks", p, None, None, &ctx.ct)
                .await
                .map_err(|e| call_failed(&e))?;
            let names: Vec<&str> = r
                .get("names")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let total = r
                .get("total")
                .and_then(Value::as_u64)
                .and_then(|t| usize::try_from(t).ok())
                .unwrap_or(0);
            for name in &names {
                out.push(
                    Resource::new(uri(uri_kind, name, None), *name)
                        .with_title(format!("{uri_kind} {name}"))
                        .with_mime_type(MIME),
                );
            }
            offset += names.len();
            if offset >= total || names.is_empty() {
                kind += 1;
                offset = 0;
            }
        }
        let mut result = ListResourcesResult::with_all_items(out);
        if kind < KINDS.len() {
            result.next_cursor = Some(format!("{}:{offset}", KINDS[kind].0));
        }
        Ok(result)
    }

    pub(crate) async fn resource_read(
        &self,
        uri_text: &str,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<ReadResourceResult, ErrorData> {
        let parsed = parse(uri_text).map_err(|m| ErrorData::resource_not_found(m, None))?;
        let at: Chosen = self
            .backend()
            .choose(parsed.instance.as_deref())
            .await
            .map_err(|m| ErrorData::invalid_params(m, None))?;
        let (command, params) = match &parsed.target {
            Target::Scene => ("get_scene_info", {
                let mut p = Map::new();
                p.insert("summary".into(), Value::Bool(true));
                p
            }),
            Target::Named(kind, name) => {
                let mut p = Map::new();
                p.insert("name".into(), Value::String(name.clone()));
                (
                    match *kind {
                        "object" => "get_object_info",
                        "material" => "get_material_info",
                        _ => "get_collection_info",
                    },
                    p,
                )
            }
        };
        match self
            .backend()
            .call(&at, command, params, None, None, &ctx.ct)
            .await
        {
            Ok(v) => Ok(json_contents(uri_text, &v)),
            Err(e) => Err(match is_not_found(&e) {
                Some(m) => ErrorData::resource_not_found(
                    format!("no such resource {uri_text:?}: {m}"),
                    Some(json!({ "uri": uri_text })),
                ),
                None => call_failed(&e),
            }),
        }
    }

    /// 2025-era sessions: watch from `initialized` until the session's transport closes.
    pub(crate) fn watch_session(&self, peer: Peer<RoleServer>) {
        let me = self.clone();
        tokio::spawn(async move {
            me.watch(Notifier::Peer(peer), CancellationToken::new())
                .await;
        });
    }

    /// 2026-07-28: the filter we honour on `subscriptions/listen` (resources' list changes only).
    pub(crate) fn subscription_filter(
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        (requested.resources_list_changed == Some(true)).then(|| {
            SubscriptionFilter::builder()
                .resources_list_changed()
                .build()
        })
    }

    /// 2026-07-28: watch while the subscription is open.
    pub(crate) async fn watch_subscription(&self, context: SubscriptionContext) {
        let stop = context.request_context().ct.clone();
        if context.accepted().resources_list_changed == Some(true) {
            self.watch(Notifier::Sink(context.sink().clone()), stop)
                .await;
        } else {
            context.cancelled().await;
        }
    }

    /// What the resource list depends on now: the chosen instance's identity and `scene_generation`, or
    /// the set of instances when several run, or "unreachable".
    async fn list_key(&self) -> Value {
        #[allow(clippy::single_match_else)] // two ways the list is made, side by side
        match self.backend().choose(None).await {
            Ok(at) => {
                let status = self
                    .backend()
                    .call(
                        &at,
                        "get_status",
                        Map::new(),
                        Some(Duration::from_secs(5)),
                        None,
                        &CancellationToken::new(),
                    )
                    .await;
                match status {
                    Ok(s) => json!([
                        at.addr,
                        s.get("pid"),
                        s.get("started_at"),
                        s.get("scene_generation")
                    ]),
                    Err(_) => json!([at.addr, "unreachable"]),
                }
            }
            Err(_) => {
                let mut ports: Vec<u16> = tokio::task::spawn_blocking(crate::instances::running)
                    .await
                    .unwrap_or_default()
                    .iter()
                    .map(|d| d.port)
                    .collect();
                ports.sort_unstable();
                json!(["several", ports])
            }
        }
    }

    /// Until `stop` or the session ends: every [`POLL`] (at once after `execute_blender_code`), compare what
    /// the list depends on with what the session last saw; when they differ, send `list_changed` (at
    /// most one per [`DEBOUNCE`]: later changes wait for the window's end and go out as one) and take the
    /// new state as seen.
    async fn watch(&self, to: Notifier, stop: CancellationToken) {
        let first = self.list_key().await;
        self.resources_seen.0.lock().get_or_insert(first);
        let mut sent: Option<Instant> = None;
        let mut pending = false;
        loop {
            // A change is waiting out the debounce window: wake at its end (still looking meanwhile).
            let wait = match (pending, sent) {
                (true, Some(t)) => DEBOUNCE.saturating_sub(t.elapsed()).min(POLL),
                _ => POLL,
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = CODE_RAN.notified() => {}
                () = stop.cancelled() => return,
            }
            if to.closed() {
                return;
            }
            let key = self.list_key().await;
            pending = self.resources_seen.0.lock().as_ref() != Some(&key);
            if pending && sent.is_none_or(|t| t.elapsed() >= DEBOUNCE) {
                if !to.send().await {
                    return;
                }
                *self.resources_seen.0.lock() = Some(key);
                sent = Some(Instant::now());
                pending = false;
            }
        }
    }
}

/// Where a watcher sends `list_changed`.
enum Notifier {
    Peer(Peer<RoleServer>),
    Sink(SubscriptionSink),
}

impl Notifier {
    fn closed(&self) -> bool {
        match self {
            Self::Peer(p) => p.is_transport_closed(),
            Self::Sink(_) => false,
        }
    }

    /// False once the session or subscription is gone.
    async fn send(&self) -> bool {
        match self {
            Self::Peer(p) => p.notify_resource_list_changed().await.is_ok(),
            Self::Sink(s) => s.notify_resource_list_changed().await.is_ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_uris() {
        for name in [
            "Cube",
            "My Cube.001",
            "a/b?c#d%e&f=g",
            "Würfel ✓ 立方体",
            "+ ~_-.",
        ] {
            let u = uri("object", name, None);
            assert!(u.is_ascii(), "{u}");
            assert_eq!(
                parse(&u),
                Ok(ParsedUri {
                    target: Target::Named("object", name.into()),
                    instance: None
                }),
                "{u}"
            );
        }
        assert_eq!(uri("object", "My Cube", None), "blender://object/My%20Cube");
        let p = parse(&uri("material", "M/1", Some("41235"))).unwrap();
        assert_eq!(p.instance.as_deref(), Some("41235"));
        assert_eq!(p.target, Target::Named("material", "M/1".into()));
        // Unencoded Unicode and a raw slash are taken as they are.
        assert_eq!(
            parse("blender://collection/Küche/1").unwrap().target,
            Target::Named("collection", "Küche/1".into())
        );
        assert_eq!(parse("blender://scene").unwrap().target, Target::Scene);
    }

    #[test]
    fn bad_uris_say_what_is_allowed() {
        for bad in [
            "file:///x",
            "blender://mesh/Cube",
            "blender://object/",
            "blender://object/%zz",
            "blender://object/%FF",
            "blender://scene?port=1",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(
                e.contains(bad) || e.contains("percent") || e.contains("UTF-8"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn cursors() {
        assert_eq!(parse_cursor("objects:100"), Some((0, 100)));
        assert_eq!(parse_cursor("collections:0"), Some((2, 0)));
        assert_eq!(parse_cursor("objects:-1"), None);
        assert_eq!(parse_cursor("meshes:1"), None);
        assert_eq!(parse_cursor("garbage"), None);
    }

    #[test]
    fn templates_are_the_four_names() {
        let t: Vec<String> = templates().into_iter().map(|t| t.uri_template).collect();
        assert_eq!(
            t,
            [
                "blender://scene",
                "blender://object/{name}",
                "blender://material/{name}",
                "blender://collection/{name}"
            ]
        );
    }
}
