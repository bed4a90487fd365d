"""The local cluster's one QLoRAJob CRD, which every cluster test shares: read it, set it to another
release's document, put the working tree's back. Only under crd_schema_lock.schema_change()."""

import json

import yaml
from qlora_localcluster import operator_install
from qlora_localcluster.testing import kubectl

from support.helm import helm

NAME = "qlorajobs.training.qlora-operator.dev"


def live(cluster) -> dict:
    return json.loads(kubectl(cluster, "get", "crd", NAME, "-o", "json").stdout)


def working_tree_document() -> dict:
    """The CRD as `helm install` of the working tree's chart creates it (default values)."""
    out = helm("template", "qlora", str(operator_install.CHART), "--show-only", "templates/crd-qlorajobs.yaml").stdout
    return yaml.safe_load(out)


def replace(cluster, document: dict) -> None:
    """Make the CRD exactly `document`, as if that release had created it: its schema, labels and
    annotations, and no field managers, so the next server-side apply (helm's) owns every field it
    sets and drops what it no longer sets, as on a cluster where helm created the CRD.

    A server-side apply could not do this: fields that another manager (the tests' `kubectl apply`)
    owns would stay, leaving the union of both schemas."""
    current = live(cluster)
    body = json.loads(json.dumps(document))
    body["metadata"] = {**{k: v for k, v in document["metadata"].items() if k in ("name", "labels", "annotations")},
                        "resourceVersion": current["metadata"]["resourceVersion"],
                        "managedFields": [{}]}  # an update with one empty entry strips them all
    kubectl(cluster, "replace", "-f", "-", input=json.dumps(body))
    cluster.wait_crds_established(NAME, timeout=30)


def restore_working_tree(cluster) -> None:
    """The working tree's CRD, with the same owner and metadata as every other test applies it."""
    replace(cluster, working_tree_document())
    operator_install.apply_chart(cluster)
