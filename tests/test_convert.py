"""Results converted to JSON deliberately, and the outcome always stated (issue 14, "outcome always stated"),
against a real headless Blender: every Python type's conversion as docs/PROTOCOL.md ("Converting results")
says; lossy conversions (NaN, ±inf, ints beyond 64 bits, keys that collide) are listed in `warnings` with
the JSON Pointer of the place; a result that cannot be converted at all gives an error that still says
`"ran": true` and carries the output printed so far; code that raises says `"ran": true` too. The
connection serves the next request after each."""

from __future__ import annotations

import base64

from helpers import Conn, ok


def run(c: Conn, code: str) -> dict:
    return c.request("execute_code", code=code)


def test_each_type_converts_as_documented(served):
    code = (
        "import mathutils\n"
        "result = {\n"
        "    'none': None, 'bool': True, 'int': -2**63, 'uint': 2**64 - 1, 'float': 0.1,\n"
        "    'str': 'é😀', 'bytes': b'\\x00\\xffab', 'tuple': (1, 2), 'list': [1, [2]],\n"
        "    'set': {7}, 'frozenset': frozenset({8}),\n"
        "    'keys': {2: 'two', None: 'none', True: 'true', (1, 2): 'tuple'},\n"
        "    'vector': mathutils.Vector((1, 2, 3)), 'matrix': mathutils.Matrix.Identity(2),\n"
        "    'color': mathutils.Color((0.5, 0.25, 0)), 'object': bpy.data.objects[0],\n"
        "    'other': range(3),\n"
        "}\n"
    )
    with Conn(served.port) as c:
        r = ok(run(c, code))
        v = r["value"]
        assert "warnings" not in r, r["warnings"]
        assert v["none"] is None and v["bool"] is True
        assert v["int"] == -(2**63) and v["uint"] == 2**64 - 1 and v["float"] == 0.1
        assert v["str"] == "é😀"
        assert base64.b64decode(v["bytes"]) == b"\x00\xffab"
        assert v["tuple"] == [1, 2] and v["list"] == [1, [2]] and v["set"] == [7] and v["frozenset"] == [8]
        assert v["keys"] == {"2": "two", "None": "none", "True": "true", "(1, 2)": "tuple"}
        assert v["vector"] == [1.0, 2.0, 3.0] and v["matrix"] == [[1.0, 0.0], [0.0, 1.0]]
        assert v["color"] == [0.5, 0.25, 0.0]
        assert isinstance(v["object"], str) and v["object"]
        assert v["other"] == "range(0, 3)"


def test_numpy_values_convert_to_plain_numbers(served):
    code = (
        "try:\n"
        "    import numpy as np\n"
        "except ImportError:\n"
        "    result = 'no numpy'\n"
        "else:\n"
        "    result = {'f32': np.float32(1.5), 'i64': np.int64(-3), 'b': np.bool_(True),\n"
        "              'arr': np.arange(3), 'f64': np.float64(2.5)}\n"
    )
    with Conn(served.port) as c:
        v = ok(run(c, code))["value"]
        if v == "no numpy":
            return
        assert v == {"f32": 1.5, "i64": -3, "b": True, "arr": [0, 1, 2], "f64": 2.5}, v


def test_lossy_conversions_are_warned_with_their_place(served):
    code = (
        "class Same:\n"
        "    def __init__(self, n): self.n = n\n"
        "    def __str__(self): return 'same'\n"
        "    def __repr__(self): return f'Same({self.n})'\n"
        "deep = []\n"
        "deep.append(deep)\n"
        "result = {\n"
        "    'nan': float('nan'), 'inf': [float('inf'), -float('inf')], 'huge': 2**64, 'neg': -2**63 - 1,\n"
        "    'clash': {1: 'a', '1': 'b'}, 'objs': {Same(1): 1, Same(2): 2}, 'deep': deep,\n"
        "}\n"
        "print('printed')\n"
    )
    with Conn(served.port) as c:
        r = ok(run(c, code))
        v, warnings = r["value"], r["warnings"]
        assert v["nan"] is None and v["inf"] == [None, None]
        assert v["huge"] == str(2**64) and v["neg"] == str(-(2**63) - 1)
        assert v["clash"]["1"] in ("a", "b") and len(v["clash"]) == 1
        assert len(v["objs"]) == 1
        text = "\n".join(warnings)
        for where in (
            "/value/nan: NaN is not a JSON number",
            "/value/inf/0: inf",
            "/value/inf/1: -inf",
            "/value/huge: an int beyond 64 bits",
            "/value/neg: an int beyond 64 bits",
            '/value/clash/1: two keys became "1"',
            '/value/objs/same: two keys became "same"',
            "/value/deep",
        ):
            assert where in text, (where, warnings)
        assert "nested deeper than 200 levels" in text
        # The rest of the reply is intact.
        assert r["output"]["stdout"] == "printed\n"
        assert ok(c.request("ping"))["pong"] is True


def test_unconvertible_result_says_it_ran_and_keeps_the_output(served):
    # repr() raises: the add-on's own walk cannot convert it.
    bad_repr = (
        "class Bad:\n"
        "    def __repr__(self): raise ValueError('no repr for you')\n"
        "print('side effect done')\n"
        "bpy.context.scene['bld_remote_convert_test'] = 1\n"
        "result = [1, Bad()]\n"
    )
    # str() of a dict key raises: the native conversion cannot convert it.
    bad_key = (
        "class Key:\n"
        "    def __hash__(self): return 1\n"
        "    def __str__(self): raise RuntimeError('no str for you')\n"
        "print('out'); import sys; print('err', file=sys.stderr)\n"
        "result = {Key(): 1, 'fine': 2}\n"
    )
    with Conn(served.port) as c:
        r = run(c, bad_repr)
        assert r["status"] == "error" and r["ran"] is True, r
        assert "the code ran, but its result could not be converted to JSON" in r["message"], r
        assert "no repr for you" in r["message"]
        assert r["output"]["stdout"] == "side effect done\n", r
        # The side effect happened, and a retry would know it.
        assert ok(run(c, "result = bpy.context.scene.get('bld_remote_convert_test')"))["value"] == 1

        r = run(c, bad_key)
        assert r["status"] == "error" and r["ran"] is True, r
        assert "the command ran, but its result could not be converted to JSON" in r["message"], r
        assert "no str for you" in r["message"] and r["errors"][0].startswith("/value: "), r
        assert r["output"] == {"stdout": "out\n", "stderr": "err\n"}, r
        assert ok(c.request("ping"))["pong"] is True
        assert ok(c.request("get_scene_info"))["object_count"] >= 0


def test_code_that_raises_says_it_ran(served):
    with Conn(served.port) as c:
        r = run(c, "print('before')\n1/0\n")
        assert r["status"] == "error" and r["ran"] is True and r["exception"] == "ZeroDivisionError", r
        assert r["output"]["stdout"] == "before\n"
