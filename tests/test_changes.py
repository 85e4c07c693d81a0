"""`execute_code` reports what the code changed (`changes`: added, removed, renamed, modified, data), over
real sockets against a real headless Blender: each kind of change is seen, a no-op reports nothing, the
lists are bounded with totals, an error still reports what changed before it, `changes: false` turns it
off, and the replies of the original protocol's clients keep their exact shape."""

from __future__ import annotations

import itertools
import json
import subprocess

import anyio
import pytest
from helpers import Conn, err, ok

_ids = itertools.count(1)


@pytest.fixture(scope="module")
def conn(served):
    with Conn(served.port) as c:
        yield c


def run(conn: Conn, code: str, **params) -> dict:
    """execute_code as our clients send it (framed: with an id); the whole reply."""
    rid = next(_ids)
    conn.send({"type": "execute_code", "params": {"code": code, **params}, "id": rid})
    reply = conn.reply()
    assert reply.get("id") == rid, reply
    return reply


def changes(conn: Conn, code: str) -> dict:
    result = ok(run(conn, code))
    assert "changes" in result, result
    return result["changes"]


def entry(ch: dict, name: str) -> dict:
    found = [e for e in ch["modified"] if e["name"] == name]
    assert len(found) == 1, ch
    return found[0]


SETUP = """
import bpy
mesh = bpy.data.meshes.new("{n}_mesh")
obj = bpy.data.objects.new("{n}", mesh)
bpy.context.scene.collection.objects.link(obj)
"""


def make(conn: Conn, name: str) -> None:
    ok(run(conn, SETUP.format(n=name), changes=False))


def test_a_no_op_reports_empty_changes(conn):
    ch = changes(conn, "x = 1")
    assert ch == {"added": [], "removed": [], "renamed": [], "modified": [], "data": {}}


def test_added_object_and_its_data_block(conn):
    ch = changes(conn, SETUP.format(n="Added1"))
    assert {"name": "Added1", "type": "MESH"} in ch["added"]
    assert ch["removed"] == [] and ch["renamed"] == []
    assert "Added1_mesh" in ch["data"]["meshes"]["added"]
    before, after = ch["data"]["meshes"]["count"]
    assert after == before + 1


def test_removed_object_and_data_block(conn):
    make(conn, "Gone1")
    ch = changes(
        conn,
        "m = bpy.data.objects['Gone1'].data\nbpy.data.objects.remove(bpy.data.objects['Gone1'])\n"
        "bpy.data.meshes.remove(m)",
    )
    assert ch["removed"] == [{"name": "Gone1", "type": "MESH"}]
    assert ch["added"] == []
    assert ch["data"]["meshes"]["removed"] == ["Gone1_mesh"]


def test_renamed_object_is_one_rename_not_a_removal_and_an_addition(conn):
    make(conn, "Old1")
    ch = changes(conn, "bpy.data.objects['Old1'].name = 'New1'")
    assert ch["renamed"] == [{"from": "Old1", "to": "New1"}]
    assert ch["added"] == [] and ch["removed"] == [] and ch["modified"] == []


def test_deleting_an_object_then_adding_another_is_not_a_rename(conn):
    # The new object often gets the removed one's memory; by address alone it would look like a rename.
    make(conn, "Reuse1")
    ch = changes(
        conn,
        "bpy.data.objects.remove(bpy.data.objects['Reuse1'])\n"
        "o = bpy.data.objects.new('Reuse2', bpy.data.meshes.new('Reuse2_mesh'))\n"
        "bpy.context.scene.collection.objects.link(o)",
    )
    assert ch["renamed"] == [], ch
    assert ch["removed"] == [{"name": "Reuse1", "type": "MESH"}]
    assert ch["added"] == [{"name": "Reuse2", "type": "MESH"}]


