//! The `lookup_bpy_api` MCP tool: the bpy API of the running Blender, from its own RNA (the wire command
//! `lookup_bpy_api`, bld_remote/api_lookup.py). Runs as a task on the tokio runtime of `bld-remote mcp`,
//! like the tools in [`super::tools`].

// Doc comments here are user-facing text (JSON-schema descriptions the model reads).
#![allow(clippy::doc_markdown)]

use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::schemars::{self, JsonSchema};
use rmcp::service::RequestContext;
use rmcp::{tool, tool_router, ErrorData, RoleServer};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::tools::{call_error_result, BlenderMcp, Instance};

#[derive(Debug, Deserialize, JsonSchema)]
pub struct LookupArgs {
    /// bpy.types.Object, bpy.types.Object.location or bpy.ops.mesh.primitive_cube_add.
    #[serde(default)]
    pub path: Option<String>,
    /// Or a substring of struct, property and operator names.
    #[serde(default)]
    pub search: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[serde(default)]
    pub limit: Option<Value>,
    /// Items to skip (the reply's next_offset).
    #[serde(default)]
    pub offset: Option<Value>,
    /// Which Blender: its port or id (list_instances). Needed when several run.
    #[serde(default)]
    pub instance: Option<Instance>,
}

#[tool_router(router = lookup_router, vis = "pub(crate)")]
impl BlenderMcp {
    #[tool(
        description = "The bpy API of the Blender running (its own RNA, exact for its version): a struct's \
                       properties and functions, a property's type, subtype, default, range and enum items, an \
                       operator's properties; or search names by substring.",
        annotations(
            title = "Look up the bpy API",
            read_only_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn lookup_bpy_api(
        &self,
        Parameters(a): Parameters<LookupArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let at = match self.at(a.instance.as_ref()).await {
            Ok(at) => at,
            Err(e) => return Ok(e),
        };
        let mut params = Map::new();
        for (k, v) in [
            ("path", a.path.map(Value::from)),
            ("search", a.search.map(Value::from)),
            ("limit", a.limit),
            ("offset", a.offset),
        ] {
            if let Some(v) = v {
                params.insert(k.into(), v);
            }
        }
        Ok(
            match self
                .backend
                .call(&at, "lookup_bpy_api", params, None, None, &ctx.ct)
                .await
            {
                Ok(v) => CallToolResult::structured(v),
                Err(e) => call_error_result(&e),
            },
        )
    }
}

/// Its output schema (schemas.rs).
pub fn output_schema() -> Value {
    json!({"type": "object", "properties": {"kind": {"type": "string"}, "path": {"type": "string"},
           "blender_version": {"type": "string"}}, "required": ["blender_version"]})
}
