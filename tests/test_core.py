"""The core service in a real headless Blender (Debian 3.4.1): every command over real sockets, framing,
pipelining with ids, error replies, and a clean exit on server_shutdown, SIGTERM and SIGINT."""

from __future__ import annotations

import base64
import os
import re
import json
import signal
import socket
import struct
import time

import pytest
from helpers import BPY_PYTHON, Conn, call, free_port, port_is_free, ok, err


# --- commands -------------------------------------------------------------------------------------------


def test_ping_and_status(served):
    assert ok(call(served.port, "ping"))["pong"] is True
    status = ok(call(served.port, "get_status"))
    assert status["running"] is True
    assert status["port"] == served.port
    assert status["host"] == "127.0.0.1"
    assert status["mode"] == "background"
    assert status["pid"] == served.pid
    assert re.match(r"\d+\.\d+\.\d+", status["blender_version"])
    if not BPY_PYTHON:
        assert status["blender_version"].startswith("3.4")  # Debian's package
    assert status["queue_length"] == 0


def test_served_from_the_built_wheel_not_the_source_tree(served):
    code = "import os, bld_remote; print(bld_remote.__file__); print(os.environ['BLENDER_USER_SCRIPTS'])"
    module_file, user_scripts = ok(call(served.port, "execute_code", code=code))["result"].split()
    assert module_file == os.path.join(user_scripts, "addons", "bld_remote", "__init__.py")


def test_get_scene_info_default_scene(served):
    info = ok(call(served.port, "get_scene_info"))
    assert info["name"] == "Scene"
    names = {o["name"]: o for o in info["objects"]}
    assert set(names) == {"Cube", "Camera", "Light"}
    assert info["object_count"] == 3
    assert names["Cube"]["type"] == "MESH"
    assert names["Cube"]["location"] == [0.0, 0.0, 0.0]
    assert names["Cube"]["visible"] is True
    for key in ("materials_count", "frame_current", "frame_start", "frame_end"):
        assert isinstance(info[key], int)


def test_get_scene_info_lists_every_object_not_ten(served):
    with Conn(served.port) as c:
        code = "for i in range(25): bpy.ops.mesh.primitive_cube_add(location=(i, 0, 0))"
        ok(c.request("execute_code", code=code))
        try:
            info = ok(c.request("get_scene_info"))
            assert info["object_count"] == 28
            assert len(info["objects"]) == 28
            assert info["truncated"] is False
        finally:
            ok(
                c.request(
                    "execute_code",
                    code="for o in [o for o in bpy.data.objects if o.name.startswith('Cube.')]:\n"
                    "    bpy.data.objects.remove(o)",
                )
            )


def test_get_object_info(served):
    info = ok(call(served.port, "get_object_info", name="Cube"))
    assert info["name"] == "Cube" and info["type"] == "MESH"
    assert info["mesh"] == {"vertices": 8, "edges": 12, "polygons": 6}
    assert info["dimensions"] == [2.0, 2.0, 2.0]
    assert info["scale"] == [1.0, 1.0, 1.0]
    assert len(info["rotation"]) == 3
    assert info["materials"] == ["Material"]
    cam = ok(call(served.port, "get_object_info", name="Camera"))
    assert cam["type"] == "CAMERA" and "mesh" not in cam


def test_get_object_info_errors(served):
    assert "Object not found: Nope" in err(call(served.port, "get_object_info", name="Nope"))
    assert "name" in err(call(served.port, "get_object_info"))


def test_execute_code_captures_output_and_result(served):
    code = (
        "import sys\n"
        "print('hello')\n"
        "print('warn', file=sys.stderr)\n"
        "cube = bpy.data.objects['Cube']\n"
        "result = {'loc': cube.location, 'obj': cube, 'n': 3, 'mat': cube.matrix_world, 's': {1}}\n"
    )
    r = ok(call(served.port, "execute_code", code=code))
    assert r["executed"] is True
    assert r["result"] == "hello\n"
    assert r["output"] == {"stdout": "hello\n", "stderr": "warn\n"}
    assert r["value"]["loc"] == [0.0, 0.0, 0.0]
    assert r["value"]["obj"] == "Cube"
    assert r["value"]["n"] == 3
    assert r["value"]["mat"][0] == [1.0, 0.0, 0.0, 0.0]
    assert r["value"]["s"] == [1]
    assert r["duration"] >= 0