def test_transform_changes_with_before_and_after(conn):
    make(conn, "Move1")
    ch = changes(
        conn,
        "o = bpy.data.objects['Move1']\no.location = (1, 2, 3)\no.rotation_euler.z = 0.5\no.scale.x = 2",
    )
    e = entry(ch, "Move1")
    assert e["location"] == [[0, 0, 0], [1, 2, 3]]
    assert e["rotation_euler"][0] == [0, 0, 0] and e["rotation_euler"][1][2] == pytest.approx(0.5)
    assert e["scale"] == [[1, 1, 1], [2, 1, 1]]
    assert set(e) == {"name", "location", "rotation_euler", "scale"}


def test_visibility_changes(conn):
    make(conn, "Vis1")
    make(conn, "Vis2")
    ch = changes(
        conn,
        "bpy.data.objects['Vis1'].hide_set(True)\nbpy.data.objects['Vis2'].hide_render = True\n",
    )
    assert entry(ch, "Vis1") == {"name": "Vis1", "visible": [True, False]}
    assert entry(ch, "Vis2") == {"name": "Vis2", "hide_render": [False, True]}
    ch = changes(conn, "bpy.data.objects['Vis2'].hide_viewport = True")
    assert entry(ch, "Vis2") == {"name": "Vis2", "hide_viewport": [False, True], "visible": [True, False]}


def test_parent_change(conn):
    make(conn, "Parent1")
    make(conn, "Child1")
    ch = changes(conn, "bpy.data.objects['Child1'].parent = bpy.data.objects['Parent1']")
    assert entry(ch, "Child1") == {"name": "Child1", "parent": [None, "Parent1"]}
    # The parent is named as it was before, even when the same code renames it.
    ch = changes(
        conn,
        "bpy.data.objects['Parent1'].name = 'Parent2'\nbpy.data.objects['Child1'].parent = None",
    )
    assert entry(ch, "Child1") == {"name": "Child1", "parent": ["Parent1", None]}
    assert ch["renamed"] == [{"from": "Parent1", "to": "Parent2"}]


def test_material_change_and_new_material_data_block(conn):
    make(conn, "Mat1")
    ch = changes(
        conn,
        "m = bpy.data.materials.new('Mat1_red')\nbpy.data.objects['Mat1'].data.materials.append(m)",
    )
    assert entry(ch, "Mat1") == {"name": "Mat1", "materials": [[], ["Mat1_red"]]}
    assert ch["data"]["materials"]["added"] == ["Mat1_red"]


def test_modifier_change(conn):
    make(conn, "Mod1")
    ch = changes(conn, "bpy.data.objects['Mod1'].modifiers.new('Smooth', 'SUBSURF')")
    assert entry(ch, "Mod1") == {"name": "Mod1", "modifiers": [[], [["Smooth", "SUBSURF"]]]}
    ch = changes(conn, "o = bpy.data.objects['Mod1']\no.modifiers.remove(o.modifiers['Smooth'])")
    assert entry(ch, "Mod1") == {"name": "Mod1", "modifiers": [[["Smooth", "SUBSURF"]], []]}


def test_other_data_blocks_added_per_type(conn):
    ch = changes(
        conn,
        "bpy.data.images.new('Img1', 4, 4)\nbpy.data.node_groups.new('Ng1', 'GeometryNodeTree')\n"
        "bpy.data.collections.new('Coll1')",
    )
    assert ch["data"]["images"]["added"] == ["Img1"]
    assert ch["data"]["node_groups"]["added"] == ["Ng1"]
    assert ch["data"]["collections"]["added"] == ["Coll1"]
    assert ch["added"] == [] and ch["modified"] == []


def test_lists_are_bounded_with_totals(conn):
    code = (
        "mesh = bpy.data.meshes.new('Many_mesh')\n"
        "for i in range(200):\n"
        "    bpy.context.scene.collection.objects.link(bpy.data.objects.new(f'Many{i:03d}', mesh))\n"
    )
    reply = run(conn, code)
    ch = ok(reply)["changes"]
    assert len(ch["added"]) == 50 and ch["added_total"] == 200
    assert all(e["type"] == "MESH" and e["name"].startswith("Many") for e in ch["added"])
    assert "removed_total" not in ch
    ch = changes(conn, "for o in bpy.data.objects:\n    if o.name.startswith('Many'): o.location.z = 5")
    assert len(ch["modified"]) == 50 and ch["modified_total"] == 200
    ch = changes(
        conn, "for o in list(bpy.data.objects):\n    if o.name.startswith('Many'): bpy.data.objects.remove(o)"
    )
    assert len(ch["removed"]) == 50 and ch["removed_total"] == 200
    # A list cut at 50 keeps the reply small.
    assert len(json.dumps(ch)) < 8192


