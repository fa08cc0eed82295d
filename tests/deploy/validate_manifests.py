#!/usr/bin/env python3
"""Validates every Kubernetes manifest under deploy/kubernetes offline.

- Core kinds (Namespace, Deployment, DaemonSet, Service, ConfigMap, ...) against the
  Kubernetes schemas shipped by the `kubernetes-validate` package, strictly (unknown
  fields are errors).
- ServiceMonitor against the CRD schema vendored in deploy/kubernetes/schemas/,
  strictly as well.
- Every kustomization is rendered with `kubectl kustomize` and the output validated
  the same way; the swarm image must be named in exactly one place (`images:` of the
  base kustomization) and reach every workload.
- The manifests a Kairos cloud-config writes into k3s's auto-deploy directory
  (`/var/lib/rancher/k3s/server/manifests/`, deploy/kairos/*.yaml) are validated too.
- Self-check: broken manifests (a misspelled field, a wrong type, in a core kind and
  in a ServiceMonitor) must be refused, or the validator itself is broken.

Exit status 0 when everything passes; otherwise each problem on stderr.
Usage: validate_manifests.py REPO_ROOT
"""

import copy
import json
import pathlib
import subprocess
import sys

try:
    import jsonschema
    import kubernetes_validate
    import yaml
except ImportError as e:  # pragma: no cover - reported to the test
    sys.exit(f"missing Python package ({e}): pip install kubernetes-validate (scripts/test does)")

K8S_VERSION = "1.37.0"
IMAGE = "YOUR_REGISTRY/swarm"
K3S_MANIFESTS = "/var/lib/rancher/k3s/server/manifests/"


def strict(schema):
    """A copy of an OpenAPI v3 schema where objects with properties refuse others."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


# Custom resources of the Kairos operator: no schema is vendored for them.
KAIROS_CRDS = {"NodeOpUpgrade"}


class Validator:
    def __init__(self, root):
        self.root = root
        crd = json.loads((root / "deploy/kubernetes/schemas/servicemonitor-v1.json").read_text())
        crd.pop("$comment", None)
        # metadata is validated by the API server, not the CRD schema: allow the usual.
        self.servicemonitor = jsonschema.Draft7Validator(strict(crd))

    def errors(self, doc):
        """Problems with one manifest document (empty when valid)."""
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            return ["not a Kubernetes object (no kind/apiVersion)"]
        if doc["kind"] == "ServiceMonitor":
            if doc["apiVersion"] != "monitoring.coreos.com/v1":
                return [f"ServiceMonitor apiVersion {doc['apiVersion']} (the vendored schema is v1)"]
            return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in self.servicemonitor.iter_errors(doc)]
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            return [f"{'/'.join(map(str, e.path))}: {e.message}"]
        except kubernetes_validate.SchemaNotFoundError as e:
            return [f"no schema for {doc['apiVersion']} {doc['kind']}: {e}"]
        return []


def embedded_manifests(node):
    """(path, content) of every file a cloud-config writes into k3s's manifests dir."""
    if isinstance(node, dict):
        path, content = node.get("path"), node.get("content")
        if isinstance(path, str) and isinstance(content, str) and path.startswith(K3S_MANIFESTS) and path.endswith(".yaml"):
            yield path, content
        for v in node.values():
            yield from embedded_manifests(v)
    elif isinstance(node, list):
        for v in node:
            yield from embedded_manifests(v)


def kustomize(directory):
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed: {out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def main(root):
    root = pathlib.Path(root)
    kube = root / "deploy/kubernetes"
    v = Validator(root)
    problems = []
    checked = 0

    # Self-check first: a validator that accepts anything proves nothing.
    good_ds = next(d for d in yaml.safe_load_all((kube / "agent.yaml").read_text()) if d)
    bad_ds = copy.deepcopy(good_ds)
    bad_ds["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    bad_type = copy.deepcopy(good_ds)
    bad_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "seven"
    good_sm = yaml.safe_load((kube / "monitoring/servicemonitor.yaml").read_text())
    bad_sm = copy.deepcopy(good_sm)
    bad_sm["spec"]["endpoints"][0]["intervall"] = "30s"
    bad_sm_type = copy.deepcopy(good_sm)
    bad_sm_type["spec"]["endpoints"] = {"port": "metrics"}
    for name, doc in [
        ("misspelled container field", bad_ds),
        ("string containerPort", bad_type),
        ("misspelled ServiceMonitor field", bad_sm),
        ("ServiceMonitor endpoints not a list", bad_sm_type),
    ]:
        if not v.errors(doc):
            problems.append(f"self-check: the validator accepted a broken manifest ({name})")

    kustomizations = []
    for path in sorted(kube.rglob("*.yaml")):
        if "schemas" in path.parts:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc.get("kind") == "Kustomization":
                kustomizations.append(path.parent)
                continue
            checked += 1
            for err in v.errors(doc):
                problems.append(f"{path.relative_to(root)}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}: {err}")

    for path in sorted((root / "deploy/kairos").glob("*.yaml")):
        for cloud_config in yaml.safe_load_all(path.read_text()):
            # A plain Kubernetes object (the staging Job and its RBAC, the prefetch
            # DaemonSet) is validated as it is; the Kairos operator's NodeOpUpgrade has
            # no schema here.
            if isinstance(cloud_config, dict) and "kind" in cloud_config and "apiVersion" in cloud_config:
                if cloud_config["kind"] not in KAIROS_CRDS:
                    checked += 1
                    for err in v.errors(cloud_config):
                        name = cloud_config.get("metadata", {}).get("name")
                        problems.append(f"{path.relative_to(root)}: {cloud_config['kind']} {name}: {err}")
                continue
            for target, content in embedded_manifests(cloud_config):
                for doc in yaml.safe_load_all(content):
                    if not doc:
                        continue
                    checked += 1
                    for err in v.errors(doc):
                        name = doc.get("metadata", {}).get("name")
                        problems.append(f"{path.relative_to(root)} ({target}): {doc.get('kind')} {name}: {err}")

    for directory in kustomizations:
        try:
            docs = kustomize(directory)
        except RuntimeError as e:
            problems.append(str(e))
            continue
        for doc in docs:
            checked += 1
            for err in v.errors(doc):
                problems.append(f"kustomize {directory.relative_to(root)}: {doc['kind']} {doc['metadata']['name']}: {err}")
        for doc in docs:
            if doc["kind"] in ("Deployment", "DaemonSet"):
                for c in doc["spec"]["template"]["spec"]["containers"]:
                    if not c["image"].startswith(IMAGE + ":"):
                        problems.append(f"kustomize {directory.relative_to(root)}: {doc['metadata']['name']} runs {c['image']}, not {IMAGE}")

    # The image name is set in one place only.
    places = [
        str(p.relative_to(root))
        for p in sorted(kube.rglob("*"))
        if p.is_file() and IMAGE in p.read_text(errors="replace")
        for _ in range(p.read_text(errors="replace").count(IMAGE))
    ]
    if places != ["deploy/kubernetes/kustomization.yaml"]:
        problems.append(f"the image {IMAGE} should be named once, in deploy/kubernetes/kustomization.yaml: found in {places}")

    for p in problems:
        print(p, file=sys.stderr)
    print(f"{checked} manifests checked, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