def test_execute_code_stdout_behaves_as_a_text_file(served):
    # Client code's sys.stdout is bld_remote's capture (src/py_capture.rs), not io.StringIO: it must
    # behave like one for everything client code and libraries do with stdout.
    code = (
        "import io, sys\n"
        "n = sys.stdout.write('h\\u00e9\\u20ac\\n')\n"  # 3 characters, 6 UTF-8 bytes, newline
        "sys.stdout.writelines(['a', 'b\\n'])\n"
        "print('x', 1, sep='-', flush=True)\n"
        "sys.stdout.flush()\n"
        "so_far = sys.stdout.getvalue()\n"
        "try:\n    sys.stdout.write(b'bytes')\nexcept TypeError as e:\n    bad_type = str(e)\n"
        "try:\n    sys.stdout.fileno()\nexcept io.UnsupportedOperation:\n    no_fileno = True\n"
        "sys.stdout.write('\\ud800|')\n"  # a lone surrogate: replaced, never an error
        "print('to stderr', file=sys.stderr)\n"
        "result = {'n': n, 'so_far': so_far, 'bad_type': bad_type, 'no_fileno': no_fileno,\n"
        "          'textio': isinstance(sys.stdout, io.TextIOBase), 'tty': sys.stdout.isatty(),\n"
        "          'enc': sys.stdout.encoding, 'writable': sys.stdout.writable()}\n"
        "sys.stdout.close()\n"
        "try:\n    print('after close')\nexcept ValueError:\n    pass\n"
    )
    r = ok(call(served.port, "execute_code", code=code))
    assert r["value"] == {
        "n": 4,
        "so_far": "h\u00e9\u20ac\nab\nx-1\n",
        "bad_type": "string argument expected, got 'bytes'",
        "no_fileno": True,
        "textio": True,
        "tty": False,
        "enc": "utf-8",
        "writable": True,
    }
    # Closing keeps what was written; later writes were refused. The surrogate's 3 bytes became U+FFFD
    # each (what the reply always did with one).
    assert r["result"] == "h\u00e9\u20ac\nab\nx-1\n" + "\ufffd" * 3 + "|"
    assert r["output"] == {"stdout": r["result"], "stderr": "to stderr\n"}
    # A print-heavy script: every line arrives, in order.
    r = ok(call(served.port, "execute_code", code="for i in range(100000):\n    print(i)"))
    assert r["result"] == "".join(f"{i}\n" for i in range(100000))


def test_execute_code_changes_blender_state(served):
    with Conn(served.port) as c:
        ok(c.request("execute_code", code="bpy.data.objects['Cube'].location.x = 2.5"))
        try:
            assert ok(c.request("get_object_info", name="Cube"))["location"][0] == 2.5
        finally:
            ok(c.request("execute_code", code="bpy.data.objects['Cube'].location.x = 0"))


def test_execute_code_failure_has_traceback_and_partial_output(served):
    reply = call(served.port, "execute_code", code="print('before')\nx = 1\n1/0\n")
    assert "ZeroDivisionError" in err(reply)
    assert reply["exception"] == "ZeroDivisionError"
    assert 'File "<bld_remote>", line 3' in reply["traceback"]
    assert "exec(" not in reply["traceback"]  # starts at the client's code
    assert reply["output"]["stdout"] == "before\n"


def test_execute_code_syntax_error_and_system_exit_do_not_kill_blender(served):
    assert "SyntaxError" in err(call(served.port, "execute_code", code="def (:"))
    assert "SystemExit" in err(call(served.port, "execute_code", code="import sys; sys.exit(4)"))
    assert ok(call(served.port, "ping"))["pong"] is True


