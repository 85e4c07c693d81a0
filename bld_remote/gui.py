"""GUI mode: the timer pump, the keeper modal operator, the add-on preferences and the Start/Stop operators.

Runs on Blender's main thread, and needs ``bpy``: the package imports this module only inside an interactive
Blender (and ``register()`` does). This module imports ``service``, never the reverse: on import it registers
its pump with ``service.set_gui_pump``, which ``start_mcp_service()`` and ``stop_mcp_service()`` call. In an
interactive Blender two drivers can run the service's jobs, both through ``_core.step`` with a time budget:

- the **timer pump**, one persistent ``bpy.app.timers`` callback (the default). It never raises (Blender drops a
  raising timer for good), re-arms itself from a persistent ``load_post`` handler (loading factory settings
  wipes even persistent timers), and backs off when idle;
- the **keeper**, ``bpy.ops.wm.bld_remote_keeper('INVOKE_DEFAULT')``, a modal operator that runs the jobs on its
  TIMER events. While it runs the timer pump pauses; when it ends (``request_keeper_shutdown()``, the service
  stopping, a file load, ``unregister()``) the timer pump takes over again. In background mode it refuses:
  no modal operator can run there, ``bld_remote.keep_alive()`` is the pump to use.

``register()``/``unregister()`` here are the add-on's, strictly symmetric: ``unregister()`` ends the keeper,
stops the service (joining its threads, freeing the port), removes the timer and the handler, and
unregisters the classes in reverse order. One exception in time, not in effect: called from a job that the
keeper itself runs, it leaves the keeper's class registered until the keeper has returned from that job
(a few milliseconds), since freeing an operator under its own running modal() crashes Blender.
"""

from __future__ import annotations

import time
from typing import Any

import bpy

from . import _core, service

# The add-on's module name: "bld_remote", or "bl_ext.<repo>.bld_remote" when installed as a 4.2+ extension.
ADDON_ID = __package__ or "bld_remote"

# Jobs run for at most this long per pump tick, so the UI stays responsive while a client floods the service
# (about 30 UI passes a second at worst).
TICK_BUDGET = 0.03
MAX_JOBS_PER_TICK = 256
# Timer interval (s): 0 = every pass of Blender's event loop, which sleeps 5 ms whenever it has no events; so an
# idle GUI answers a main-thread request within ~5 ms plus the interval. Right after activity the pump stays at
# 0; after ACTIVE_WINDOW seconds without a job it backs off to IDLE_INTERVAL (~100 callbacks a second instead
# of ~200). bench/gui_roundtrip.py measures both.
ACTIVE_INTERVAL = 0.0
ACTIVE_WINDOW = 2.0
IDLE_INTERVAL = 0.01
# Within LINGER_WINDOW of the last job, a tick waits up to LINGER (GIL released, no CPU) for the next request
# before handing the main thread back, still within TICK_BUDGET: a client sending requests one after another
# is then served in the same tick instead of once per 5 ms event-loop pass.
LINGER = 0.002
LINGER_WINDOW = 0.25
# The keeper's window timer: TIMER events this often while it runs.
KEEPER_INTERVAL = 0.01

BACKGROUND_REFUSAL = (
    "bld_remote keeper: a modal operator cannot run in background mode (there is no event loop to drive it). "
    "In `blender --background` (or bpy as a module) serve with bld_remote.keep_alive() instead: "
    "bld_remote.start_mcp_service(); bld_remote.keep_alive()"
)

_last_activity = 0.0


# --- the timer pump -------------------------------------------------------------------------------------


def _run_tick(keeper: bool = False) -> int:
    """Run ready jobs for at most TICK_BUDGET; shortly after activity, linger for the next request. The timer
    pump's tick ends as soon as a job has started the keeper, which runs every job after that one; the
    keeper's ends as soon as it is asked to end (by a job, say), and the timer pump runs the next job."""
    global _last_activity
    start = time.monotonic()
    deadline = start + TICK_BUDGET
    wait = LINGER if start - _last_activity < LINGER_WINDOW else 0.0
    ran = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or (KEEPER.shutdown if keeper else KEEPER.active):
            break
        n = _core.step(MAX_JOBS_PER_TICK, min(wait, left), left)
        if not n:
            break
        ran += n
        wait = LINGER
    if ran:
        _last_activity = time.monotonic()
    return ran


