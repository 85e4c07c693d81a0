"""MCP tasks (the `io.modelcontextprotocol/tasks` extension, SEP-2663, of the 2026-07-28 revision) and typed
results (`structuredContent` + `outputSchema`), driven by the official Python SDK (`mcp`) against a real headless
Blender, over stdio and Streamable HTTP.

The SDK has no tasks module of its own: it has the extension mechanism the extension needs (a `ClientExtension`
that claims `resultType: "task"` on tools/call, active on 2026-07-28 connections only) and typed requests sent
through the client's own session (`session.send_request`), which stamps each one with the protocol version and
the client capabilities. `TasksExtension` below is that, in a few lines: `tasks/get`, `tasks/cancel`,
`tasks/update`. On the 2025-11-25 era the SDK does not advertise a claim-bearing extension, and the server makes
no tasks there: those tests check that calls are answered directly, as before, with progress notifications.
Every process started here is stopped by its PID."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any, Literal

import anyio
import mcp_types as types
import pytest
from helpers import call, free_port, ok
from test_mcp import HttpServer, decode_png, stdio, text

mcp = pytest.importorskip("mcp")
jsonschema = pytest.importorskip("jsonschema")
from mcp import Client  # noqa: E402
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim, advertise  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

TASKS = "io.modelcontextprotocol/tasks"
INVALID_PARAMS = -32602
MISSING_CLIENT_CAPABILITY = -32021
# Tools whose result is JSON: each must declare an outputSchema and return structuredContent that meets it.
JSON_TOOLS = {
    "list_instances": {},
    "check_connection_status": {},
    "get_scene_info": {},
    "get_object_info": {"name": "Cube"},
    "get_persist_data": {"key": "nothing-here", "default": 7},
    "remove_persist_data": {"key": "nothing-here"},
}


class CreateTask(types.Result):
    """`CreateTaskResult`: a tools/call answered with a task handle."""

    result_type: Literal["task"]
    task_id: str
    status: str
    status_message: str | None = None
    created_at: str
    last_updated_at: str
    ttl_ms: int | None = None
    poll_interval_ms: int | None = None


class DetailedTask(types.Result):
    """`tasks/get`'s answer: the task, with `result` (completed) or `error` (failed)."""

    result_type: str | None = None
    task_id: str
    status: str
    status_message: str | None = None
    created_at: str
    last_updated_at: str
    ttl_ms: int | None = None
    poll_interval_ms: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class Ack(types.Result):
    result_type: str | None = None


class TaskParams(types.RequestParams):
    task_id: str


class UpdateParams(TaskParams):
    input_responses: dict[str, Any]


class GetTask(types.Request[TaskParams, Literal["tasks/get"]]):
    method: Literal["tasks/get"] = "tasks/get"
    name_param = "taskId"  # SEP-2663: Mcp-Name carries the task id over HTTP


class CancelTask(types.Request[TaskParams, Literal["tasks/cancel"]]):
    method: Literal["tasks/cancel"] = "tasks/cancel"
    name_param = "taskId"


class UpdateTask(types.Request[UpdateParams, Literal["tasks/update"]]):
    method: Literal["tasks/update"] = "tasks/update"
    name_param = "taskId"


async def get_task(client: Client, task_id: str) -> DetailedTask:
    return await client.session.send_request(GetTask(params=TaskParams(task_id=task_id)), DetailedTask)


async def cancel_task(client: Client, task_id: str) -> Ack:
    return await client.session.send_request(CancelTask(params=TaskParams(task_id=task_id)), Ack)


async def wait_task(
    client: Client, task_id: str, *, until: set[str] | None = None, limit: float = 120
) -> DetailedTask:
    """Poll `tasks/get` (at the server's suggested interval) until the task is terminal (or in `until`)."""
    until = until or {"completed", "failed", "cancelled"}
    deadline = time.monotonic() + limit
    while True:
        t = await get_task(client, task_id)
        assert t.result_type == "complete" and t.task_id == task_id
        if t.status in until:
            return t
        assert t.status == "working", t
        assert time.monotonic() < deadline, f"task {task_id} still {t.status} after {limit} s: {t}"
        await anyio.sleep((t.poll_interval_ms or 500) / 1000)