def test_execute_code_base64_in_and_out(served):
    code = base64.b64encode("print('héllo ✓')".encode()).decode()
    r = ok(call(served.port, "execute_code", code=code, code_is_base64=True, return_as_base64=True))
    assert r["result_is_base64"] is True
    assert base64.b64decode(r["result"]).decode() == "héllo ✓\n"
    assert "base64" in err(call(served.port, "execute_code", code="%%%", code_is_base64=True))


def test_execute_code_bad_params(served):
    assert "code" in err(call(served.port, "execute_code"))
    assert "code" in err(call(served.port, "execute_code", code=42))


def test_legacy_code_form(served):
    with Conn(served.port) as c:
        r = c.request({"code": "print('legacy')", "message": "hi"})
        assert r == {"response": "OK", "message": "Code executed successfully", "output": "legacy\n"}
        r = c.request({"code": "print('x'); raise ValueError('nope')"})
        assert r["response"] == "FAILED" and "nope" in r["message"] and r["output"] == "x\n"


def test_persist_data(served):
    with Conn(served.port) as c:
        assert "k1" in ok(c.request("put_persist_data", key="k1", data={"a": [1, 2]}))
        assert ok(c.request("get_persist_data", key="k1")) == {"data": {"a": [1, 2]}, "found": True}
    # Shared across connections.
    assert ok(call(served.port, "get_persist_data", key="k1"))["data"] == {"a": [1, 2]}
    assert ok(call(served.port, "remove_persist_data", key="k1")) == {"removed": True}
    assert ok(call(served.port, "remove_persist_data", key="k1")) == {"removed": False}
    assert ok(call(served.port, "get_persist_data", key="k1", default=7)) == {"data": 7, "found": False}
    assert "key" in err(call(served.port, "put_persist_data", data=1))


@pytest.mark.parametrize("probe", ["polyhaven", "hyper3d", "sketchfab", "hunyuan3d"])
def test_integration_probes_answer_disabled(served, probe):
    r = ok(call(served.port, f"get_{probe}_status"))
    assert r["enabled"] is False and r["message"]


def test_unknown_command(served):
    assert err(call(served.port, "make_coffee")) == "Unknown command type: make_coffee"
    assert "type" in err(call(served.port, {"params": {}}))


# --- framing and connections ----------------------------------------------------------------------------


def test_persistent_connection_and_connection_per_request(served):
    with Conn(served.port) as c:
        for i in range(20):
            assert ok(c.request("execute_code", code=f"print({i})"))["result"] == f"{i}\n"
    for _ in range(20):
        assert ok(call(served.port, "get_scene_info"))["object_count"] == 3


def test_pipelined_requests_with_ids_in_one_write(served):
    reqs = []
    for i in range(50):
        kind = ["ping", "get_scene_info", "execute_code", "get_object_info"][i % 4]
        params = {"code": f"print({i})"} if kind == "execute_code" else {"name": "Cube"}
        reqs.append({"type": kind, "params": params, "id": i})
    with Conn(served.port) as c:
        c.send("".join(json.dumps(r) for r in reqs).encode())  # no delimiters at all
        replies = [c.reply() for _ in reqs]
    # Framed replies leave when ready (pings overtake); jobs still finish in request order.
    assert sorted(r["id"] for r in replies) == list(range(50))
    jobs = [r["id"] for r in replies if r["id"] % 4 != 0]
    assert jobs == sorted(jobs)
    for r in replies:
        i = r["id"]
        assert r["status"] == "success", r
        if i % 4 == 2:
            assert r["result"]["result"] == f"{i}\n"


def test_requests_split_into_tiny_writes_with_utf8_split(served):
    payload = json.dumps({"type": "execute_code", "params": {"code": "print('ünï😀')"}, "id": "u"}).encode()
    payload = json.dumps(
        {"type": "execute_code", "params": {"code": "print('ünï😀')"}, "id": "u"}, ensure_ascii=False
    ).encode()
    with Conn(served.port) as c:
        for i in range(len(payload)):
            c.send(payload[i : i + 1])
            time.sleep(0.001)
        r = c.reply()
    assert r["id"] == "u" and ok(r)["result"] == "ünï😀\n"


