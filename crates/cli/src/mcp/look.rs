//! The `look` MCP tool: the `look` command's grid of labelled views as MCP image content (fitted to the
//! server's image byte budget), plus a text part naming each view in order. Its own router, added to the
//! server's in [`BlenderMcp::new`].

// Doc comments here are user-facing text (JSON-schema descriptions the model reads).
#![allow(clippy::doc_markdown)]

use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::schemars::{self, JsonSchema};
use rmcp::service::RequestContext;
use rmcp::{tool, tool_router, ErrorData, RoleServer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::tools::{call_error_result, error_result, BlenderMcp, Instance};

#[derive(Debug, Clone, Copy, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum View {
    Front,
    Back,
    Left,
    Right,
    Top,
    Bottom,
    Camera,
    Iso,
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Shading {
    Solid,
    Material,
    Rendered,
    Wireframe,
    Xray,
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
pub enum LookEngine {
    #[serde(rename = "WORKBENCH", alias = "workbench")]
    Workbench,
    #[serde(rename = "EEVEE", alias = "eevee")]
    Eevee,
    #[serde(rename = "CYCLES", alias = "cycles")]
    Cycles,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct LookArgs {
    /// Grid order (default front, right, top, iso, camera).
    #[serde(default)]
    pub views: Option<Vec<View>>,
    /// Objects to frame (default: all visible).
    #[serde(default)]
    pub objects: Option<Vec<String>>,
    #[serde(default)]
    pub shading: Option<Shading>,
    /// Render instead of drawing the viewport.
    #[serde(default)]
    pub engine: Option<LookEngine>,
    /// Tile side, 64-2048 (default 320).
    #[serde(default, deserialize_with = "size")]
    #[schemars(range(min = 64, max = 2048))]
    pub size: Option<u32>,
    /// Keep the full-size PNG; give its path.
    #[serde(default)]
    pub keep_file: bool,
    /// Which Blender: its port or id (list_instances). Needed when several run.
    #[serde(default)]
    pub instance: Option<Instance>,
}

const SIZE_MIN: u32 = 64;
const SIZE_MAX: u32 = 2048;

/// `size`: an optional whole number from 64 to 2048 (an integral float counts), checked where it enters.
fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let n = v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..=f64::from(SIZE_MAX)).contains(f))
            .map(|f| {
                // In range and integral (checked just above): the cast is exact.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let n = f as u64;
                n
            })
    });
    match n
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| (SIZE_MIN..=SIZE_MAX).contains(n))
    {
        Some(n) => Ok(Some(n)),
        None => Err(serde::de::Error::custom(format!(
            "size must be a whole number from {SIZE_MIN} to {SIZE_MAX}, got {v}"
        ))),
    }
}

fn to_value<T: serde::Serialize>(v: T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

impl Shading {
    fn wire(self) -> &'static str {
        match self {
            Self::Solid => "solid",
            Self::Material => "material",
            Self::Rendered => "rendered",
            Self::Wireframe => "wireframe",
            Self::Xray => "xray",
        }
    }
}

impl LookEngine {
    fn wire(self) -> &'static str {
        match self {
            Self::Workbench => "WORKBENCH",
            Self::Eevee => "EEVEE",
            Self::Cycles => "CYCLES",
        }
    }
}

#[tool_router(router = look_router, vis = "pub(crate)")]
impl BlenderMcp {
    #[tool(
        description = "Labelled views of the scene or of named objects, framed to fit, in one image, with \
                       a text naming them in order. Works headless. Leaves the scene unchanged.",
        annotations(
            title = "Look at the scene",
            read_only_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn look(
        &self,
        Parameters(a): Parameters<LookArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let mut params = Map::new();
        if let Some(v) = a.views {
            params.insert("views".into(), to_value(v));
        }
        if let Some(o) = a.objects {
            params.insert("objects".into(), json!(o));
        }
        if let Some(s) = a.shading {
            params.insert("shading".into(), json!(s.wire()));
        }
        if let Some(e) = a.engine {
            params.insert("engine".into(), json!(e.wire()));
        }
        if let Some(s) = a.size {
            params.insert("size".into(), json!(s));
        }
        let at = match self.at(a.instance.as_ref()).await {
            Ok(at) => at,
            Err(e) => return Ok(e),
        };
        // Blender on another machine: its file is not readable here, so ask for the bytes inline.
        params.insert("inline".into(), json!(!at.is_local()));
        params.insert("keep_file".into(), json!(a.keep_file));
        let reply = match self.with_progress(&at, "look", params, &ctx).await {
            Ok(v) => v,
            Err(e) => return Ok(call_error_result(&e)),
        };
        let bytes = match Self::image_bytes(&reply).await {
            Ok(b) => b,
            Err(e) => return Ok(error_result(e)),
        };
        let text = reply
            .get("text")
            .and_then(Value::as_str)
            .unwrap_or("The views.")
            .to_string();
        Ok(self.image_result(bytes, text).await)
    }
}