async def poll_to_end(created: CreateTask, ctx: ClaimContext) -> types.CallToolResult:
    """The claim's resolver: what a task-aware client does for its user: poll, then hand back the result."""
    deadline = time.monotonic() + 120
    while True:
        raw = await ctx.session.send_request(
            GetTask(params=TaskParams(task_id=created.task_id)), DetailedTask
        )
        if raw.status == "completed":
            assert raw.result is not None
            return types.CallToolResult.model_validate(raw.result)
        if raw.status in ("failed", "cancelled"):
            raise RuntimeError(f"task {created.task_id} {raw.status}: {raw.status_message} {raw.error}")
        assert time.monotonic() < deadline
        await anyio.sleep((raw.poll_interval_ms or 500) / 1000)


class TasksExtension(ClientExtension):
    identifier = TASKS

    def claims(self):
        return [ResultClaim(result_type="task", model=CreateTask, resolve=poll_to_end)]


async def start_task(client: Client, tool: str, arguments: dict[str, Any]) -> CreateTask:
    created = await client.session.call_tool(tool, arguments, allow_claimed=True)
    assert isinstance(created, CreateTask), f"{tool} was not made a task: {created}"
    assert created.status == "working" and created.task_id.startswith("task-"), created
    assert created.poll_interval_ms and created.poll_interval_ms > 0
    return created


def result_of(t: DetailedTask) -> types.CallToolResult:
    assert t.status == "completed" and t.result is not None, t
    return types.CallToolResult.model_validate(t.result)


def image_size(r: types.CallToolResult) -> tuple[int, int]:
    images = [c for c in r.content if c.type == "image"]
    assert len(images) == 1 and images[0].mime_type == "image/png", r
    return decode_png(base64.b64decode(images[0].data))


@pytest.fixture
def target(request, served):
    """stdio or a `bld-remote mcp --http` subprocess, stopped by PID."""
    if request.param == "stdio":
        yield stdio(served.port)
        return
    server = HttpServer(served.port)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.mark.parametrize("target", ["stdio", "http"], indirect=True)
def test_render_as_task_polled_to_completion_then_resolved_transparently(target):
    async def main() -> None:
        async with Client(target, mode="2026-07-28", extensions=[TasksExtension()]) as client:
            # The server advertises the extension (server/discover; mode="2026-07-28" itself skips discovery).
            found = await client.session.send_discover("2026-07-28")
            assert TASKS in found["capabilities"].get("extensions", {}), found
            created = await start_task(
                client, "render_image", {"width": 160, "height": 120, "engine": "CYCLES", "samples": 8}
            )
            t0 = time.monotonic()
            done = await wait_task(client, created.task_id)
            r = result_of(done)
            assert not r.is_error, text(r)
            assert image_size(r) == (160, 120)
            assert "Rendered 160x120 with CYCLES" in text(r)
            # Progress goes to the task's status message (progress notifications belong to an answered
            # request): the last one the render reported stays on the finished task.
            assert done.status_message and "started" not in done.status_message, done
            # Kept: asking again gives the same result; its ttlMs now covers the retention after its end.
            again = await get_task(client, created.task_id)
            assert again.status == "completed" and result_of(again).content == r.content
            assert again.ttl_ms is not None and again.ttl_ms >= 3600 * 1000
            assert time.monotonic() - t0 < 120

            # The same call through Client.call_tool: the extension's resolver polls, the caller gets the image.
            r = await client.call_tool("render_image", {"width": 64, "height": 48})
            assert not r.is_error and image_size(r) == (64, 48)

            # Quick tools are never tasks: JSON tools answer directly, with structuredContent.
            r = await client.session.call_tool("get_scene_info", {}, allow_claimed=True)
            assert isinstance(r, types.CallToolResult) and r.structured_content is not None

    asyncio.run(main())