def test_newline_delimited_requests(served):
    with Conn(served.port) as c:
        c.send(b'{"type": "ping", "id": 1}\n{"type": "ping", "id": 2}\n\n')
        assert [c.reply()["id"], c.reply()["id"]] == [1, 2]


def test_malformed_json_gets_error_and_connection_survives(served):
    with Conn(served.port) as c:
        c.send(b'{"type": "ping", "params": {"x": tru}}')
        assert "malformed JSON" in err(c.reply())
        assert ok(c.request("ping"))["pong"] is True


def test_garbage_gets_error_then_close(served):
    with Conn(served.port) as c:
        c.send(b"hello there\n")
        assert "malformed request" in err(c.reply())
        assert c.closed_by_peer()
    assert ok(call(served.port, "ping"))["pong"] is True


def test_http_request_gets_http_error(served):
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400")


def test_client_disconnecting_mid_request_leaves_service_healthy(served):
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", served.port))
        s.sendall(b'{"type": "execute_code", "params": {"code": "print(1)')
        s.close()
    # And one that sends a full request but leaves before the reply.
    s = socket.create_connection(("127.0.0.1", served.port))
    s.sendall(b'{"type": "execute_code", "params": {"code": "import time; time.sleep(0.3)"}}')
    s.close()
    assert ok(call(served.port, "get_scene_info"))["object_count"] == 3
    assert ok(call(served.port, "get_status"))["running"] is True


def test_queued_request_past_its_timeout_never_runs(served):
    with Conn(served.port) as c, Conn(served.port) as c2:
        # Occupy the main thread, then queue a request with a short deadline behind it.
        c.send({"type": "execute_code", "params": {"code": "import time; time.sleep(1.0)"}, "id": 1})
        time.sleep(0.2)
        c2.send(
            {
                "type": "execute_code",
                "params": {"code": "bpy.context.scene['late'] = 1"},
                "id": 2,
                "timeout": 0.3,
            }
        )
        late = c2.reply()
        assert late["id"] == 2 and late["ran"] is False
        assert ok(c.reply())["executed"] is True
        assert ok(c.request("execute_code", code="result = 'late' in bpy.context.scene"))["value"] is False


# --- lifecycle ------------------------------------------------------------------------------------------


def test_user_startup_sequence_exactly(start_blender):
    port = free_port()
    b = start_blender(
        f"import bld_remote; bld_remote.start_mcp_service(port={port}); bld_remote.keep_alive()"
    )
    assert b.port == port
    assert ok(call(port, "get_scene_info"))["object_count"] == 3


def test_server_shutdown_exits_blender_cleanly(start_blender):
    b = start_blender()
    t0 = time.monotonic()
    assert "shutting down" in ok(call(b.port, "server_shutdown"))["message"]
    assert b.wait_exit(timeout=3) == 0, b.output
    assert time.monotonic() - t0 < 3
    assert port_is_free(b.port)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_blender_cleanly(start_blender, sig):
    b = start_blender()
    with Conn(b.port) as idle:  # an open idle connection must not hold the exit up
        ok(idle.request("ping"))
        t0 = time.monotonic()
        b.signal(sig)
        assert b.wait_exit(timeout=3) == 0, b.output
        assert time.monotonic() - t0 < 3
    assert port_is_free(b.port)
    if not BPY_PYTHON:
        assert "Blender quit" in b.output


def test_sigterm_while_a_request_runs_answers_it_then_exits(start_blender):
    b = start_blender()
    with Conn(b.port) as c:
        c.send({"type": "execute_code", "params": {"code": "import time; time.sleep(0.5); print('done')"}})
        time.sleep(0.2)
        b.signal(signal.SIGTERM)
        assert ok(c.reply())["result"] == "done\n"
    assert b.wait_exit(timeout=3) == 0, b.output


