"""deploy/k8s/*.yaml against the Kubernetes OpenAPI schemas (kubernetes-validate, offline) and the fleet layout.

Validation only: nothing here applies the manifests to a cluster. CRD kinds (the Kubeflow PyTorchJob) have no schema
in the package and are skipped by name below; any other kind without a schema fails.
"""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate  # the `test` extra: a missing validator fails here instead of skipping
import pytest
import yaml

K8S_VERSION = "1.37.0"                          # shipped by kubernetes-validate 1.37.0
CRD_KINDS = {("kubeflow.org/v1", "PyTorchJob")}  # custom resources: the validator has no schema for them
MANIFESTS = sorted((Path(__file__).resolve().parent.parent / "deploy" / "k8s").glob("*.yaml"))
DOCS = [(p.name, d) for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]


def validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def of_kind(kind: str) -> list[dict]:
    return [d for _, d in DOCS if d["kind"] == kind]


def by_name(kind: str, name: str) -> dict:
    (doc,) = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    return doc


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_manifests_found():
    assert {p.name for p in MANIFESTS} >= {"server.yaml", "trainer.yaml", "trainer-elastic-round.yaml"}


@pytest.mark.parametrize("doc", [d for _, d in DOCS], ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in DOCS])
def test_validates_against_kubernetes_schema(doc):
    if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
        pytest.skip(f"{doc['kind']} is a CRD: no schema in kubernetes-validate")
    validate(doc)


def test_validator_rejects_broken_manifests():
    good = by_name("Deployment", "livetower-server")
    validate(good)
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["replicas"] = "three"
    unknown_field = copy.deepcopy(good)
    unknown_field["spec"]["template"]["spec"]["containers"][0]["imagee"] = "livetower:0.1.0"
    for bad in (wrong_type, unknown_field):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate(bad)


def test_server_is_a_fleet_without_shared_volume():
    server = by_name("Deployment", "livetower-server")
    assert server["spec"]["replicas"] >= 2
    pod = server["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    cmd = container["command"]
    assert cmd[:3] == ["livetower", "serve", "--fleet"]
    assert cmd[cmd.index("--events") + 1].startswith("kafka://")
    assert cmd[cmd.index("--registry") + 1].startswith("s3://")
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    token = [v for v in pod["volumes"] if "secret" in v]
    assert [v["secret"]["defaultMode"] for v in token] == [0o400]


def test_one_trainer():
    trainers = [d for d in of_kind("Deployment") if d["metadata"]["labels"]["component"] == "trainer"]
    assert [d["spec"]["replicas"] for d in trainers] == [1]
    assert trainers[0]["spec"]["strategy"]["type"] == "Recreate"


def test_services_select_pods():
    server_labels = by_name("Deployment", "livetower-server")["spec"]["template"]["metadata"]["labels"]
    headless = by_name("Service", "livetower-replicas")
    assert headless["spec"]["clusterIP"] == "None"
    assert selects(headless["spec"]["selector"], server_labels)
    assert selects(by_name("PodDisruptionBudget", "livetower-server")["spec"]["selector"]["matchLabels"],
                   server_labels)
    # Deployments, and the Job of a multi-node round (its rendezvous Service selects the Job's pods).
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in of_kind("Deployment") + of_kind("Job")]
    for service in of_kind("Service"):
        assert any(selects(service["spec"]["selector"], labels) for labels in pod_labels), service["metadata"]


def test_claims_exist():
    claims = {d["metadata"]["name"] for d in of_kind("PersistentVolumeClaim")}
    pods = [d["spec"]["template"]["spec"] for d in of_kind("Deployment") + of_kind("Job")]
    pods += [r["template"]["spec"] for d in of_kind("PyTorchJob") for r in d["spec"]["pytorchReplicaSpecs"].values()]
    used = {v["persistentVolumeClaim"]["claimName"]
            for pod in pods for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert used and used <= claims
