"""Cross-field rules, written once and enforced twice.

Each rule carries the CEL expression that the API server evaluates (it lands in the CRD as
`x-kubernetes-validations`) and the same check in Python, which the models run on every
validation, so the trainer and `kubectl apply` refuse the same specs with the same message.
`tests/test_api_rules.py` applies specs to the real API server to keep the two in agreement.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import model_validator
from pydantic.json_schema import GetJsonSchemaHandler
from pydantic_core import CoreSchema

from qlora_api.base import ApiModel


@dataclass(frozen=True)
class CrossFieldRule:
    cel: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None

    def to_crd(self) -> dict:
        rule = {"rule": self.cel, "message": self.message}
        if self.field_path:
            rule["fieldPath"] = self.field_path
        return rule


def immutable(what: str) -> dict:
    """Schema extra for a field that may not change once the job exists (a CEL transition rule)."""
    return {
        "x-kubernetes-validations": [
            {
                "rule": "self == oldSelf",
                "message": f"{what} is immutable once the QLoRAJob exists: "
                "create a new QLoRAJob to train with different settings",
            }
        ]
    }


class RuledModel(ApiModel):
    """An API model with cross-field rules (see CrossFieldRule)."""

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = ()

    @model_validator(mode="after")
    def _enforce_cross_field_rules(self):
        for rule in type(self).cross_field_rules:
            if not rule.check(self):
                raise ValueError(rule.message)
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler):
        schema = handler(core_schema)
        target = handler.resolve_ref_schema(schema)
        if cls.cross_field_rules:
            target["x-kubernetes-validations"] = [r.to_crd() for r in cls.cross_field_rules]
        return schema