def test_stop_then_start_again_rebinds_same_port(start_blender):
    port = free_port()
    script = (
        "import bld_remote\n"
        f"bld_remote.start_mcp_service(port={port})\n"
        "assert bld_remote.stop_mcp_service() is True\n"
        "assert not bld_remote.is_mcp_service_up()\n"
        f"bld_remote.start_mcp_service(port={port})\n"
        "bld_remote.keep_alive()\n"
        f"bld_remote.start_mcp_service(port={port})\n"
        "bld_remote.keep_alive()\n"
    )
    b = start_blender(script)  # returns at the first ready line
    b.wait_ready()  # the restart after stop_mcp_service() prints it again
    assert ok(call(port, "ping"))["pong"]
    ok(call(port, "server_shutdown"))
    b.wait_ready()  # keep_alive() returned; the next round serves on the same port again
    assert b.port == port
    assert ok(call(port, "get_scene_info"))["object_count"] == 3
    ok(call(port, "server_shutdown"))
    assert b.wait_exit(timeout=3) == 0, b.output


def test_stop_from_inside_a_request_replies_first(start_blender):
    b = start_blender()
    r = call(b.port, "execute_code", code="import bld_remote; print(bld_remote.stop_mcp_service())")
    assert ok(r)["result"] == "True\n"
    assert b.wait_exit(timeout=3) == 0, b.output


def test_env_port_and_start_now_on_register(start_blender):
    port = free_port()
    # Enabled through Blender's add-on API, which calls register().
    b = start_blender(
        "import addon_utils; addon_utils.enable('bld_remote', default_set=True)\n"
        "import bld_remote; bld_remote.keep_alive()",
        env={"BLD_REMOTE_MCP_PORT": str(port), "BLD_REMOTE_MCP_START_NOW": "yes"},
    )
    assert b.port == port
    assert ok(call(port, "get_status"))["port"] == port


def test_port_in_use_is_a_clear_error(start_blender):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        b = start_blender(SERVE_EXPR_CATCH.format(port=port), wait=False)
        assert b.wait_exit(timeout=60) == 0
        assert f"ERR OSError: cannot listen on 127.0.0.1:{port}: the port is already in use" in b.output
    finally:
        holder.close()


def test_public_host_without_token_is_refused(start_blender):
    b = start_blender(SERVE_EXPR_CATCH.replace("port={port}", "port=0, host='0.0.0.0'"), wait=False)
    assert b.wait_exit(timeout=60) == 0
    assert "ERR ValueError: refusing to listen on 0.0.0.0:0 without a token" in b.output


SERVE_EXPR_CATCH = (
    "import bld_remote\n"
    "try:\n"
    "    bld_remote.start_mcp_service(port={port})\n"
    "except Exception as e:\n"
    "    print('ERR', type(e).__name__ + ':', e, flush=True)\n"
)


# --- rendering (headless) -------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["WORKBENCH", "CYCLES"])
def test_render_image_headless_inline_png(served, engine):
    r = ok(call(served.port, "render_image", width=64, height=48, engine=engine, samples=1, inline=True))
    png = base64.b64decode(r["data"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (64, 48)
    assert (r["width"], r["height"]) == (64, 48)
    assert engine in r["engine"]


def test_render_image_to_file_and_bad_engine(served, tmp_path):
    target = tmp_path / "shot.png"
    r = ok(call(served.port, "render_image", width=32, height=32, filepath=str(target)))
    assert r["filepath"] == str(target) and target.read_bytes()[:4] == b"\x89PNG"
    assert "engine" in err(call(served.port, "render_image", engine="POVRAY"))
    assert "width" in err(call(served.port, "render_image", width=-5))


def test_viewport_screenshot_headless_is_a_clear_error(served):
    # No window, no viewport: an error that says why (render_image is the headless way to get pixels).
    message = err(call(served.port, "get_viewport_screenshot", max_size=200))
    assert "background" in message
    assert ok(call(served.port, "ping"))["pong"] is True