@pytest.mark.parametrize("target", ["stdio", "http"], indirect=True)
def test_code_task_cancel_reaches_blender_and_a_queued_render_task_never_runs(target, served):
    loop = "import time\nwhile True:\n    check_cancelled()\n    time.sleep(0.02)\n"

    async def main() -> None:
        async with Client(target, mode="2026-07-28", extensions=[TasksExtension()]) as client:
            code = await start_task(client, "execute_blender_code", {"code": loop})
            assert "job bld-job-" in (code.status_message or ""), code
            job_id = (code.status_message or "").split()[1]
            # The job is running in Blender (its status message says so once the poll saw it).
            running = await wait_task(client, code.task_id, until={"working"})
            deadline = time.monotonic() + 30
            while "running" not in (running.status_message or ""):
                assert time.monotonic() < deadline, running
                await anyio.sleep(0.1)
                running = await get_task(client, code.task_id)

            # A render queued behind it, cancelled while queued: it never runs.
            render = await start_task(client, "render_image", {"width": 32, "height": 32})
            assert (await cancel_task(client, render.task_id)).result_type == "complete"
            r = await wait_task(client, render.task_id)
            assert r.status == "cancelled" and "never runs" in (r.status_message or ""), r
            assert r.result is None
            # Code queued behind it, cancelled while queued: its job never starts.
            queued = await start_task(client, "execute_blender_code", {"code": "print('should not run')"})
            queued_job = (queued.status_message or "").split()[1]
            await cancel_task(client, queued.task_id)
            q = await wait_task(client, queued.task_id)
            assert q.status == "cancelled" and "never ran" in (q.status_message or ""), q
            job = ok(call(served.port, "get_job_status", job_id=queued_job))
            assert job["status"] == "cancelled" and job["started_at"] is None, job

            # Cancel the loop: Blender's code sees it at check_cancelled(), the job ends cancelled.
            assert (await cancel_task(client, code.task_id)).result_type == "complete"
            assert (await cancel_task(client, code.task_id)).result_type == "complete"  # twice: still an ack
            ended = await wait_task(client, code.task_id, limit=30)
            assert ended.status == "cancelled", ended
            assert "check_cancelled()" in (ended.status_message or ""), ended
            job = ok(call(served.port, "get_job_status", job_id=job_id))
            assert job["status"] == "cancelled" and job["cancel_requested"] is True, job

            # Blender is free again: the next render task completes.
            r = result_of(
                await wait_task(
                    client, (await start_task(client, "render_image", {"width": 40, "height": 30})).task_id
                )
            )
            assert image_size(r) == (40, 30)

    asyncio.run(main())


