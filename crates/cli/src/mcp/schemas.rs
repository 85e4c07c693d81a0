//! Output schemas (`outputSchema` in tools/list) of the tools whose result is JSON. Such a tool answers
//! with `CallToolResult::structured(value)`: `structuredContent` (checked by clients against the schema
//! here) plus a text copy of the same JSON for clients that read only `content`.
//!
//! A tool gets its schema with one arm in [`output_schema`]; [`apply`] (called in `BlenderMcp::new`) puts
//! each on its tool. The schemas are short on purpose: tools/list has a 16 KiB budget (see
//! tests/test_mcp_budget.py), so they name the fields a client can rely on, with their types, and leave
//! the rest open (no `additionalProperties: false`: a new field is not a breaking change). The root is
//! always `{"type": "object"}`: clients of the 2025-11-25 revision accept nothing else.

use std::sync::Arc;

use rmcp::handler::server::router::tool::ToolRouter;
use serde_json::{json, Value};

/// The output schema of `tool`, if its result is JSON.
pub fn output_schema(tool: &str) -> Option<Value> {
    let s = match tool {
        "list_instances" => json!({"type": "object",
            "properties": {"instances": {"type": "array", "items": {"type": "object"}},
                           "pinned": {"type": "string"}},
            "required": ["instances"]}),
        "check_connection_status" => json!({"type": "object",
            "properties": {"connected": {"type": "boolean"}, "address": {"type": "string"},
                           "reason": {"type": "string"}},
            "required": ["connected", "address"]}),
        "get_scene_info" => json!({"type": "object",
            "properties": {"name": {"type": "string"},
                           "objects": {"type": "array", "items": {"type": "object"}}}}),
        "get_object_info" => json!({"type": "object",
            "properties": {"name": {"type": "string"}, "type": {"type": "string"}},
            "required": ["name"]}),
        "get_persist_data" => json!({"type": "object",
            "properties": {"data": {}, "found": {"type": "boolean"}},
            "required": ["data", "found"]}),
        "remove_persist_data" => json!({"type": "object",
            "properties": {"removed": {"type": "boolean"}}, "required": ["removed"]}),
        // The execute_code reply without `result` (see tools::exec_structured); `job_id` when it ran as a
        // task, `changes` unless turned off.
        "execute_blender_code" => json!({"type": "object",
            "properties": {"executed": {"type": "boolean"},
                           "output": {"type": "object",
                                      "properties": {"stdout": {"type": "string"},
                                                     "stderr": {"type": "string"}}},
                           "value": {}, "duration": {"type": "number"},
                           "changes": {"type": "object"}, "job_id": {"type": "string"}},
            "required": ["output"]}),
        // The file's metadata (the file itself is an embedded resource in `content`).
        "export_scene" => json!({"type": "object",
            "properties": {"filepath": {"type": "string"}, "bytes": {"type": "integer"},
                           "format": {"type": "string"}, "exporter": {"type": "string"},
                           "files": {"type": "array", "items": {"type": "string"}}},
            "required": ["filepath", "bytes", "format"]}),
        "lookup_bpy_api" => super::lookup::output_schema(),
        _ => return None,
    };
    Some(s)
}

/// Put each tool's [`output_schema`] on it (a schema its `#[tool]` attribute already set is kept).
pub fn apply<S>(router: &mut ToolRouter<S>) {
    for route in router.map.values_mut() {
        if route.attr.output_schema.is_none() {
            if let Some(Value::Object(s)) = output_schema(&route.attr.name) {
                route.attr.output_schema = Some(Arc::new(s));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_is_an_object_schema_and_small() {
        for name in [
            "list_instances",
            "check_connection_status",
            "get_scene_info",
            "get_object_info",
            "get_persist_data",
            "remove_persist_data",
            "execute_blender_code",
            "export_scene",
        ] {
            let s = output_schema(name).unwrap();
            assert_eq!(s["type"], json!("object"), "{name}");
            let n = s.to_string().len();
            assert!(n < 300, "{name}: {n} bytes");
            for r in s
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let r = r.as_str().unwrap();
                assert!(s["properties"].get(r).is_some(), "{name}: {r}");
            }
        }
        assert!(output_schema("render_image").is_none());
    }
}