def test_error_still_reports_what_changed_before_it(conn):
    reply = run(conn, SETUP.format(n="Half1") + "bpy.data.objects['Half1'].location.x = 4\n1 / 0\n")
    assert "ZeroDivisionError" in err(reply)
    assert reply["ran"] is True
    assert {"name": "Half1", "type": "MESH"} in reply["changes"]["added"]


def test_result_that_cannot_be_converted_still_reports_changes(conn):
    code = (
        SETUP.format(n="Conv1")
        + "class Bad:\n    def __repr__(self): raise ValueError('no')\nresult = Bad()\n"
    )
    reply = run(conn, code)
    assert "could not be converted" in err(reply)
    assert reply["ran"] is True
    assert {"name": "Conv1", "type": "MESH"} in reply["changes"]["added"]


def test_result_the_native_conversion_refuses_still_reports_changes(conn):
    # A dict key whose str() raises: only the native conversion (src/convert.rs) meets it.
    code = (
        SETUP.format(n="Conv2")
        + "class Bad:\n    def __str__(self): raise ValueError('no')\nresult = {Bad(): 1}\n"
    )
    reply = run(conn, code)
    assert "could not be converted" in err(reply)
    assert reply["ran"] is True
    assert {"name": "Conv2", "type": "MESH"} in reply["changes"]["added"], reply


def test_changes_false_omits_it(conn):
    result = ok(run(conn, SETUP.format(n="Off1"), changes=False))
    assert "changes" not in result
    reply = run(conn, "1/0", changes=False)
    assert "changes" not in reply


@pytest.mark.parametrize("bad", [1, "yes", [], {"limit": 3}])
def test_changes_must_be_a_bool(conn, bad):
    message = err(run(conn, "print('never')", changes=bad))
    assert message.startswith("changes must be true or false"), message


def test_plain_requests_keep_the_original_shape_unless_they_ask(served):
    # blender-mcp's clients send no id: their reply keeps exactly the fields it had.
    with Conn(served.port) as c:
        result = ok(c.request("execute_code", code="print('hi')"))
        assert set(result) == {"executed", "result", "output", "duration"}, result
        result = ok(c.request("execute_code", code="pass", changes=True))
        assert result["changes"]["added"] == []
        # blender-remote's legacy form: exactly its three fields.
        c.send({"code": "print('legacy')", "message": "m"})
        reply = c.reply()
        assert reply == {"response": "OK", "message": "Code executed successfully", "output": "legacy\n"}
        c.send({"code": "1/0"})
        reply = c.reply()
        assert reply["response"] == "FAILED" and "changes" not in reply


def test_framed_reply_keeps_every_existing_field(conn):
    result = ok(run(conn, "print('x')\nresult = [1]", return_as_base64=True))
    assert result["executed"] is True and result["result_is_base64"] is True
    assert result["output"] == {"stdout": "x\n", "stderr": ""}
    assert result["value"] == [1] and isinstance(result["duration"], float)
    assert set(result) == {"executed", "result", "result_is_base64", "output", "duration", "value", "changes"}


def test_jobs_report_changes_when_submitted_framed_and_only_then(conn):
    rid = next(_ids)
    conn.send({"type": "submit_code_job", "params": {"code": SETUP.format(n="Job1")}, "id": rid})
    job = ok(conn.reply())["job_id"]
    conn.send(
        {"type": "get_job_result", "params": {"job_id": job, "wait_timeout_seconds": 60}, "id": rid + 1000}
    )
    r = ok(conn.reply())
    assert r["status"] == "completed", r
    assert {"name": "Job1", "type": "MESH"} in r["result"]["changes"]["added"], r
    # blender-remote's clients submit without an id: their job results keep the shape they had.
    conn.send({"type": "submit_code_job", "params": {"code": SETUP.format(n="Job2")}})
    job = ok(conn.reply())["job_id"]
    conn.send({"type": "get_job_result", "params": {"job_id": job, "wait_timeout_seconds": 60}})
    r = ok(conn.reply())
    assert r["status"] == "completed" and "changes" not in r["result"], r


