"""Command handlers that need ``bpy``: one function per command, in one table.

Runs on Blender's main thread only, called by the pump through ``dispatch``. Everything that does not need
``bpy`` (ping, status, persist data, the probes, shutdown, base64, serialisation) is answered by the native
side on network threads and never reaches this module.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

from . import _core
from . import changes as _changes
from ._core import OutputCapture

# Client code may check ``isinstance(sys.stdout, io.TextIOBase)``; the capture is one.
io.TextIOBase.register(OutputCapture)


class CommandError(Exception):
    """A command failed in a way the client should see: message plus extra reply fields."""

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


def dispatch(command: str, params: dict[str, Any]) -> tuple[bool, Any]:
    """Run one command. Never raises: returns ``(True, result)`` or ``(False, {"message": ..., ...})``.

    In the GUI, a command that may change data ends with one undo step labelled with it (whether it
    succeeded or failed part-way), so Ctrl+Z reverts what the client did.
    """
    handler = HANDLERS.get(command)
    if handler is None:
        return False, {"message": f"Unknown command type: {command}"}
    try:
        with _window_context():
            return True, handler(params)
    except CommandError as exc:
        return False, {"message": exc.message, **exc.extra}
    except BaseException as exc:  # nothing a client sends may escape into Blender
        return False, {
            "message": f"{type(exc).__name__}: {exc}",
            "exception": type(exc).__name__,
            "traceback": traceback.format_exc(),
        }
    finally:
        if command in CHANGES_DATA:
            for hook in AFTER_CHANGES:  # datablocks.note_changes: objects, materials... added or removed
                try:
                    hook()
                except BaseException:  # dispatch never raises
                    pass
        if command in CHANGES_DATA and params.get("undo", True) is not False:
            _undo_push(command)


def _window_context() -> Any:
    """In the GUI, run each command with a window in the context, as code typed into Blender's Python console
    has: timer callbacks sometimes get none (e.g. right after a file load), and then many ``bpy.ops`` calls
    fail their poll ("Missing 'window' in context")."""
    try:
        bpy = _bpy()
    except ImportError:
        return contextlib.nullcontext()
    if bpy.app.background or bpy.context.window is not None or not hasattr(bpy.context, "temp_override"):
        return contextlib.nullcontext()
    windows = bpy.context.window_manager.windows
    if not windows:
        return contextlib.nullcontext()
    return bpy.context.temp_override(window=windows[0])


def _undo_push(command: str) -> None:
    """One undo step after a data-changing command, GUI only (headless there is no one to press Ctrl+Z)."""
    try:
        bpy = _bpy()
        if bpy.app.background:
            return
        # Fails after the command loaded a file (the undo stack starts afresh there): nothing to push.
        if not bpy.ops.ed.undo_push.poll():
            return
        # bpy.ops called from Python push no undo steps of their own, so this is the command's only step.
        bpy.ops.ed.undo_push(message=f"bld_remote: {command}")
    except BaseException as exc:  # the command's reply matters more than its undo step
        print(f"bld_remote [WARNING] no undo step for {command}: {exc!r}", file=sys.stderr, flush=True)


def _bpy():
    import bpy

    return bpy


# Deeper parts are left to the native conversion, which stops at its own depth limit and says so.
_JSONABLE_DEPTH = 200


def to_jsonable(value: Any, _depth: int = 0) -> Any:
    """Blender values → plain Python ones the native conversion (src/convert.rs) turns into JSON: data-blocks
    and other ``bpy_struct`` → their name, mathutils vectors, colours, eulers, quaternions → lists of floats,
    matrices → lists of rows, Blender property arrays → lists, numpy arrays and scalars → ``tolist()``.
    Dicts, lists, tuples and sets are walked (dict keys stay as they are: the native side converts them and
    reports collisions); other objects become their ``repr``. See docs/PROTOCOL.md, "Converting results"."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if _depth > _JSONABLE_DEPTH:
        return value
    if isinstance(value, dict):
        return {k: to_jsonable(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [to_jsonable(v, _depth + 1) for v in value]
    if isinstance(value, tuple):
        return tuple(to_jsonable(v, _depth + 1) for v in value)
    if isinstance(value, (set, frozenset)):
        return [to_jsonable(v, _depth + 1) for v in value]
    if type(value).__module__ == "numpy" and callable(getattr(value, "tolist", None)):
        return to_jsonable(value.tolist(), _depth + 1)
    bpy = _bpy()
    if isinstance(value, bpy.types.ID):
        return value.name
    try:
        import mathutils
    except ImportError:  # pragma: no cover - always present in Blender
        mathutils = None
    if mathutils is not None:
        if isinstance(value, mathutils.Matrix):
            return [list(row) for row in value]
        if isinstance(value, (mathutils.Vector, mathutils.Euler, mathutils.Quaternion, mathutils.Color)):
            return list(value)
    if isinstance(value, bpy.types.bpy_struct):
        name = getattr(value, "name", None)
        return name if isinstance(name, str) else repr(value)
    if type(value).__name__ in ("bpy_prop_array", "bpy_prop_collection", "IDPropertyArray"):
        try:
            return [to_jsonable(v, _depth + 1) for v in value]
        except TypeError:
            pass
    return repr(value)


# compile() is most of what a short script costs (≈6 µs for "pass" on Python 3.11), and clients repeat
# the same snippets. A code object is immutable, so running a cached one in a fresh namespace is the same
# as compiling anew. Only short sources are kept, and only a bounded number (oldest out first).
_COMPILED: dict[str, Any] = {}
_COMPILE_CACHE_ENTRIES = 256
_COMPILE_CACHE_MAX_CHARS = 16 * 1024


def _compile(code: str) -> Any:
    compiled = _COMPILED.get(code)
    if compiled is None:
        compiled = compile(code, "<bld_remote>", "exec")
        if len(code) <= _COMPILE_CACHE_MAX_CHARS:
            if len(_COMPILED) >= _COMPILE_CACHE_ENTRIES:
                del _COMPILED[next(iter(_COMPILED))]
            _COMPILED[code] = compiled
    return compiled


def execute_code(params: dict[str, Any]) -> dict[str, Any]:
    """Run Python with ``bpy`` in a fresh namespace; capture stdout and stderr; return a ``result`` variable.

    The native side has already decoded base64 code and will shape the reply (base64 output included).
    Unless ``changes`` is false, the reply (an error's too) says what the code changed (bld_remote/changes.py).
    """
    bpy = _bpy()
    code = params.get("code")
    if not isinstance(code, str):
        raise CommandError("execute_code needs 'code' (a string of Python)")
    track = params.get("changes")
    if track is not None and not isinstance(track, bool):
        raise CommandError(f"changes must be true or false (report what the code changed), got {track!r}")
    before = _changes.snapshot(bpy) if track is not False else None
    namespace: dict[str, Any] = {"bpy": bpy, "__name__": "__main__", "__builtins__": __builtins__}
    # Cooperative cancellation (blender-remote's names): check_cancelled() raises JobCancelled once a cancel
    # was asked for (cancel_job, or cancel of a framed request), JobTimedOut past job_timeout_seconds.
    job_context = {"job_id": params.get("_job_id"), "cancel_requested": _core.cancel_requested}
    namespace["check_cancelled"] = _core.check_cancelled
    namespace["job_context"] = namespace["ctx"] = namespace["__bld_remote_job_context"] = job_context
    # Rust-side text files (src/py_capture.rs): the output is copied once, and the reply takes it as is.
    out, err = OutputCapture(), OutputCapture()
    started = time.perf_counter()
    try:
        compiled = _compile(code)
        # A plain swap, not contextlib.redirect_*: same effect, a third of the cost per request.
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            exec(compiled, namespace)  # running client code is this tool's purpose
        finally:
            sys.stdout, sys.stderr = saved
    except BaseException as exc:  # SystemExit in client code must not end Blender
        # Start the traceback at the client's code, not at this module's frames (exec, _compile).
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_globals.get("__name__") == __name__:
            tb = tb.tb_next
        duration = time.perf_counter() - started
        # What the code changed before it raised: the user needs to know what is left half done.
        extra = {"changes": _changes.diff(before, _changes.snapshot(bpy))} if before is not None else {}
        raise CommandError(
            f"{type(exc).__name__}: {exc}",
            exception=type(exc).__name__,
            traceback="".join(traceback.format_exception(type(exc), exc, tb)),
            output={"stdout": out, "stderr": err},
            duration=duration,
            ran=True,
            **extra,
        ) from None
    duration = time.perf_counter() - started
    reply: dict[str, Any] = {
        # Converted by moving the text out (no Python str is made of it).
        "stdout": out,
        "stderr": err,
        "duration": duration,
    }
    if before is not None:
        reply["changes"] = _changes.diff(before, _changes.snapshot(bpy))
    if "result" in namespace:
        try:
            reply["value"] = to_jsonable(namespace["result"])
        except BaseException as exc:  # the code ran: say so, with its output, whatever the result does
            raise CommandError(
                f"the code ran, but its result could not be converted to JSON: {type(exc).__name__}: {exc}",
                exception=type(exc).__name__,
                traceback=traceback.format_exc(),
                output={"stdout": out, "stderr": err},
                duration=duration,
                ran=True,
                **({"changes": reply["changes"]} if "changes" in reply else {}),
            ) from None
    return reply


_SCREENSHOT_FORMATS = {
    "png": ("PNG", ".png", "image/png"),
    "jpeg": ("JPEG", ".jpg", "image/jpeg"),
    "jpg": ("JPEG", ".jpg", "image/jpeg"),
}
# Temp files this process wrote for clients that gave no filepath: the newest few are kept for them to read.
_TEMP_SHOTS: collections.deque[str] = collections.deque()
_TEMP_SHOTS_KEPT = 16
_SCREENSHOT_MAX_SIZE = 16384


def _largest_view3d(bpy: Any) -> tuple[Any, Any]:
    best = None
    for window in bpy.context.window_manager.windows:
        screen = window.screen
        if screen is None:
            continue
        for area in screen.areas:
            if area.type == "VIEW_3D" and (best is None or area.width * area.height > best[2]):
                best = (window, area, area.width * area.height)
    if best is None:
        raise CommandError("no 3D viewport is open in any window")
    return best[0], best[1]


def _new_temp_shot(ext: str) -> str:
    fd, path = tempfile.mkstemp(prefix="bld_remote_screenshot_", suffix=ext)
    os.close(fd)
    _TEMP_SHOTS.append(path)
    while len(_TEMP_SHOTS) > _TEMP_SHOTS_KEPT:
        try:
            os.remove(_TEMP_SHOTS.popleft())
        except OSError:
            pass
    return path


def get_viewport_screenshot(params: dict[str, Any]) -> dict[str, Any]:
    """Capture the largest 3D viewport, downscale it to fit ``max_size``, write it as PNG or JPEG.

    The file goes to ``filepath`` (or a fresh temp file) because existing clients read it from disk; the
    native side adds the bytes inline (base64) on the network thread, off Blender's main thread.
    """
    bpy = _bpy()
    # Every number is checked before anything touches bpy (docs/PROTOCOL.md, "Numbers").
    max_size = _positive_int(params, "max_size", _SCREENSHOT_MAX_SIZE)
    if max_size is None:
        max_size = 800
    fmt = str(params.get("format") or "png").lower()
    if fmt not in _SCREENSHOT_FORMATS:
        raise CommandError(f"format must be 'png' or 'jpeg', got {params.get('format')!r}")
    file_format, ext, mime = _SCREENSHOT_FORMATS[fmt]
    filepath = params.get("filepath")
    if filepath is not None and (not isinstance(filepath, str) or not filepath.strip()):
        raise CommandError("filepath must be a non-empty string (or left out for a temp file)")
    if bpy.app.background:
        raise CommandError(
            "get_viewport_screenshot needs Blender's user interface: this Blender runs in background mode, "
            "which has no viewport to capture. Render the scene camera instead, e.g. execute_code with "
            "bpy.ops.render.render(write_still=True)"
        )
    window, area = _largest_view3d(bpy)
    if filepath is not None:
        path = os.path.abspath(os.path.expanduser(filepath))
        if not os.path.isdir(os.path.dirname(path)):
            raise CommandError(f"the folder for filepath does not exist: {os.path.dirname(path)}")
    else:
        path = _new_temp_shot(ext)
    fd, capture = tempfile.mkstemp(prefix="bld_remote_capture_", suffix=".png")
    os.close(fd)
    try:
        if hasattr(bpy.context, "temp_override"):
            with bpy.context.temp_override(window=window, area=area):
                bpy.ops.screen.screenshot_area(filepath=capture)
        else:  # Blender < 3.2: dict overrides
            bpy.ops.screen.screenshot_area({"window": window, "area": area}, filepath=capture)
        image = bpy.data.images.load(capture, check_existing=False)
        try:
            width, height = (int(v) for v in image.size)
            if width < 1 or height < 1:
                raise CommandError("the viewport capture is empty")
            longest = max(width, height)
            if longest > max_size:
                width = max(1, round(width * max_size / longest))
                height = max(1, round(height * max_size / longest))
                image.scale(width, height)
            image.filepath_raw = path
            image.file_format = file_format
            image.save()
        finally:
            bpy.data.images.remove(image)
    finally:
        try:
            os.remove(capture)
        except OSError:
            pass
    return {
        "success": True,
        "width": width,
        "height": height,
        "filepath": path,
        "format": "jpeg" if file_format == "JPEG" else "png",
        "mime_type": mime,
        "size": os.path.getsize(path),
    }


# --- render_image ----------------------------------------------------------------------------------------

# Engine names a client may give → Blender's identifiers, tried in order. EEVEE is BLENDER_EEVEE_NEXT in
# Blender 4.2-4.x and BLENDER_EEVEE before and after.
_RENDER_ENGINES = {
    "WORKBENCH": ("BLENDER_WORKBENCH",),
    "BLENDER_WORKBENCH": ("BLENDER_WORKBENCH",),
    "CYCLES": ("CYCLES",),
    "EEVEE": ("BLENDER_EEVEE_NEXT", "BLENDER_EEVEE"),
    "BLENDER_EEVEE": ("BLENDER_EEVEE_NEXT", "BLENDER_EEVEE"),
    "BLENDER_EEVEE_NEXT": ("BLENDER_EEVEE_NEXT", "BLENDER_EEVEE"),
}
_RENDER_MAX_SIDE = 8192
_RENDER_DEFAULT_LONGEST = 1920
_CYCLES_DEFAULT_SAMPLES = 16
_RENDER_MAX_SAMPLES = 1 << 16


def _positive_int(params: dict[str, Any], name: str, limit: int) -> int | None:
    """``params[name]`` as a whole number from 1 to ``limit`` (an integral float such as 800.0 counts), or
    None when it is absent or null. Anything else — 0, negatives, fractions, NaN, ±inf, 2**64, strings,
    bools — is a CommandError naming the field and its range, raised before any bpy call sees it."""
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise CommandError(f"{name} must be an integer from 1 to {limit}, got {value!r}")
    return value


def _render_size(scene: Any, width: int | None, height: int | None) -> tuple[int, int]:
    """The requested size; a missing side follows the scene's aspect ratio (and must stay within
    ``_RENDER_MAX_SIDE``). Neither: the scene's output size, at most 1920 on its longest side."""
    r = scene.render
    sx = max(1, round(r.resolution_x * r.resolution_percentage / 100))
    sy = max(1, round(r.resolution_y * r.resolution_percentage / 100))
    if width and height:
        return width, height
    if width:
        derived = max(1, round(width * sy / sx))
        if derived > _RENDER_MAX_SIDE:
            raise CommandError(
                f"width {width} at the scene's aspect ratio ({sx}x{sy}) makes the height {derived}, more than "
                f"{_RENDER_MAX_SIDE}: give a smaller width, or both width and height"
            )
        return width, derived
    if height:
        derived = max(1, round(height * sx / sy))
        if derived > _RENDER_MAX_SIDE:
            raise CommandError(
                f"height {height} at the scene's aspect ratio ({sx}x{sy}) makes the width {derived}, more than "
                f"{_RENDER_MAX_SIDE}: give a smaller height, or both width and height"
            )
        return derived, height
    longest = max(sx, sy)
    if longest > _RENDER_DEFAULT_LONGEST:
        return max(1, round(sx * _RENDER_DEFAULT_LONGEST / longest)), max(
            1, round(sy * _RENDER_DEFAULT_LONGEST / longest)
        )
    return sx, sy


def _set_engine(scene: Any, name: str, setattr_saved: Callable[[Any, str, Any], None]) -> str:
    """Switch the scene to the engine a client named (see ``_RENDER_ENGINES``); returns Blender's name."""
    for candidate in _RENDER_ENGINES[name]:
        try:
            setattr_saved(scene.render, "engine", candidate)
            return candidate
        except TypeError:
            pass
    raise CommandError(f"this Blender has no {name} render engine")


def _cycles_gpu_ready(bpy: Any) -> tuple[bool, str]:
    """Whether Cycles can render on a GPU here: a compute device type chosen in the preferences, and at least
    one GPU device of that type enabled. Returns (ready, why not)."""
    addon = bpy.context.preferences.addons.get("cycles")
    prefs = getattr(addon, "preferences", None)
    if prefs is None:
        return False, "the Cycles add-on's preferences are not available"
    kind = getattr(prefs, "compute_device_type", "NONE")
    if kind in ("", "NONE"):
        return False, "no GPU compute device type is chosen in Preferences > System > Cycles Render Devices"
    try:
        if hasattr(prefs, "refresh_devices"):
            prefs.refresh_devices()
        devices = list(prefs.devices)
    except Exception as exc:  # the device probe itself failed
        return False, f"the GPU devices could not be listed ({exc})"
    if not any(d.use and d.type == kind for d in devices):
        return False, f"no {kind} device is enabled (or found) in the preferences"
    return True, ""


def _denoiser_ready(bpy: Any, scene: Any, device: str) -> tuple[bool, str]:
    """Whether Cycles can denoise a final render here. OpenImageDenoise is missing from some builds (Debian's
    Blender 3.4.1); OptiX needs an OptiX GPU."""
    try:
        import _cycles  # type: ignore[import-not-found]

        oidn = bool(getattr(_cycles, "with_openimagedenoise", True))
    except ImportError:
        oidn = True
    if oidn:
        return True, ""
    # Without OpenImageDenoise only OptiX is left (reading `denoiser` when no item is available warns).
    addon = bpy.context.preferences.addons.get("cycles")
    kind = getattr(getattr(addon, "preferences", None), "compute_device_type", "NONE")
    if device == "GPU" and kind == "OPTIX":
        return True, ""
    return False, "this Blender was built without OpenImageDenoise (and renders on no OptiX GPU)"


def _engine_settings(
    bpy: Any,
    scene: Any,
    engine: str,
    samples: int | None,
    device: str | None,
    denoise: bool | None,
    setattr_saved: Callable[[Any, str, Any], None],
    warnings: list[str],
) -> dict[str, Any]:
    """Settings for a CYCLES or EEVEE render: the scene's and the preferences' own (Cycles device, denoising)
    unless the request overrides them; what this Blender cannot do falls back, with a warning saying so.
    Returns what the render uses (``device``, ``denoise`` for Cycles)."""
    used: dict[str, Any] = {}
    if engine == "CYCLES":
        cycles = scene.cycles
        setattr_saved(cycles, "samples", samples or _CYCLES_DEFAULT_SAMPLES)
        want_device = device or cycles.device
        if want_device == "GPU":
            ready, why = _cycles_gpu_ready(bpy)
            if not ready:
                warnings.append(f"rendered on the CPU instead of the GPU: {why}")
                want_device = "CPU"
        if want_device != cycles.device:
            setattr_saved(cycles, "device", want_device)
        want_denoise = cycles.use_denoising if denoise is None else denoise
        if want_denoise:
            ready, why = _denoiser_ready(bpy, scene, want_device)
            if not ready:
                warnings.append(f"rendered without denoising: {why}")
                want_denoise = False
        if want_denoise != cycles.use_denoising:
            setattr_saved(cycles, "use_denoising", want_denoise)
        used = {"device": want_device, "denoise": want_denoise}
    elif engine.startswith("BLENDER_EEVEE") and samples:
        setattr_saved(scene.eevee, "taa_render_samples", samples)
    return used


class _RenderSlot:
    """A command that renders leaves no "Render Result" behind when there was none before it (bpy as a module
    starts without one). Blender's Python API cannot remove a render slot (3.4 to 5.3), so an existing
    "Render Result" shows the command's last render afterwards, as after any render."""

    def __init__(self, bpy: Any) -> None:
        self.bpy = bpy
        self.existed = True

    def enter(self) -> None:
        self.existed = self.bpy.data.images.get("Render Result") is not None

    def leave(self) -> None:
        image = self.bpy.data.images.get("Render Result")
        if image is None or self.existed:
            return
        try:
            self.bpy.data.images.remove(image)
        except Exception as exc:  # the render itself is what the client asked for
            print(
                f"bld_remote [WARNING] could not remove Render Result: {exc!r}", file=sys.stderr, flush=True
            )


def render_image(params: dict[str, Any]) -> dict[str, Any]:
    """Render the scene camera to a PNG (works headless): ``width``, ``height``, ``engine`` (WORKBENCH, CYCLES,
    EEVEE), ``samples``; ``device`` (CPU, GPU) and ``denoise`` (Cycles; default: the scene's settings);
    ``filepath`` (default: a fresh temp file, ``temporary: true``); ``inline`` returns the bytes as ``data``
    (base64 on the wire) and removes the file. ``warnings`` lists what this Blender could not do as set up
    (a GPU, a denoiser) and how the render fell back.

    Reports progress (``_core.report_progress``) when the render starts, on each render-stats update (Cycles
    and EEVEE call these, some from their render threads), when it ends and when the file is written. The
    scene's render settings are restored afterwards.
    """
    bpy = _bpy()
    from . import _core

    # Every parameter is checked before anything touches bpy (docs/PROTOCOL.md, "Numbers").
    name = str(params.get("engine") or "WORKBENCH").upper()
    if name not in _RENDER_ENGINES:
        raise CommandError(f"engine must be WORKBENCH, CYCLES or EEVEE, got {params.get('engine')!r}")
    width = _positive_int(params, "width", _RENDER_MAX_SIDE)
    height = _positive_int(params, "height", _RENDER_MAX_SIDE)
    samples = _positive_int(params, "samples", _RENDER_MAX_SAMPLES)
    device = params.get("device")
    if device is not None:
        if not isinstance(device, str) or device.upper() not in ("CPU", "GPU"):
            raise CommandError(f"device must be CPU or GPU, got {device!r}")
        device = device.upper()
    denoise = params.get("denoise")
    if denoise is not None and not isinstance(denoise, bool):
        raise CommandError(f"denoise must be true or false, got {denoise!r}")
    inline = bool(params.get("inline", False))
    filepath = params.get("filepath")
    if filepath is not None and (not isinstance(filepath, str) or not filepath.strip()):
        raise CommandError("filepath must be a non-empty string (or left out for a temp file)")
    scene = bpy.context.scene
    if scene.camera is None:
        raise CommandError(
            "the scene has no active camera to render from: add one and set it, e.g. "
            "bpy.ops.object.camera_add(location=(7, -7, 5)); bpy.context.scene.camera = bpy.context.object"
        )
    width, height = _render_size(scene, width, height)

    r = scene.render
    saved: list[tuple[Any, str, Any]] = []

    def setattr_saved(obj: Any, attr: str, value: Any) -> None:
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    count = [0]

    def report(message: str) -> None:
        count[0] += 1
        try:
            _core.report_progress(float(count[0]), None, message)
        except BaseException:  # progress must never break a render
            pass

    def on_pre(*_args: Any) -> None:
        report("render started")

    last_stats = [0.0]

    def on_stats(*args: Any) -> None:
        # Cycles calls this many times a second, from its render thread: pass on at most 5 a second.
        now = time.monotonic()
        if now - last_stats[0] < 0.2:
            return
        last_stats[0] = now
        # Some Blender versions pass the stats line; 3.4 passes None.
        text = next((a for a in args if isinstance(a, str)), None)
        report(
            text.rsplit("|", 1)[-1].strip() if text else f"rendering ({time.perf_counter() - started:.1f} s)"
        )

    def on_post(*_args: Any) -> None:
        report("render finished")

    hooks = [
        (bpy.app.handlers.render_pre, on_pre),
        (bpy.app.handlers.render_stats, on_stats),
        (bpy.app.handlers.render_post, on_post),
    ]
    path = ""
    temporary = False
    warnings: list[str] = []
    try:
        engine = _set_engine(scene, name, setattr_saved)
        setattr_saved(r, "resolution_x", width)
        setattr_saved(r, "resolution_y", height)
        setattr_saved(r, "resolution_percentage", 100)
        used = _engine_settings(bpy, scene, engine, samples, device, denoise, setattr_saved, warnings)
        if filepath is not None:
            path = os.path.abspath(os.path.expanduser(filepath))
            if not os.path.isdir(os.path.dirname(path)):
                raise CommandError(f"the folder for filepath does not exist: {os.path.dirname(path)}")
        else:
            fd, path = tempfile.mkstemp(prefix="bld_remote_render_", suffix=".png")
            os.close(fd)
            temporary = True
        report(f"rendering {width}x{height} with {engine}" + (f" on the {used['device']}" if used else ""))
        started = time.perf_counter()
        for handlers, fn in hooks:
            handlers.append(fn)
        bpy.ops.render.render(write_still=False)
        duration = time.perf_counter() - started
        result = bpy.data.images.get("Render Result")
        if result is None:
            raise CommandError("the render produced no image")
        settings = r.image_settings
        setattr_saved(settings, "file_format", "PNG")
        setattr_saved(settings, "color_mode", "RGBA")
        setattr_saved(settings, "color_depth", "8")
        result.save_render(path, scene=scene)
        report("PNG written")
        reply: dict[str, Any] = {
            "width": width,
            "height": height,
            "engine": engine,
            "duration": duration,
            "format": "png",
            "mime_type": "image/png",
            "size": os.path.getsize(path),
            "warnings": warnings,
        }
        reply.update(used)
        if inline:
            with open(path, "rb") as f:
                reply["data"] = f.read()  # bytes → base64 on the network thread
            if temporary:
                os.remove(path)
            reply["temporary"] = False
        else:
            reply["filepath"] = path
            reply["temporary"] = temporary
        return reply
    except BaseException:
        if temporary and path:
            try:
                os.remove(path)
            except OSError:
                pass
        raise
    finally:
        for handlers, fn in hooks:
            while fn in handlers:
                handlers.remove(fn)
        for obj, attr, value in reversed(saved):
            try:
                setattr(obj, attr, value)
            except Exception:  # restore what can be restored
                pass


# The commands defined here; bld_remote/table.py adds those of the other modules (scene queries, views,
# export, data-blocks, the API lookup), which import CommandError and _bpy from this one (so this module
# imports none of them: no import cycle).
HANDLERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "execute_code": execute_code,
    "get_viewport_screenshot": get_viewport_screenshot,
    "render_image": render_image,
}

# Called after every command in CHANGES_DATA (bld_remote/table.py adds datablocks.note_changes).
AFTER_CHANGES: list[Callable[[], None]] = []

# Commands that may change Blender data: each is one undo step in the GUI (see ``dispatch``).
CHANGES_DATA = frozenset({"execute_code"})