def _pump() -> float | None:
    """The persistent timer callback: one tick, then the interval to the next; never raises."""
    try:
        if not _core.is_running():
            return None
        ran = _run_tick()
        if not _core.is_running():
            return None
        if ran or time.monotonic() - _last_activity < ACTIVE_WINDOW:
            return ACTIVE_INTERVAL
        return IDLE_INTERVAL
    except BaseException as exc:  # a raising timer is silently removed by Blender
        try:
            service._log("ERROR", f"pump error: {exc!r}")
        except BaseException:
            pass
        return 0.1


def pump_is_armed() -> bool:
    return bpy.app.timers.is_registered(_pump)


def ensure_pump() -> None:
    """Make sure something drives the service: the keeper if it runs, else the timer pump. Idempotent."""
    global _last_activity
    if not KEEPER.active and not bpy.app.timers.is_registered(_pump):
        _last_activity = time.monotonic()
        bpy.app.timers.register(_pump, first_interval=0.0, persistent=True)
    if not any(_is_ours(h) for h in bpy.app.handlers.load_post):
        bpy.app.handlers.load_post.append(_on_load_post)


def remove_pump() -> None:
    """Remove the timer and the load_post handler (also copies left by an earlier load of this module)."""
    if bpy.app.timers.is_registered(_pump):
        bpy.app.timers.unregister(_pump)
    for h in [h for h in bpy.app.handlers.load_post if _is_ours(h)]:
        bpy.app.handlers.load_post.remove(h)


def _is_ours(handler: Any) -> bool:
    return getattr(handler, "_bld_remote_handler", False)


@bpy.app.handlers.persistent
def _on_load_post(*_args: Any) -> None:
    # File > Open keeps persistent timers; loading factory settings wipes them. A file load also frees every
    # window handler, so a running keeper is gone: let the timer pump take over.
    try:
        if KEEPER.active:
            _end_keeper(bpy.context.window_manager)
        if _core.is_running():
            ensure_pump()
    except BaseException as exc:
        service._log("ERROR", f"could not re-arm the pump after loading a file: {exc!r}")


_on_load_post._bld_remote_handler = True


# --- the keeper modal operator --------------------------------------------------------------------------


def request_keeper_shutdown() -> bool:
    """End a running keeper at its next event (the timer pump takes over). Returns whether one was running."""
    KEEPER.shutdown = True
    return KEEPER.active


def _end_keeper(wm: Any) -> None:
    timer, KEEPER.event_timer = KEEPER.event_timer, None
    KEEPER.active = False
    if timer is not None:
        try:
            wm.event_timer_remove(timer)
        except BaseException as exc:
            service._log("WARNING", f"could not remove the keeper's timer: {exc!r}")
    if _core.is_running():
        ensure_pump()


