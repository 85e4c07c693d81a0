//! The `export_scene` MCP tool: the scene (or named objects) written by Blender's own exporter as glb,
//! gltf, fbx, obj or usd (the wire command `export_scene`, bld_remote/export.py). Returns the file's path
//! and, when small, the file itself as an embedded resource (a base64 blob). Runs as a task on the tokio
//! runtime of `bld-remote mcp`, like the tools in [`super::tools`].

// Doc comments here are user-facing text (JSON-schema descriptions the model reads).
#![allow(clippy::doc_markdown)]

use std::fmt::Write as _;

use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, ResourceContents};
use rmcp::schemars::{self, JsonSchema};
use rmcp::service::RequestContext;
use rmcp::{tool, tool_router, ErrorData, RoleServer};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::tools::{call_error_result, BlenderMcp, Instance};

/// File format.
// Inlined in the schema (no $defs): tools/list has a size budget.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[schemars(inline)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[serde(alias = "GLB")]
    Glb,
    #[serde(alias = "GLTF")]
    Gltf,
    #[serde(alias = "FBX")]
    Fbx,
    #[serde(alias = "OBJ")]
    Obj,
    #[serde(alias = "USD")]
    Usd,
}

impl Format {
    fn wire(self) -> &'static str {
        match self {
            Self::Glb => "glb",
            Self::Gltf => "gltf",
            Self::Fbx => "fbx",
            Self::Obj => "obj",
            Self::Usd => "usd",
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ExportArgs {
    pub format: Format,
    /// Only these objects, by name (default: the whole scene).
    #[serde(default)]
    pub objects: Option<Vec<String>>,
    /// Path Blender writes to (default: a temp file).
    #[serde(default)]
    pub filepath: Option<String>,
    /// Attach the file: default if ≤ 256 KiB; true: up to 64 MiB.
    #[serde(default)]
    pub inline: Option<bool>,
    /// Which Blender: its port or id (list_instances). Needed when several run.
    #[serde(default)]
    pub instance: Option<Instance>,
}

/// The reply → what the model reads: one line with the path and size (and the other files written), and
/// the file as an embedded resource when Blender sent it inline.
fn export_result(reply: &Value) -> CallToolResult {
    let path = reply.get("filepath").and_then(Value::as_str).unwrap_or("");
    let mut text = format!(
        "Exported {} ({} bytes) to {path}",
        reply.get("format").and_then(Value::as_str).unwrap_or("?"),
        reply.get("bytes").and_then(Value::as_u64).unwrap_or(0),
    );
    if let Some(objects) = reply.get("objects").and_then(Value::as_array) {
        let names: Vec<&str> = objects.iter().filter_map(Value::as_str).collect();
        let _ = write!(text, " (objects: {})", names.join(", "));
    }
    text.push('.');
    if let Some(files) = reply.get("files").and_then(Value::as_array) {
        let names: Vec<&str> = files.iter().filter_map(Value::as_str).collect();
        let _ = write!(text, " Also written: {}.", names.join(", "));
    }
    let mut content = Vec::new();
    if let Some(blob) = reply.get("data").and_then(Value::as_str) {
        text.push_str(" The file is attached.");
        let mut r = ResourceContents::blob(blob, format!("file://{path}"));
        if let Some(mime) = reply.get("mime_type").and_then(Value::as_str) {
            r = r.with_mime_type(mime);
        }
        content.push(ContentBlock::text(text));
        content.push(ContentBlock::resource(r));
    } else {
        if let Some(e) = reply.get("inline_error").and_then(Value::as_str) {
            let _ = write!(text, " Not attached: {e}.");
        }
        content.push(ContentBlock::text(text));
    }
    let mut result = CallToolResult::success(content);
    // The metadata (path, bytes, format, mime_type, exporter, files, duration) without the bytes.
    if let Value::Object(m) = reply {
        let mut meta = m.clone();
        meta.remove("data");
        result.structured_content = Some(Value::Object(meta));
    }
    result
}

#[tool_router(router = export_router, vis = "pub(crate)")]
impl BlenderMcp {
    #[tool(
        description = "Export the scene or named objects with Blender's exporter (glb, gltf, fbx, obj, \
                       usd). Returns the file's path and, when small, the file. The scene is left as it was.",
        annotations(
            title = "Export scene",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn export_scene(
        &self,
        Parameters(a): Parameters<ExportArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let at = match self.at(a.instance.as_ref()).await {
            Ok(at) => at,
            Err(e) => return Ok(e),
        };
        let mut params = Map::new();
        params.insert("format".into(), json!(a.format.wire()));
        if let Some(objects) = a.objects {
            params.insert("objects".into(), json!(objects));
        }
        if let Some(path) = a.filepath {
            params.insert("filepath".into(), json!(path));
        }
        // Blender on another machine: its file is not readable here, so ask for it inline.
        match a.inline {
            Some(inline) => {
                params.insert("inline".into(), json!(inline));
            }
            None if !at.is_local() => {
                params.insert("inline".into(), json!(true));
            }
            None => {}
        }
        Ok(
            match self
                .backend
                .call(&at, "export_scene", params, None, None, &ctx.ct)
                .await
            {
                Ok(reply) => export_result(&reply),
                Err(e) => call_error_result(&e),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Its share of tools/list stays small (issue 16: the whole list ≤ 16 KiB; ~1.2 KB per new tool).
    #[test]
    fn the_tool_is_listed_small_with_truthful_annotations() {
        let tools = BlenderMcp::export_router().list_all();
        assert_eq!(tools.len(), 1);
        let json = serde_json::to_string(&tools[0]).unwrap_or_default();
        let size = json.len();
        eprintln!("export_scene in tools/list: {size} bytes: {json}");
        assert!(size < 1200, "{size}");
        let a = tools[0].annotations.clone().unwrap_or_default();
        assert_eq!(a.read_only_hint, Some(false));
        assert_eq!(a.destructive_hint, Some(false));
        let required = tools[0].input_schema.get("required").cloned();
        assert_eq!(required, Some(json!(["format"])));
    }

    #[test]
    fn small_files_come_as_an_embedded_blob_and_big_ones_as_a_path() {
        let r = export_result(
            &json!({"filepath": "/tmp/x/scene.glb", "bytes": 4, "format": "glb",
                                      "mime_type": "model/gltf-binary", "data": "Z2xURg=="}),
        );
        let v = serde_json::to_value(&r).unwrap_or_default();
        assert_eq!(v["content"][1]["resource"]["blob"], json!("Z2xURg=="));
        assert_eq!(
            v["content"][1]["resource"]["uri"],
            json!("file:///tmp/x/scene.glb")
        );
        assert_eq!(
            v["content"][1]["resource"]["mimeType"],
            json!("model/gltf-binary")
        );
        assert!(v["structuredContent"].get("data").is_none());
        let r = export_result(
            &json!({"filepath": "/tmp/y.fbx", "bytes": 900_000, "format": "fbx",
                                      "inline_error": "too big"}),
        );
        let v = serde_json::to_value(&r).unwrap_or_default();
        assert_eq!(v["content"].as_array().map(Vec::len), Some(1));
        let text = v["content"][0]["text"].as_str().unwrap_or("");
        assert!(
            text.contains("/tmp/y.fbx") && text.contains("Not attached: too big"),
            "{text}"
        );
    }
}
