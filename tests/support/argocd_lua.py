"""Runs an Argo CD health.lua the way Argo CD does, in a real Lua 5.1 (lupa embeds it).

Argo CD runs health scripts in gopher-lua, a Lua 5.1, with the object as the global `obj`
(decoded from JSON: numbers are doubles, null is nil), takes the table the script returns, JSON
encodes it into {status, message} and turns any status outside its six into Unknown. Scripts
from argocd-cm run without Lua's standard libraries (only base functions, `table`, `package`
and a safe `os`): `restricted=True` takes the string library away, method calls on strings
included, so a script that would fail in a real Argo CD fails here too. Argo's own test runner
(TestLuaHealthScript) opens every library; `restricted=False` is that.
"""

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

import lupa.lua51
import yaml

VALID_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}

# Argo CD opens package, base, table and a reduced os for scripts from argocd-cm (util/lua/lua.go).
_RESTRICT = """
getmetatable("").__index = nil
string, io, math, coroutine, debug = nil, nil, nil, nil, nil
local clock, date, time = os.clock, os.date, os.time
os = {clock = clock, date = date, time = time}
"""


@dataclass(frozen=True)
class HealthStatus:
    status: str
    message: str = ""


def as_json_object(obj) -> dict:
    """What Argo's YAML decoder (sigs.k8s.io/yaml: YAML to JSON) hands over: timestamps stay strings."""
    def text(value):
        if isinstance(value, (datetime.date, datetime.datetime)):
            return value.isoformat().replace("+00:00", "Z")
        raise TypeError(f"{type(value)} is not JSON")
    return json.loads(json.dumps(obj, default=text))


def evaluate(script: str, obj: dict, restricted: bool = True) -> HealthStatus:
    lua = lupa.lua51.LuaRuntime(register_eval=False, register_builtins=False)
    if restricted:
        lua.execute(_RESTRICT)
    lua.globals().obj = lua.table_from(as_json_object(obj), recursive=True)
    returned = lua.execute(script)
    if lupa.lua51.lua_type(returned) != "table":
        raise AssertionError(f"health.lua returned {lupa.lua51.lua_type(returned)}, Argo CD expects a table")
    status, message = returned["status"], returned["message"]
    if status not in VALID_STATUSES:
        return HealthStatus("Unknown", "Lua returned an invalid health status")
    return HealthStatus(status, message or "")


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def health_tests(folder: Path) -> list[tuple[Path, HealthStatus]]:
    """The cases of health_test.yaml as Argo's runner reads them: (input object, expected health)."""
    spec = load_yaml(folder / "health_test.yaml")
    return [(folder / case["inputPath"], HealthStatus(case["healthStatus"]["status"],
                                                      case["healthStatus"].get("message", "")))
            for case in spec["tests"]]