class BLD_REMOTE_OT_keeper(bpy.types.Operator):
    """Serve bld_remote requests from a modal operator (GUI only; in background use bld_remote.keep_alive())"""

    bl_idname = "wm.bld_remote_keeper"
    bl_label = "bld_remote: Keep Serving"

    # Class-level state: at most one keeper runs. Setting ``shutdown`` ends it at its next event. ``serving``
    # is true while its modal() runs jobs: a job then runs with this operator's handler on the C stack.
    active = False
    shutdown = False
    serving = False
    event_timer = None

    def execute(self, context: Any) -> set[str]:
        # Background mode never calls invoke() (and INVOKE_DEFAULT falls back to execute()): refuse clearly.
        if bpy.app.background:
            self.report({"ERROR"}, BACKGROUND_REFUSAL)
            return {"CANCELLED"}
        return self._begin(context)

    def invoke(self, context: Any, _event: Any) -> set[str]:
        return self.execute(context)

    def _begin(self, context: Any) -> set[str]:
        if KEEPER.active:
            self.report({"INFO"}, "bld_remote keeper is already running")
            return {"CANCELLED"}
        if not _core.is_running():
            try:
                start_from_preferences()
            except Exception as exc:
                self.report({"ERROR"}, f"bld_remote could not start: {exc}")
                return {"CANCELLED"}
        window = context.window or (
            context.window_manager.windows[0] if context.window_manager.windows else None
        )
        if window is None:
            self.report({"ERROR"}, "bld_remote keeper needs a window")
            return {"CANCELLED"}
        wm = context.window_manager
        KEEPER.shutdown = False
        KEEPER.event_timer = wm.event_timer_add(KEEPER_INTERVAL, window=window)
        wm.modal_handler_add(self)
        KEEPER.active = True
        # The keeper drives the service now; the timer pump resumes when it ends.
        if bpy.app.timers.is_registered(_pump):
            bpy.app.timers.unregister(_pump)
        return {"RUNNING_MODAL"}

    def modal(self, context: Any, event: Any) -> set[str]:
        try:
            if KEEPER.shutdown or not _core.is_running() or not KEEPER.active:
                _end_keeper(context.window_manager)
                return {"FINISHED"}
            if event.type == "TIMER":
                KEEPER.serving = True
                try:
                    _run_tick(keeper=True)
                finally:
                    KEEPER.serving = False
                # A job may have stopped the service, or disabled the add-on (``unregister`` then leaves
                # this class registered until the keeper has ended: see there).
                if KEEPER.shutdown or not _core.is_running():
                    _end_keeper(context.window_manager)
                    return {"FINISHED"}
        except BaseException as exc:  # never take the UI down with us
            service._log("ERROR", f"keeper error: {exc!r}")
        return {"PASS_THROUGH"}

    def cancel(self, context: Any) -> None:
        # Blender calls this when it frees the handler (a file load, the window closing).
        try:
            _end_keeper(context.window_manager)
        except BaseException as exc:
            service._log("ERROR", f"keeper cancel: {exc!r}")


KEEPER = BLD_REMOTE_OT_keeper


# --- preferences and Start/Stop -------------------------------------------------------------------------


def preferences() -> Any:
    """This add-on's preferences, or None when it is not enabled as an add-on."""
    addon = bpy.context.preferences.addons.get(ADDON_ID)
    return addon.preferences if addon is not None else None


def start_from_preferences(*, use_env_port: bool = False) -> dict[str, Any]:
    """Start with the host and port from the preferences (defaults when not an add-on). Returns the status."""
    prefs = preferences()
    host = prefs.host if prefs is not None and prefs.host.strip() else _core.DEFAULT_HOST
    port = prefs.port if prefs is not None else _core.DEFAULT_PORT
    if use_env_port:
        options = _core.startup_options()  # BLD_REMOTE_MCP_PORT, parsed (and checked) in Rust
        if options["port_from_env"]:
            port = options["port"]
    return service.start_mcp_service(port=port, host=host.strip())


def status_line(status: dict[str, Any]) -> str:
    if not status.get("running"):
        return "Stopped"
    clients = status.get("connections", 0)
    return (
        f"Running on {status.get('host')}:{status.get('port')} · {clients} client{'s' if clients != 1 else ''}"
        f" · {status.get('requests_served', 0)} requests served"
    )