def test_python_client_asks_for_changes_only_when_told(installed, served):
    """`Client.execute` and `Client.submit` send `changes: false` unless `changes=True`: nobody pays for a diff
    that is not read. Asked for, it is on the ExecResult (and the Job's). Run by the installed package."""
    code = f"""
import json
from bld_remote import Client
setup = {SETUP!r}
out = {{}}
with Client(port={served.port}, timeout=60) as c:
    r = c.execute(setup.format(n="ClientQuiet") + "result = 1")
    out["quiet"] = [r.result, r.changes, r["changes"]]
    r = c.execute(setup.format(n="ClientAsked"), changes=True)
    out["asked"], out["same"] = r.changes, r["changes"] == r.changes
    out["job_quiet"] = c.submit(setup.format(n="JobQuiet")).result(timeout=60).changes
    out["job_asked"] = c.submit(setup.format(n="JobAsked"), changes=True).result(timeout=60).changes
    try:
        c.execute("pass", changes="yes")
    except TypeError as e:
        out["bad"] = str(e)
print(json.dumps(out))
"""
    p = subprocess.run(
        [str(installed / "python"), "-P", "-c", code], capture_output=True, text=True, timeout=180
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["quiet"] == [1, None, None], out
    assert {"name": "ClientAsked", "type": "MESH"} in out["asked"]["added"] and out["same"], out
    assert out["job_quiet"] is None, out
    assert {"name": "JobAsked", "type": "MESH"} in out["job_asked"]["added"], out
    assert "bool" in out["bad"], out


# --- MCP: execute_blender_code shows the changes ----------------------------------------------------------

mcp = pytest.importorskip("mcp")
from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402


def test_mcp_execute_blender_code_shows_what_changed(served):
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("bld-remote")
    assert exe.exists(), f"{exe} missing: pip install the built wheel into this venv"
    params = StdioServerParameters(command=str(exe), args=["mcp", "--port", str(served.port)])

    def text(r) -> str:
        return "\n".join(c.text for c in r.content if c.type == "text")

    async def main() -> None:
        async with Client(params, mode="legacy") as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert tools["execute_blender_code"].input_schema["properties"]["changes"]["type"] == [
                "boolean",
                "null",
            ]
            r = await client.call_tool("execute_blender_code", {"code": SETUP.format(n="McpObj")})
            assert not r.is_error, text(r)
            assert "Changes:\n+ McpObj (MESH)" in text(r), text(r)
            assert "data meshes" in text(r) and "+McpObj_mesh" in text(r), text(r)
            assert {"name": "McpObj", "type": "MESH"} in r.structured_content["changes"]["added"]
            assert "result" not in r.structured_content and "output" in r.structured_content
            r = await client.call_tool(
                "execute_blender_code", {"code": "bpy.data.objects['McpObj'].location.x = 2"}
            )
            assert "~ McpObj: location [0, 0, 0] -> [2, 0, 0]" in text(r), text(r)
            r = await client.call_tool("execute_blender_code", {"code": "x = 1"})
            assert "Changes: none in the scene." in text(r), text(r)
            r = await client.call_tool("execute_blender_code", {"code": "x = 1", "changes": False})
            assert "Changes" not in text(r) and "changes" not in r.structured_content, text(r)
            r = await client.call_tool(
                "execute_blender_code", {"code": "bpy.data.objects['McpObj'].name = 'McpObj2'\n1/0"}
            )
            assert r.is_error
            assert "Changes before the error:\n> McpObj renamed to McpObj2" in text(r), text(r)

    anyio.run(main)
