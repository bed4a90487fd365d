"""What one QLoRAJob CRD's spec schema has that another's lacks, and a value each new property
accepts: how the Helm lifecycle test finds a field to use after upgrading from the previous release,
whatever the field turns out to be."""

from dataclasses import dataclass

Path = tuple[str, ...]  # property names below spec, e.g. ("resources", "priorityClassName")


def spec_schema(crd: dict) -> dict:
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def properties(schema: dict, below: Path = ()) -> dict[Path, dict]:
    """Every property reachable through objects (not through array items, which a job would have
    to invent whole elements for)."""
    found = {}
    for name, sub in (schema.get("properties") or {}).items():
        found[below + (name,)] = sub
        found.update(properties(sub, below + (name,)))
    return found


class NoExample(ValueError):
    pass


def example(schema: dict):
    """A value the schema accepts, as neutral as can be: its default where it has one."""
    if "default" in schema:
        return schema["default"]
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "boolean":
        return False
    if kind in ("integer", "number"):
        low = schema.get("minimum", 0)
        return low + 1 if schema.get("exclusiveMinimum") else low
    if kind == "string" and not (schema.get("pattern") or schema.get("format")):
        return "x" * max(1, schema.get("minLength", 1))
    if kind == "array" and not schema.get("minItems"):
        return []
    if kind == "object" or "properties" in schema:
        return {name: example(schema["properties"][name]) for name in schema.get("required", [])}
    raise NoExample(f"no value to invent for {schema}")


def defaulted(schema: dict, value):
    """`value` as the API server stores and serves it: defaults filled in below it, recursively."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    out = dict(value)
    for name, sub in schema["properties"].items():
        if name not in out and "default" in sub:
            out[name] = sub["default"]
        if name in out:
            out[name] = defaulted(sub, out[name])
    return out


@dataclass(frozen=True)
class NewProperty:
    path: Path
    schema: dict
    value: object

    @property
    def served(self):
        """The value as a job that sets it reads back."""
        return defaulted(self.schema, self.value)

    @property
    def served_default(self):
        """What a job that never set it reads back once the API server defaults it."""
        return defaulted(self.schema, self.schema["default"])

    @property
    def dotted(self) -> str:
        return "spec." + ".".join(self.path)

    def as_spec(self) -> dict:
        """{"a": {"b": value}} for path (a, b): a spec fragment to merge into a job's spec."""
        fragment = self.value
        for name in reversed(self.path):
            fragment = {name: fragment}
        return fragment


def new_properties(old_crd: dict, new_crd: dict) -> list[NewProperty]:
    """The outermost spec properties the new CRD has and the old lacks, each with an example value,
    those with a default first (setting a field to its default changes nothing a job does)."""
    old, new = properties(spec_schema(old_crd)), properties(spec_schema(new_crd))
    added = [path for path in new if path not in old]
    outermost = [path for path in added if not any(path[:i] in added for i in range(1, len(path)))]
    found = []
    for path in outermost:
        try:
            found.append(NewProperty(path, new[path], example(new[path])))
        except NoExample:
            continue
    return sorted(found, key=lambda p: ("default" not in p.schema, len(p.path), p.path))


def lookup(spec: dict, path: Path):
    """The value at `path` in a job's spec; KeyError when it or an ancestor is absent."""
    value = spec
    for name in path:
        value = value[name]
    return value