class BLD_REMOTE_OT_start(bpy.types.Operator):
    """Start the bld_remote service with the host and port set in the preferences"""

    bl_idname = "bld_remote.start_service"
    bl_label = "Start"

    def execute(self, context: Any) -> set[str]:
        try:
            status = start_from_preferences()
        except Exception as exc:
            self.report({"ERROR"}, f"bld_remote could not start: {exc}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"bld_remote listening on {status['host']}:{status['port']}")
        return {"FINISHED"}


class BLD_REMOTE_OT_stop(bpy.types.Operator):
    """Stop the bld_remote service: close every connection and free the port"""

    bl_idname = "bld_remote.stop_service"
    bl_label = "Stop"

    def execute(self, context: Any) -> set[str]:
        request_keeper_shutdown()
        service.stop_mcp_service()
        self.report({"INFO"}, "bld_remote stopped")
        return {"FINISHED"}


class BLD_REMOTE_AddonPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    host: bpy.props.StringProperty(  # type: ignore[valid-type]
        name="Host",
        description="Address to listen on. Anything but loopback requires a token (BLD_REMOTE_TOKEN)",
        default=_core.DEFAULT_HOST,
    )
    port: bpy.props.IntProperty(  # type: ignore[valid-type]
        name="Port",
        description="TCP port (0 picks a free one). BLD_REMOTE_MCP_PORT overrides it for automatic start",
        default=_core.DEFAULT_PORT,
        min=0,
        max=65535,
    )
    auto_start: bpy.props.BoolProperty(  # type: ignore[valid-type]
        name="Start automatically",
        description="Start the service when the add-on is enabled (also at Blender start-up once preferences "
        "are saved). BLD_REMOTE_MCP_START_NOW=1 does the same for one run",
        default=False,
    )

    def draw(self, context: Any) -> None:
        layout = self.layout
        row = layout.row()
        row.prop(self, "host")
        row.prop(self, "port")
        layout.prop(self, "auto_start")
        status = service.get_status()
        box = layout.box()
        # The status gets a row of its own: next to the button, the column was too narrow for the address.
        box.label(text=status_line(status), icon="CHECKMARK" if status.get("running") else "CANCEL")
        if status.get("running"):
            box.operator(BLD_REMOTE_OT_stop.bl_idname, icon="PAUSE")
        else:
            box.operator(BLD_REMOTE_OT_start.bl_idname, icon="PLAY")


classes = (
    BLD_REMOTE_AddonPreferences,
    BLD_REMOTE_OT_start,
    BLD_REMOTE_OT_stop,
    BLD_REMOTE_OT_keeper,
)


def _should_auto_start() -> bool:
    if _core.startup_options()["start_now"]:  # BLD_REMOTE_MCP_START_NOW
        return True
    prefs = preferences()
    return bool(prefs is not None and prefs.auto_start)


# True while the keeper's class stays registered after ``unregister()`` (see there), until it is dropped.
_keeper_class_kept = False


def _drop_kept_keeper_class() -> float | None:
    """Timer: unregister the keeper's class that ``unregister()`` had to leave, once the keeper has ended
    (unless the add-on was enabled again meanwhile and owns it anew). Never raises."""
    global _keeper_class_kept
    try:
        if not _keeper_class_kept:
            return None
        if KEEPER.active or KEEPER.serving:
            return 0.05
        _keeper_class_kept = False
        if getattr(KEEPER, "is_registered", False):
            bpy.utils.unregister_class(KEEPER)
    except BaseException as exc:
        try:
            service._log("ERROR", f"could not unregister the keeper's class: {exc!r}")
        except BaseException:
            pass
    return None


def register() -> None:
    global _keeper_class_kept
    for cls in classes:
        if cls is KEEPER and _keeper_class_kept and getattr(cls, "is_registered", False):
            # Left registered by the last unregister() (it ran inside the keeper): ours again.
            _keeper_class_kept = False
            continue
        bpy.utils.register_class(cls)
    try:
        if _should_auto_start():
            start_from_preferences(use_env_port=True)
    except Exception as exc:  # never break Blender's add-on loading
        service._log("ERROR", f"could not start on register: {exc}")


def unregister() -> None:
    global _keeper_class_kept
    KEEPER.shutdown = True
    # Called from a job that the keeper runs (a request disabling the add-on), the keeper's modal() is on the
    # C stack: unregistering its class now would free the operator under it, and Blender would use the
    # freed memory when modal() returns (a crash, seen later, at Load Factory Settings). So the class stays
    # registered until the keeper has ended: modal() sees ``shutdown`` right after the job, ends the
    # keeper (its timer removed, the timer pump armed if a service runs) and returns FINISHED; a timer then
    # unregisters the class, unless register() has taken it back.
    inside_keeper = KEEPER.serving
    if KEEPER.active and not inside_keeper:
        # Outside its modal(), Blender frees the keeper's handler with its class; its timer is ours to remove.
        _end_keeper(bpy.context.window_manager)
    service.stop_mcp_service()
    remove_pump()
    for cls in reversed(classes):
        if cls is KEEPER and inside_keeper:
            _keeper_class_kept = True
            bpy.app.timers.register(_drop_kept_keeper_class, first_interval=0.0, persistent=True)
            continue
        bpy.utils.unregister_class(cls)


# The service arms and removes this pump (it never imports this module: see service.set_gui_pump).
service.set_gui_pump(ensure_pump, remove_pump)