def test_code_task_results_errors_and_bad_task_ids(served):
    async def main() -> None:
        async with Client(stdio(served.port), mode="2026-07-28", extensions=[TasksExtension()]) as client:
            created = await start_task(
                client, "execute_blender_code", {"code": "print('hello from a job')\nresult = 6 * 7"}
            )
            done = await wait_task(client, created.task_id)
            r = result_of(done)
            assert not r.is_error and "hello from a job" in text(r) and "result = 42" in text(r), text(r)
            assert "bld-job-" in text(r)
            # Its structured content meets the tool's outputSchema, as a direct call's does.
            schema = {t.name: t for t in (await client.list_tools()).tools}[
                "execute_blender_code"
            ].output_schema
            assert schema is not None and isinstance(r.structured_content, dict), r
            validate(schema, r.structured_content)
            assert r.structured_content["value"] == 42 and r.structured_content["job_id"] in text(r)
            assert r.structured_content["output"]["stdout"] == "hello from a job\n"

            # A finished task cannot be cancelled: a clear error, and the task still says how it ended.
            with pytest.raises(MCPError) as e:
                await cancel_task(client, created.task_id)
            assert e.value.code == INVALID_PARAMS
            assert (
                "already finished (completed)" in e.value.message and "nothing to cancel" in e.value.message
            )
            assert (await get_task(client, created.task_id)).status == "completed"

            # Code that raises: the task completes (a tool error is a result, not a protocol failure).
            failed = await wait_task(
                client,
                (
                    await start_task(client, "execute_blender_code", {"code": "print('before')\n1 / 0"})
                ).task_id,
            )
            r = result_of(failed)
            assert (
                r.is_error
                and "ZeroDivisionError" in text(r)
                and "Traceback" in text(r)
                and "before" in text(r)
            )

            # Unknown ids: tasks/get, tasks/cancel and tasks/update each answer Invalid params, naming the id.
            for request in (get_task, cancel_task):
                with pytest.raises(MCPError) as e:
                    await request(client, "task-0000")
                assert e.value.code == INVALID_PARAMS and 'unknown task id "task-0000"' in e.value.message
            with pytest.raises(MCPError) as e:
                await client.session.send_request(
                    UpdateTask(params=UpdateParams(task_id="task-0000", input_responses={})), Ack
                )
            assert e.value.code == INVALID_PARAMS and "task-0000" in e.value.message

            # Bad arguments are answered at once, as a plain tool error: no task is made for them.
            r = await client.session.call_tool("execute_blender_code", {}, allow_claimed=True)
            assert isinstance(r, types.CallToolResult) and r.is_error and "code" in text(r), r
            # A tool whose own handler runs in the task checks its arguments there: the task completes with
            # the same tool error a direct call gets.
            created = await start_task(client, "render_image", {"width": 0})
            r = result_of(await wait_task(client, created.task_id))
            assert r.is_error and "width must be a whole number from 1 to 8192" in text(r), text(r)

    asyncio.run(main())


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_legacy_era_gets_plain_results_with_progress_and_no_tasks(served, transport):
    """2025-11-25 sessions: the SDK leaves a claim-bearing extension out of its initialize; advertised anyway
    (advertise()), the server still answers directly: the extension is 2026-07-28's."""
    server = HttpServer(served.port) if transport == "http" else None
    target = server.url if server else stdio(served.port)

    async def main() -> None:
        for extension in (TasksExtension(), advertise(TASKS)):
            async with Client(target, mode="legacy", extensions=[extension]) as client:
                seen: list[str | None] = []

                async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                    seen.append(message)

                r = await client.call_tool(
                    "render_image",
                    {"width": 48, "height": 32, "engine": "CYCLES", "samples": 4},
                    progress_callback=on_progress,
                )
                assert not r.is_error and image_size(r) == (48, 32)
                # Progress notifications, as without tasks (how many arrive before the result varies).
                assert any(m and "48x32 with CYCLES" in m for m in seen), seen
                with pytest.raises(MCPError) as e:
                    await get_task(client, "task-0000")
                if isinstance(extension, TasksExtension):
                    assert e.value.code == MISSING_CLIENT_CAPABILITY, e.value
                else:
                    assert e.value.code == INVALID_PARAMS and "unknown task id" in e.value.message

    try:
        asyncio.run(main())
    finally:
        if server:
            server.stop()


def validate(schema: dict[str, Any], value: Any) -> None:
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    cls(schema).validate(value)


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
def test_json_tools_return_structured_content_that_meets_their_output_schema(served, mode):
    async def main() -> None:
        async with Client(stdio(served.port), mode=mode) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            for name, args in JSON_TOOLS.items():
                schema = tools[name].output_schema
                assert schema is not None and schema["type"] == "object", name
                r = await client.call_tool(name, args)
                assert not r.is_error, (name, text(r))
                assert isinstance(r.structured_content, dict), (name, r)
                validate(schema, r.structured_content)
                # The text copy is the same JSON, for clients that read only `content`.
                assert json.loads(text(r)) == r.structured_content, name
            # execute_blender_code: structured content meets its schema; its text stays readable output.
            r = await client.call_tool("execute_blender_code", {"code": "print('hi')\nresult = 2"})
            assert not r.is_error and isinstance(r.structured_content, dict), r
            validate(tools["execute_blender_code"].output_schema or {}, r.structured_content)
            assert r.structured_content["output"]["stdout"] == "hi\n" and r.structured_content["value"] == 2
            assert "result" not in r.structured_content and "hi" in text(r)
            for name, t in tools.items():
                if name not in JSON_TOOLS and t.output_schema is not None:
                    validate({"$schema": "https://json-schema.org/draft/2020-12/schema"}, t.output_schema)
            # A tool error carries no structuredContent (clients do not check errors against the schema).
            r = await client.call_tool("get_object_info", {"name": "NoSuchObject"})
            assert r.is_error and r.structured_content is None

    asyncio.run(main())
    # Blender down: check_connection_status still answers its schema.
    port = free_port()

    async def down() -> None:
        async with Client(stdio(port, "--timeout", "10"), mode=mode) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            r = await client.call_tool("check_connection_status", {})
            assert r.structured_content is not None and r.structured_content["connected"] is False
            validate(tools["check_connection_status"].output_schema or {}, r.structured_content)

    asyncio.run(down())
