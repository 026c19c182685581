"""The deployment files: Kubernetes manifests, docker-compose.yml, the Debezium connector config.

Validation is offline. `.ci/install-kubeconform` installs into .cache/:
kubeconform (Go module), the Kubernetes JSON schemas (from the
`kubernetes-validate` wheel on PyPI), validators generated from the
prometheus-operator CRDs (npm, run with node), and docker compose if the
docker CLI lacks it. YAML is read with PyYAML (the `dev` extra).

Tests that need those tools, or kubectl/kustomize, are marked `tools`: they fail,
never skip, when a tool is missing; `pytest -m "not tools"` leaves them out.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from bytewax.connectors.kafka import KafkaSourceMessage

from dataflow.decode.envelopes import TOMBSTONE, parse
from dataflow.model import ChangeEvent
from tests.harness import StrictLoader

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
# The optional kustomize component: the materializer run apart (merge mode).
MATERIALIZER = K8S / "materializer"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_ENV_EXAMPLE = ROOT / "deploy" / "compose.env.example"
CONNECTOR = ROOT / "deploy" / "debezium-mongodb.json"
ALERTS = ROOT / "monitoring" / "prometheus" / "alerts.yml"
CRD_KINDS = ("PrometheusRule", "ServiceMonitor")
CORE_KINDS = {
    "ConfigMap",
    "Secret",
    "PersistentVolumeClaim",
    "Service",
    "StatefulSet",
    "PodDisruptionBudget",
    "NetworkPolicy",
}
MATERIALIZER_KINDS = {"Deployment", "Service", "NetworkPolicy"}
PIPELINE = "StatefulSet/cdc-pipeline"
MATERIALIZER_POD = "Deployment/cdc-materializer"


# --- tools -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tools() -> dict[str, str]:
    """Run the (idempotent) installer and return the paths it exports."""
    proc = subprocess.run(
        ["bash", str(ROOT / ".ci" / "install-kubeconform")], capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode != 0:
        pytest.fail(f".ci/install-kubeconform failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    env: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export ") :].partition("=")
            env[name] = shlex.split(value)[0]
    for name in (
        "KUBECONFORM",
        "KUBECONFORM_SCHEMA_LOCATION",
        "KUBERNETES_SCHEMA_VERSION",
        "MANIFEST_NODE_DIR",
    ):
        assert name in env, f".ci/install-kubeconform did not export {name}: {proc.stdout}"
    assert Path(env["KUBECONFORM"]).is_file(), env["KUBECONFORM"]
    return env


def run(args: list[str], *, stdin: str | None = None, cwd: Path = ROOT, env: dict | None = None):
    return subprocess.run(
        args, input=stdin, capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})}
    )


def node(tools: dict[str, str], code: str, stdin: str) -> Any:
    """Run an ES module snippet in the npm folder (so its imports resolve); its stdout is JSON."""
    assert shutil.which("node"), "node is not on PATH"
    proc = run(["node", "--input-type=module", "-e", code], stdin=stdin, cwd=Path(tools["MANIFEST_NODE_DIR"]))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def load_yaml(text: str) -> list[Any]:
    """All documents of a YAML stream, empty ones left out."""
    return [d for d in yaml.load_all(text, Loader=StrictLoader) if d is not None]


def test_load_yaml() -> None:
    assert load_yaml("a: 1\n---\n---\nb: [x, 'y']\n") == [{"a": 1}, {"b": ["x", "y"]}]
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key"):
        load_yaml("a: 1\na: 2\n")


def manifest_files(folder: Path = K8S) -> list[Path]:
    files = sorted(p for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")
    assert files, f"no manifests in {folder}"
    return files


def rendered(folder: Path = K8S) -> str:
    """`kubectl kustomize k8s/` (what `kubectl apply -k` sends), or standalone kustomize."""
    if shutil.which("kubectl"):
        proc = run(["kubectl", "kustomize", str(folder)])
    elif shutil.which("kustomize"):
        proc = run(["kustomize", "build", str(folder)])
    else:
        pytest.fail("neither kubectl nor kustomize is on PATH: cannot render k8s/kustomization.yaml")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# What k8s/README.md tells to uncomment in k8s/kustomization.yaml to run the materializer apart.
COMPONENT_OFF = "# components:\n#   - materializer\n"
COMPONENT_ON = "components:\n  - materializer\n"


def with_materializer(dst: Path) -> Path:
    """A copy of k8s/ at `dst`/k8s with the materializer component switched on as the README says."""
    folder = dst / "k8s"
    shutil.copytree(K8S, folder)
    kustomization = folder / "kustomization.yaml"
    text = kustomization.read_text()
    assert text.count(COMPONENT_OFF) == 1, "k8s/kustomization.yaml lost its commented `components:`"
    kustomization.write_text(text.replace(COMPONENT_OFF, COMPONENT_ON))
    return folder


def kubeconform(tools: dict[str, str], paths: list[str], stdin: str | None = None) -> dict:
    args = [
        tools["KUBECONFORM"],
        "-strict",
        "-summary",
        "-output",
        "json",
        "-verbose",
        "-kubernetes-version",
        tools["KUBERNETES_SCHEMA_VERSION"],
        "-schema-location",
        tools["KUBECONFORM_SCHEMA_LOCATION"],
        # No core schema for these: validated by test_crd_resources_validate instead.
        "-skip",
        ",".join(CRD_KINDS),
        *paths,
    ]
    proc = run(args, stdin=stdin)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"kubeconform printed no JSON (rc {proc.returncode}): {proc.stdout}\n{proc.stderr}")
    report["returncode"] = proc.returncode
    return report


# --- Kubernetes: schemas -----------------------------------------------------------


@pytest.mark.tools
def test_manifests_validate_against_kubernetes_schemas(tools) -> None:
    report = kubeconform(tools, [str(p) for p in manifest_files()])
    problems = [r for r in report["resources"] if r["status"] not in ("statusValid", "statusSkipped")]
    assert not problems, json.dumps(problems, indent=2)
    assert report["returncode"] == 0
    valid = {r["kind"] for r in report["resources"] if r["status"] == "statusValid"}
    skipped = {r["kind"] for r in report["resources"] if r["status"] == "statusSkipped"}
    assert valid == CORE_KINDS, valid
    assert skipped <= set(CRD_KINDS), skipped


@pytest.mark.tools
def test_kustomize_output_validates(tools) -> None:
    report = kubeconform(tools, ["-"], stdin=rendered())
    problems = [r for r in report["resources"] if r["status"] not in ("statusValid", "statusSkipped")]
    assert not problems, json.dumps(problems, indent=2)
    assert report["summary"]["valid"] == 9 and report["summary"]["skipped"] == 2, report["summary"]


@pytest.mark.tools
def test_materializer_manifests_validate_against_kubernetes_schemas(tools) -> None:
    report = kubeconform(tools, [str(p) for p in manifest_files(MATERIALIZER)])
    problems = [r for r in report["resources"] if r["status"] != "statusValid"]
    assert not problems, json.dumps(problems, indent=2)
    assert report["returncode"] == 0
    assert {r["kind"] for r in report["resources"]} == MATERIALIZER_KINDS


@pytest.mark.tools
def test_kustomize_output_with_the_materializer_validates(tools, tmp_path) -> None:
    report = kubeconform(tools, ["-"], stdin=rendered(with_materializer(tmp_path)))
    problems = [r for r in report["resources"] if r["status"] not in ("statusValid", "statusSkipped")]
    assert not problems, json.dumps(problems, indent=2)
    # The pipeline's 9, plus the Deployment, its metrics Service and two NetworkPolicies.
    assert report["summary"]["valid"] == 13 and report["summary"]["skipped"] == 2, report["summary"]


@pytest.mark.tools
def test_kubeconform_rejects_an_invalid_manifest(tools, tmp_path) -> None:
    """A control: the local schemas are really loaded and strict (not silently skipped)."""
    bad = (
        (K8S / "statefulset.yaml")
        .read_text()
        .replace(
            "      terminationGracePeriodSeconds: 90",
            "      terminationGracePeriodSeconds: 90\n      notAField: 1",
        )
    )
    bad = bad.replace("containerPort: 2101", 'containerPort: "comm-port"')
    (tmp_path / "bad.yaml").write_text(bad)
    report = kubeconform(tools, [str(tmp_path / "bad.yaml")])
    [result] = report["resources"]
    assert result["status"] == "statusInvalid", result
    # kubeconform reports nested causes in `msg` (validationErrors only has the top one).
    assert "additional properties 'notAField' not allowed" in result["msg"], result["msg"]
    assert "containerPort': got string, want integer" in result["msg"], result["msg"]


# stdin: a JSON list of the documents (load_yaml's output).
CRD_VALIDATE = """
import { readFileSync } from "node:fs";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
const models = { PrometheusRule, ServiceMonitor };
const out = [];
for (const doc of JSON.parse(readFileSync(0, "utf8"))) {
  if (!doc || !(doc.kind in models)) continue;
  try {
    new models[doc.kind](doc).validate();
    out.push({ kind: doc.kind, name: doc.metadata?.name, error: null });
  } catch (e) {
    out.push({ kind: doc.kind, name: doc.metadata?.name, error: String(e.message ?? e) });
  }
}
console.log(JSON.stringify(out));
"""


@pytest.mark.tools
def test_crd_resources_validate(tools) -> None:
    """PrometheusRule and ServiceMonitor, against validators generated from the operator's CRD schemas."""
    results = node(tools, CRD_VALIDATE, json.dumps(load_yaml(rendered())))
    assert sorted(r["kind"] for r in results) == sorted(CRD_KINDS), results
    assert all(r["error"] is None for r in results), results


@pytest.mark.tools
def test_crd_validator_rejects_an_invalid_rule(tools) -> None:
    bad = """
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata: {name: bad}
spec:
  groups:
    - rules:
        - alert: NoExpr
          for: five minutes
"""
    [result] = node(tools, CRD_VALIDATE, json.dumps(load_yaml(bad)))
    assert result["error"] and "name" in result["error"] and "expr" in result["error"], result


# --- Kubernetes: the PrometheusRule is alerts.yml ----------------------------------------


def generator():
    """k8s/gen-prometheusrule.py as a module (its file name is not importable)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_prometheusrule", K8S / "gen-prometheusrule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheusrule_is_generated_from_alerts_yml() -> None:
    gen = generator()
    assert (K8S / "prometheusrule.yaml").read_text() == gen.render(ALERTS.read_text()), (
        "k8s/prometheusrule.yaml is stale: run python k8s/gen-prometheusrule.py"
    )


def test_prometheusrule_groups_equal_alerts_yml_groups() -> None:
    [alerts] = load_yaml(ALERTS.read_text())
    [rule] = load_yaml((K8S / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule" and rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(alerts) == {"groups"} and alerts["groups"], alerts
    assert rule["spec"] == alerts


def test_generator_refuses_what_it_cannot_embed() -> None:
    gen = generator()
    with pytest.raises(gen.UnsupportedRuleFile):
        gen.render("---\ngroups: []\n")
    with pytest.raises(gen.UnsupportedRuleFile):
        gen.render("groups: []\nextra: 1\n")


# --- Kubernetes: the cluster wiring ---------------------------------------------------


@pytest.fixture(scope="module")
def resources() -> dict[str, dict]:
    docs = load_yaml(rendered())
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


@pytest.mark.tools
def test_statefulset_wiring(resources) -> None:
    sts = resources["StatefulSet/cdc-pipeline"]
    config = resources["ConfigMap/cdc-pipeline-config"]["data"]
    pod = sts["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["serviceName"] == "cdc-pipeline"
    assert int(env["CDC_PROCESSES"]["value"]) == sts["spec"]["replicas"] == 2
    # Draining after SIGTERM must finish before Kubernetes sends SIGKILL.
    assert pod["terminationGracePeriodSeconds"] > float(config["CDC_SHUTDOWN_GRACE_SECONDS"]) + 10
    assert sts["spec"]["replicas"] <= int(config["CDC_RECOVERY_PARTITIONS"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"comm": 2101, "api": 3030}
    headless = resources["Service/cdc-pipeline"]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    assert [p["port"] for p in headless["ports"]] == [2101]
    assert [p["port"] for p in resources["Service/cdc-pipeline-metrics"]["spec"]["ports"]] == [3030]
    # Probes use paths Bytewax 0.21's API serves, and the API is switched on.
    assert env["BYTEWAX_DATAFLOW_API_ENABLED"]["value"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] in ("/dataflow", "/metrics")
        assert container[probe]["httpGet"]["port"] == "api"
    # Credentials only as files from the Secret (test_secret_files_are_mounted_read_only).
    for key in SECRET_VARIABLES:
        assert key not in env and key not in config, key
    assert "Secret/cdc-pipeline-credentials" in resources
    # By default the workers run the materializer (the component in k8s/materializer/ is off).
    assert "CDC_MATERIALIZER" not in env and "CDC_MATERIALIZER" not in config
    assert MATERIALIZER_POD not in resources


@pytest.mark.tools
def test_pod_security(resources) -> None:
    pod = resources["StatefulSet/cdc-pipeline"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "cdc-pipeline-data"
    assert container["resources"]["requests"] and container["resources"]["limits"]


@pytest.mark.tools
def test_recovery_volume_is_shared(resources) -> None:
    """Process 0 creates every recovery partition; the others wait for it in the same directory."""
    pvc = resources["PersistentVolumeClaim/cdc-pipeline-data"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "volumeClaimTemplates" not in resources["StatefulSet/cdc-pipeline"]["spec"]
    assert resources["ConfigMap/cdc-pipeline-config"]["data"]["CDC_RECOVERY_DIR"].startswith("/data/")
    [container] = resources["StatefulSet/cdc-pipeline"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    # One DLQ fallback file per process on the shared volume.
    assert env["CDC_DLQ_FALLBACK"]["value"] == "/data/dlq/$(POD_NAME).jsonl"
    assert list(env).index("POD_NAME") < list(env).index("CDC_DLQ_FALLBACK")


# --- Kubernetes: the materializer run apart (k8s/materializer/, a kustomize component) ---------


@pytest.fixture(scope="module")
def materialized(tmp_path_factory) -> dict[str, dict]:
    """`kubectl kustomize` of k8s/ with the materializer component switched on, by `kind/name`."""
    docs = load_yaml(rendered(with_materializer(tmp_path_factory.mktemp("materializer"))))
    found = {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}
    assert len(found) == len(docs)
    return found


def quantity(text: str) -> float:
    """A Kubernetes memory quantity in bytes (the binary and decimal suffixes the manifests use)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", text)
    assert m, text
    units = {None: 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    units |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return float(m.group(1)) * units[m.group(2)]


def test_quantity_helper() -> None:
    assert quantity("2Gi") == 2 * 2**30 and quantity("512Mi") == 2**29 and quantity("1G") == 1e9


MATERIALIZE = ["python", "-m", "dataflow.cli", "materialize", "--follow", "--metrics-port", "3030"]


@pytest.mark.tools
def test_materializer_deployment_wiring(materialized) -> None:
    deployment = materialized[MATERIALIZER_POD]
    config = materialized["ConfigMap/cdc-pipeline-config"]["data"]
    pod = deployment["spec"]["template"]["spec"]
    pipeline_pod_spec = materialized[PIPELINE]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    [pipeline] = pipeline_pod_spec["containers"]
    # One at a time: two on one table are safe, but each does the other's work again.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template_labels.items()
    # The pipeline's build (the base's `images:` rewrites both), settings and credentials.
    assert container["image"] == pipeline["image"]
    assert container["command"] == MATERIALIZE and "args" not in container
    assert container["envFrom"] == pipeline["envFrom"] == [{"configMapRef": {"name": "cdc-pipeline-config"}}]
    # The switch is for the pipeline only: the StatefulSet's env wins over the ConfigMap.
    env = {e["name"]: e for e in container.get("env", [])}
    pipeline_env = {e["name"]: e for e in pipeline["env"]}
    assert pipeline_env["CDC_MATERIALIZER"] == {"name": "CDC_MATERIALIZER", "value": "off"}
    assert "CDC_MATERIALIZER" not in env and "CDC_MATERIALIZER" not in config
    assert config["CDC_TABLE_MODE"] in ("merge", "both")  # only merge tables have mirrors
    for key in SECRET_VARIABLES:
        assert key not in env, key
    # Metrics on the port the command names; probes on it.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 3030}
    assert container["command"][container["command"].index("--metrics-port") + 1] == str(ports["metrics"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe
    # Room for a MERGE's working memory.
    resources = container["resources"]
    assert quantity(resources["requests"]["memory"]) >= 2 * 2**30
    assert quantity(resources["limits"]["memory"]) >= quantity(resources["requests"]["memory"])
    assert resources["requests"]["cpu"] and resources["limits"]["cpu"]


@pytest.mark.tools
def test_materializer_pod_security(materialized) -> None:
    """The StatefulSet's security context, and no volume but /tmp and the Secret (S3 only: no /data)."""
    pod = materialized[MATERIALIZER_POD]["spec"]["template"]["spec"]
    pipeline_pod_spec = materialized[PIPELINE]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    [pipeline] = pipeline_pod_spec["containers"]
    assert pod["securityContext"] == pipeline_pod_spec["securityContext"]
    assert container["securityContext"] == pipeline["securityContext"]
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounts) == {"/tmp", SECRET_MOUNT}, mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert {e["name"]: e["value"] for e in container["env"]} == {"HOME": "/tmp", "TMPDIR": "/tmp"}


@pytest.mark.tools
def test_materializer_metrics_are_scraped_under_the_pipeline_job(materialized) -> None:
    """The ServiceMonitor scrapes the materializer's metrics Service, and its job label is the one
    every alert selects on: the mirror alerts work whichever process runs the rounds."""
    service = materialized["Service/cdc-materializer-metrics"]
    monitor = materialized["ServiceMonitor/cdc-pipeline"]["spec"]
    labels, ports = workload_pod(materialized, MATERIALIZER_POD)
    pipeline_labels, _ = pipeline_pod(materialized)
    selector = {"matchLabels": service["spec"]["selector"]}
    assert selects(selector, labels) and not selects(selector, pipeline_labels)
    pipeline_selector = {"matchLabels": materialized["Service/cdc-pipeline-metrics"]["spec"]["selector"]}
    assert not selects(pipeline_selector, labels)
    [port] = service["spec"]["ports"]
    assert port["port"] == ports[port["targetPort"]] == 3030
    assert selects(monitor["selector"], service["metadata"]["labels"])
    assert [e["port"] for e in monitor["endpoints"]] == [port["name"]]
    assert service["metadata"]["labels"][monitor["jobLabel"]] == "cdc-pipeline"
    assert 'job="cdc-pipeline"' in ALERTS.read_text()


@pytest.mark.tools
def test_materializer_image_follows_the_base_images(tmp_path) -> None:
    """`kustomize edit set image` in k8s/ (README, Deploy step 1) moves the materializer too."""
    folder = with_materializer(tmp_path)
    kustomization = folder / "kustomization.yaml"
    text = kustomization.read_text()
    changed = text.replace("newName: mongo-delta-cdc\n", "newName: images.example/data/mongo-delta-cdc\n")
    changed = changed.replace("newTag: 0.1.0\n", "newTag: 9.9.9\n")
    assert changed.count("images.example") == 1 and changed.count("9.9.9") == 1, text
    kustomization.write_text(changed)
    docs = {f"{d['kind']}/{d['metadata']['name']}": d for d in load_yaml(rendered(folder))}
    images = {
        key: [c["image"] for c in docs[key]["spec"]["template"]["spec"]["containers"]]
        for key in (PIPELINE, MATERIALIZER_POD)
    }
    assert images == {key: ["images.example/data/mongo-delta-cdc:9.9.9"] for key in images}, images


def test_materializer_component_lists_every_manifest() -> None:
    [component] = load_yaml((MATERIALIZER / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    assert component["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    assert sorted(component["resources"]) == [p.name for p in manifest_files(MATERIALIZER)]
    # Off unless asked for: the base names it only in a comment.
    [kustomization] = load_yaml((K8S / "kustomization.yaml").read_text())
    assert "components" not in kustomization
    assert (K8S / "kustomization.yaml").read_text().count(COMPONENT_OFF) == 1


def test_materializer_command_is_one_the_cli_takes() -> None:
    """The Deployment's command, through `python -m dataflow.cli`'s own parser."""
    from dataflow import cli

    [deployment] = load_yaml((MATERIALIZER / "deployment.yaml").read_text())
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == MATERIALIZE
    args = cli.parser().parse_args(MATERIALIZE[3:])
    assert (args.command, args.follow, args.metrics_port) == ("materialize", True, 3030)


def test_materializer_switch_is_a_setting_the_pipeline_accepts(manifests) -> None:
    """The value the component gives CDC_MATERIALIZER is one the settings take, and means "off"."""
    from dataflow.runtime.settings import Settings

    [component] = load_yaml((MATERIALIZER / "kustomization.yaml").read_text())
    [patch] = [load_yaml(p["patch"])[0] for p in component["patches"]]
    assert patch["kind"] == "StatefulSet" and patch["metadata"]["name"] == "cdc-pipeline"
    [container] = patch["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "pipeline"
    [variable] = container["env"]
    assert variable["name"] == "CDC_MATERIALIZER"
    env = configmap_env(manifests)
    assert Settings.from_env(env).lake.materializer == "embedded"
    assert Settings.from_env({**env, "CDC_MATERIALIZER": variable["value"]}).lake.materializer == "off"


# --- Kubernetes: secrets as files, TLS -------------------------------------------------
#
# These read the files in k8s/ themselves (what `kubectl apply -f` sends): no tool needed.

SECRET_MOUNT = "/etc/cdc/secrets"
# Every variable the pipeline reads that holds a credential: given as `<VARIABLE>_FILE`
# (a path under SECRET_MOUNT), never as a value in the ConfigMap or the pod spec.
SECRET_VARIABLES = (
    "CDC_KAFKA_SASL_USERNAME",
    "CDC_KAFKA_SASL_PASSWORD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    """The documents of k8s/*.yaml, by `kind/name`."""
    docs = [doc for path in manifest_files() for doc in load_yaml(path.read_text())]
    found = {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}
    assert len(found) == len(docs), "two manifests with the same kind and name"
    return found


def test_kustomization_lists_every_manifest() -> None:
    [kustomization] = load_yaml((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in manifest_files()]


def test_secret_variables_are_read_by_the_pipeline() -> None:
    """SECRET_VARIABLES are names the pipeline reads: AWS_* for delta-rs, CDC_KAFKA_* for librdkafka."""
    from dataflow.runtime.settings import kafka_property, librdkafka_refusal, s3_storage_options

    for name in SECRET_VARIABLES:
        if name.startswith("AWS_"):
            assert s3_storage_options({name: "x"})[name] == "x", name
        else:
            assert librdkafka_refusal({kafka_property(name): "x"}) is None, name


@pytest.fixture(scope="module")
def component_manifests(manifests) -> dict[str, dict]:
    """The documents of k8s/*.yaml and k8s/materializer/*.yaml, by `kind/name`."""
    docs = [doc for path in manifest_files(MATERIALIZER) for doc in load_yaml(path.read_text())]
    found = {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}
    assert len(found) == len(docs) and not set(found) & set(manifests), "two manifests with one name"
    return {**manifests, **found}


@pytest.mark.parametrize("workload", [PIPELINE, MATERIALIZER_POD])
def test_secret_files_are_mounted_read_only(component_manifests, workload) -> None:
    manifests = component_manifests
    secret = manifests["Secret/cdc-pipeline-credentials"]
    pod = manifests[workload]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    [volume] = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert volume["secret"]["defaultMode"] == 0o400 == 256
    assert "items" not in volume["secret"]  # every key, at its own name
    [mount] = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == SECRET_MOUNT and mount["readOnly"] is True
    # The kubelet gives the files to fsGroup (root:fsGroup, 0440): the non-root user reads
    # them through that group.
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["fsGroup"] == security["runAsGroup"] == 10001
    # No credential reaches the container as an environment variable.
    assert not [e for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
    assert not [e for e in container.get("envFrom", []) if "secretRef" in e]


def test_configmap_names_every_secret_as_a_file(manifests) -> None:
    from dataflow.runtime.settings import is_secret

    config = manifests["ConfigMap/cdc-pipeline-config"]["data"]
    keys = set(manifests["Secret/cdc-pipeline-credentials"]["stringData"])
    for name in SECRET_VARIABLES:
        assert name not in config, name
        path = config[f"{name}_FILE"]
        assert path.startswith(SECRET_MOUNT + "/") and path[len(SECRET_MOUNT) + 1 :] in keys, (name, path)
    # Every key is some variable's file, and every file named is a key.
    named = {v[len(SECRET_MOUNT) + 1 :] for v in config.values() if v.startswith(SECRET_MOUNT + "/")}
    assert named == keys, (named, keys)
    # Nothing that looks secret is a plain value.
    assert not [k for k in config if is_secret(k) and not k.endswith("_FILE")]


def test_configmap_speaks_tls(manifests) -> None:
    from urllib.parse import urlsplit

    config = manifests["ConfigMap/cdc-pipeline-config"]["data"]
    secret = manifests["Secret/cdc-pipeline-credentials"]["stringData"]
    assert config["CDC_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert config["CDC_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert urlsplit(config["AWS_ENDPOINT_URL"]).scheme == "https"
    assert "AWS_ALLOW_HTTP" not in config
    for name in ("CDC_KAFKA_SSL_CA_LOCATION", "CDC_STORAGE_CA_FILE"):
        key = config[name][len(SECRET_MOUNT) + 1 :]
        assert config[name] == f"{SECRET_MOUNT}/{key}" and "BEGIN CERTIFICATE" in secret[key], name


def configmap_env(manifests: dict[str, dict]) -> dict[str, str]:
    """The ConfigMap with each `<VARIABLE>_FILE` read (a placeholder: the key's name)."""
    env = dict(manifests["ConfigMap/cdc-pipeline-config"]["data"])
    for name in SECRET_VARIABLES:
        env[name] = env.pop(f"{name}_FILE").rsplit("/", 1)[1]
    env.pop("CDC_STORAGE_CA_FILE")  # a file that must exist: not for here
    return env


def test_configmap_is_a_configuration_the_pipeline_accepts(manifests) -> None:
    """The ConfigMap with each `<VARIABLE>_FILE` read (a placeholder) passes the pipeline's checks.

    This puts the Kafka TLS settings through librdkafka's own check of names and values.
    """
    from dataflow.runtime.settings import Settings

    settings = Settings.from_env(configmap_env(manifests))
    assert settings.kafka.client_config == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "ssl.ca.location": f"{SECRET_MOUNT}/kafka-ca.crt",
        "sasl.username": "kafka-sasl-username",
        "sasl.password": "kafka-sasl-password",
    }
    assert settings.lake.storage_options["AWS_ENDPOINT_URL"].startswith("https://")


# --- Kubernetes: network policies -------------------------------------------------------
#
# Port 2101 carries Bytewax's cluster traffic: unauthenticated pickles, so code execution
# for whoever connects. Only the pipeline's own pods may reach it, only Prometheus may
# reach the metrics on 3030, and nothing else reaches the pipeline pods. The materializer
# run apart (k8s/materializer/) is reached by Prometheus only, and reaches DNS and S3 only.

PROMETHEUS_POD = {"app.kubernetes.io/name": "prometheus"}


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) matches `labels`."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, values = expr["key"], expr.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[expr["operator"]]
        if not matched:
            return False
    return True


def test_selects_helper() -> None:
    labels = {"a": "1", "b": "2"}
    assert selects({}, labels) and selects({"matchLabels": {"a": "1"}}, labels)
    assert not selects({"matchLabels": {"a": "1", "c": "3"}}, labels)
    assert selects({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "9"]}]}, labels)
    assert not selects({"matchExpressions": [{"key": "b", "operator": "NotIn", "values": ["2"]}]}, labels)
    assert not selects({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, labels)


def workload_pod(docs: dict[str, dict], workload: str) -> tuple[dict[str, str], dict[str, int]]:
    """The labels of a workload's pods and their named container ports."""
    template = docs[workload]["spec"]["template"]
    [container] = template["spec"]["containers"]
    return template["metadata"]["labels"], {p["name"]: p["containerPort"] for p in container["ports"]}


def pipeline_pod(docs: dict[str, dict]) -> tuple[dict[str, str], dict[str, int]]:
    """The pipeline pods' labels and their named container ports."""
    return workload_pod(docs, PIPELINE)


def policy_rules(docs: dict[str, dict], direction: str, workload: str = PIPELINE) -> list[dict]:
    """The rules of every NetworkPolicy that selects the workload's pods for `direction`."""
    labels, _ = workload_pod(docs, workload)
    rules, policies = [], 0
    for doc in docs.values():
        if doc["kind"] != "NetworkPolicy" or not selects(doc["spec"]["podSelector"], labels):
            continue
        spec = doc["spec"]
        # Kubernetes' default: Ingress always, Egress when there are egress rules.
        types = spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]
        if direction in types:
            assert "namespace" not in doc["metadata"], "a policy must live in the pods' namespace"
            policies += 1
            rules += spec.get(direction.lower()) or []
    assert policies, f"no NetworkPolicy restricts {direction} of the {workload} pods"
    return rules


def allowed(
    docs: dict[str, dict], direction: str, workload: str = PIPELINE
) -> dict[tuple[str, int], list[dict]]:
    """(protocol, port) -> the peers allowed there, over all rules. Refuses any-peer and any-port rules."""
    _, named_ports = workload_pod(docs, workload)
    peers_key = "from" if direction == "Ingress" else "to"
    found: dict[tuple[str, int], list[dict]] = {}
    for rule in policy_rules(docs, direction, workload):
        assert rule.get(peers_key), f"a rule open to every peer: {rule}"
        assert rule.get("ports"), f"a rule open on every port: {rule}"
        for port in rule["ports"]:
            assert "port" in port and "endPort" not in port, port
            # Named ports are the destination pod's: ours for ingress only.
            number = (
                named_ports[port["port"]]
                if direction == "Ingress" and isinstance(port["port"], str)
                else port["port"]
            )
            assert isinstance(number, int), port
            found.setdefault((port.get("protocol", "TCP"), number), []).extend(rule[peers_key])
    return found


def is_pipeline_peer(peer: dict, labels: dict[str, str]) -> bool:
    """The pipeline's pods of the policy's own namespace, and nothing else."""
    if set(peer) != {"podSelector"} or not selects(peer["podSelector"], labels):
        return False
    # A pod without either of the pipeline's labels is not selected.
    required = ("app.kubernetes.io/name", "app.kubernetes.io/component")
    return not any(
        selects(peer["podSelector"], {k: v for k, v in labels.items() if k != key}) for key in required
    )


def check_ingress(docs: dict[str, dict]) -> None:
    labels, named_ports = pipeline_pod(docs)
    found = allowed(docs, "Ingress")
    comm, api = ("TCP", named_ports["comm"]), ("TCP", named_ports["api"])
    assert (comm, api) == (("TCP", 2101), ("TCP", 3030))
    assert set(found) == {comm, api}, f"ingress allowed on more than comm and api: {sorted(found)}"
    # 2101: only the pipeline's own pods (no namespaceSelector, no ipBlock).
    assert found[comm] and all(is_pipeline_peer(peer, labels) for peer in found[comm]), found[comm]
    # ... and not the materializer's, when it runs apart.
    if MATERIALIZER_POD in docs:
        others, _ = workload_pod(docs, MATERIALIZER_POD)
        assert not [p for p in found[comm] if selects(p["podSelector"], others)], found[comm]
    check_prometheus_peers(found[api])


def check_prometheus_peers(peers: list[dict]) -> None:
    """Only Prometheus pods, in one named namespace."""
    assert peers
    for peer in peers:
        assert set(peer) == {"namespaceSelector", "podSelector"}, peer
        assert peer["podSelector"] == {"matchLabels": PROMETHEUS_POD}, peer
        assert peer["namespaceSelector"].get("matchLabels", {}).get("kubernetes.io/metadata.name"), peer


def peer_namespace(peer: dict) -> str | None:
    return (peer.get("namespaceSelector") or {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")


def check_dns(found: dict[tuple[str, int], list[dict]]) -> set[tuple[str, int]]:
    """DNS, to the cluster DNS pods; the (protocol, port)s it takes."""
    for protocol in ("UDP", "TCP"):
        peers = found[(protocol, 53)]
        assert peers and all(
            peer_namespace(p) == "kube-system"
            and p["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
            for p in peers
        ), peers
    return {("UDP", 53), ("TCP", 53)}


def check_service(found: dict[tuple[str, int], list[dict]], host: str, port: int) -> tuple[str, int]:
    """A Service the ConfigMap names (<service>.<namespace>.svc[.cluster.local]): its namespace, its port."""
    service_namespace = host.split(".")[1]
    peers = found[("TCP", port)]
    assert peers, (host, port)
    assert all(set(p) == {"namespaceSelector"} and peer_namespace(p) == service_namespace for p in peers), (
        peers
    )
    return ("TCP", port)


def check_s3(found: dict[tuple[str, int], list[dict]], config: dict[str, str]) -> tuple[str, int]:
    from urllib.parse import urlsplit

    s3 = urlsplit(config["AWS_ENDPOINT_URL"])
    assert s3.hostname
    return check_service(found, s3.hostname, s3.port or (443 if s3.scheme == "https" else 80))


def check_egress(docs: dict[str, dict]) -> None:
    labels, named_ports = pipeline_pod(docs)
    config = docs["ConfigMap/cdc-pipeline-config"]["data"]
    found = allowed(docs, "Egress")
    dns = check_dns(found)
    # The other processes of the cluster: without this it never forms.
    comm = ("TCP", named_ports["comm"])
    assert found[comm] and all(is_pipeline_peer(peer, labels) for peer in found[comm]), found[comm]
    # Kafka and S3: the ports and namespaces the ConfigMap's addresses name.
    kafka_host, _, kafka_port = config["CDC_KAFKA_BROKERS"].split(",")[0].rpartition(":")
    kafka = check_service(found, kafka_host, int(kafka_port))
    expected = dns | {comm, kafka, check_s3(found, config)}
    assert set(found) == expected, sorted(found)


def check_materializer_ingress(docs: dict[str, dict]) -> None:
    _, named_ports = workload_pod(docs, MATERIALIZER_POD)
    found = allowed(docs, "Ingress", MATERIALIZER_POD)
    metrics = ("TCP", named_ports["metrics"])
    assert metrics == ("TCP", 3030)
    assert set(found) == {metrics}, f"ingress allowed on more than metrics: {sorted(found)}"
    check_prometheus_peers(found[metrics])


def check_materializer_egress(docs: dict[str, dict]) -> None:
    """DNS and S3, nothing else: no Kafka, no Bytewax peers."""
    found = allowed(docs, "Egress", MATERIALIZER_POD)
    expected = check_dns(found) | {check_s3(found, docs["ConfigMap/cdc-pipeline-config"]["data"])}
    assert set(found) == expected, sorted(found)


def test_ingress_to_the_pipeline_pods_is_only_the_cluster_and_prometheus(manifests) -> None:
    check_ingress(manifests)


def test_egress_of_the_pipeline_pods_is_only_dns_peers_kafka_and_s3(manifests) -> None:
    check_egress(manifests)


def test_ingress_to_the_materializer_is_only_prometheus(component_manifests) -> None:
    check_materializer_ingress(component_manifests)


def test_egress_of_the_materializer_is_only_dns_and_s3(component_manifests) -> None:
    check_materializer_egress(component_manifests)


def test_pipeline_policies_do_not_select_the_materializer(component_manifests) -> None:
    """Its own two policies do: a pod selected by no policy of a direction is open in it."""
    labels, _ = workload_pod(component_manifests, MATERIALIZER_POD)
    chosen = sorted(
        name
        for name, doc in component_manifests.items()
        if doc["kind"] == "NetworkPolicy" and selects(doc["spec"]["podSelector"], labels)
    )
    assert chosen == ["NetworkPolicy/cdc-materializer-egress", "NetworkPolicy/cdc-materializer-ingress"]


@pytest.mark.tools
def test_network_policies_after_kustomize(resources) -> None:
    check_ingress(resources)
    check_egress(resources)


@pytest.mark.tools
def test_network_policies_with_the_materializer_after_kustomize(materialized) -> None:
    check_ingress(materialized)
    check_egress(materialized)
    check_materializer_ingress(materialized)
    check_materializer_egress(materialized)


def test_network_policy_checks_refuse_an_open_policy(manifests) -> None:
    """A control: the checks see a second policy that opens a port, or a wider peer."""
    import copy

    opened = copy.deepcopy(manifests)
    extra = copy.deepcopy(opened["NetworkPolicy/cdc-pipeline-ingress"])
    extra["metadata"]["name"] = "extra"
    extra["spec"]["ingress"] = [{"from": [{"podSelector": {}}], "ports": [{"port": 8080}]}]
    opened["NetworkPolicy/extra"] = extra
    with pytest.raises(AssertionError, match="more than comm and api"):
        check_ingress(opened)
    wider = copy.deepcopy(manifests)
    [comm_rule, _] = wider["NetworkPolicy/cdc-pipeline-ingress"]["spec"]["ingress"]
    comm_rule["from"][0]["namespaceSelector"] = {}
    with pytest.raises(AssertionError):
        check_ingress(wider)
    anywhere = copy.deepcopy(manifests)
    anywhere["NetworkPolicy/cdc-pipeline-ingress"]["spec"]["ingress"][1].pop("from")
    with pytest.raises(AssertionError, match="every peer"):
        check_ingress(anywhere)


def test_network_policy_checks_refuse_an_open_materializer(component_manifests) -> None:
    """A control: the materializer let onto the cluster port, given Kafka, or left without a policy."""
    import copy

    # A selector that still requires both labels (is_pipeline_peer accepts it) but takes both components.
    shared = copy.deepcopy(component_manifests)
    [comm_rule, _] = shared["NetworkPolicy/cdc-pipeline-ingress"]["spec"]["ingress"]
    comm_rule["from"][0]["podSelector"] = {
        "matchLabels": {"app.kubernetes.io/name": "cdc-pipeline"},
        "matchExpressions": [
            {"key": "app.kubernetes.io/component", "operator": "In", "values": ["dataflow", "materializer"]}
        ],
    }
    with pytest.raises(AssertionError):
        check_ingress(shared)
    kafka = copy.deepcopy(component_manifests)
    [pipeline_kafka] = [
        r
        for r in kafka["NetworkPolicy/cdc-pipeline-egress"]["spec"]["egress"]
        if r["ports"][0]["port"] == 9093
    ]
    kafka["NetworkPolicy/cdc-materializer-egress"]["spec"]["egress"].append(pipeline_kafka)
    with pytest.raises(AssertionError, match="9093"):
        check_materializer_egress(kafka)
    unguarded = copy.deepcopy(component_manifests)
    del unguarded["NetworkPolicy/cdc-materializer-ingress"]
    with pytest.raises(AssertionError, match="no NetworkPolicy restricts Ingress"):
        check_materializer_ingress(unguarded)


def k8s_expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command/args: `$$` → `$`, known `$(VAR)` → value."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, text)


@pytest.mark.tools
@pytest.mark.parametrize("ordinal", [0, 1])
def test_pod_command_builds_the_cluster_arguments(resources, tmp_path, ordinal) -> None:
    [container] = resources["StatefulSet/cdc-pipeline"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["/bin/sh", "-c"]
    env = {"CDC_PROCESSES": "2", "POD_NAMESPACE": "data-eng", "HOSTNAME": f"cdc-pipeline-{ordinal}"}
    script = k8s_expand(container["args"][0], env)
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    proc = run(["/bin/sh", "-c", script], env={**env, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "-m",
        "dataflow",
        "-i",
        str(ordinal),
        "-a",
        "cdc-pipeline-0.cdc-pipeline.data-eng.svc:2101;cdc-pipeline-1.cdc-pipeline.data-eng.svc:2101",
    ]


@pytest.mark.tools
def test_pdb_allows_one_disruption(resources) -> None:
    spec = resources["PodDisruptionBudget/cdc-pipeline"]["spec"]
    assert spec["maxUnavailable"] == 1
    assert spec["selector"] == resources["StatefulSet/cdc-pipeline"]["spec"]["selector"]


# --- docker compose ---------------------------------------------------------------


def example_env() -> dict[str, str]:
    """deploy/compose.env.example: what a user copies to .env."""
    pairs = [line.split("=", 1) for line in COMPOSE_ENV_EXAMPLE.read_text().splitlines() if line.strip()]
    return {k: v for k, v in (p for p in pairs if not p[0].startswith("#"))}


def test_example_env_helper() -> None:
    env = example_env()
    assert env["MINIO_ROOT_USER"] and env["GF_SECURITY_ADMIN_PASSWORD"], env


@pytest.fixture(scope="module")
def compose_env(tools) -> dict[str, str]:
    return {"DOCKER_CONFIG": tools["DOCKER_CONFIG"]} if "DOCKER_CONFIG" in tools else {}


def docker_compose(compose_env: dict[str, str], *args: str, env_file: Path = COMPOSE_ENV_EXAMPLE):
    """`docker compose` on the file with `env_file` as its .env, none of its variables from this shell."""
    assert shutil.which("docker"), "the docker CLI is not on PATH"
    env = {k: v for k, v in os.environ.items() if k not in example_env()}
    return subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "--env-file", str(env_file), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**env, **compose_env},
    )


@pytest.mark.tools
def test_compose_config_is_valid(compose_env) -> None:
    proc = docker_compose(compose_env, "config", "--quiet")
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def compose(compose_env) -> dict:
    proc = docker_compose(compose_env, "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.tools
def test_compose_start_order_and_pipeline_settings(compose) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dep, how in service.get("depends_on", {}).items():
            assert dep in services, (name, dep)
            if services[dep].get("restart") == "no":  # one-shot init jobs
                assert how["condition"] == "service_completed_successfully", (name, dep)
    pipeline = services["cdc-pipeline"]
    assert set(pipeline["depends_on"]) >= {"kafka-init", "connect-init", "minio-init"}
    assert services["connect"]["depends_on"]["mongo"]["condition"] == "service_healthy"
    assert services["connect"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    env = pipeline["environment"]
    assert env["CDC_KAFKA_BROKERS"] == "kafka:9092"
    assert env["CDC_TOPIC_PATTERN"] == r"cdc\.shop\..*"
    assert env["CDC_LAKE_URI"] == "s3://lake/cdc"
    assert env["BYTEWAX_DATAFLOW_API_ENABLED"]
    assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]  # test_compose_credentials checks them
    assert any(v["target"] == "/data" for v in pipeline["volumes"])
    grace = float(env.get("CDC_SHUTDOWN_GRACE_SECONDS", 60))
    assert _seconds(pipeline["stop_grace_period"]) > grace
    for name in ("mongo", "kafka", "connect", "minio", "cdc-pipeline"):
        assert services[name].get("healthcheck", {}).get("test"), name
    mounts = {v["source"] for v in services["prometheus"]["volumes"] if v["type"] == "bind"}
    mounts |= {v["source"] for v in services["grafana"]["volumes"] if v["type"] == "bind"}
    for path in (
        "monitoring/prometheus/prometheus.yml",
        "monitoring/prometheus/alerts.yml",
        "monitoring/grafana/provisioning",
        "monitoring/grafana/cdc-pipeline.json",
    ):
        assert str(ROOT / path) in mounts, path


# --- docker compose: credentials ---------------------------------------------------------
#
# Each service gets only its own credentials: MinIO's root user goes to minio and
# minio-init only; the pipeline has a MinIO user of its own, limited to the lake bucket;
# Grafana has its admin password and nothing of MinIO's.

MINIO_ROOT = ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")
LAKE_BUCKET_ACTIONS = {"s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"}
LAKE_OBJECT_ACTIONS = {
    "s3:GetObject",
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
}


def test_compose_takes_every_credential_from_the_example_env() -> None:
    """Every variable docker-compose.yml interpolates is in the example, with a placeholder value."""
    [raw] = load_yaml(COMPOSE.read_text())

    def strings(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield from strings(key)
                yield from strings(value)
        elif isinstance(node, list):
            for item in node:
                yield from strings(item)
        elif isinstance(node, str):
            yield node

    # `${NAME`, not the shell's `$${NAME` (compose's escape).
    used = {m for s in strings(raw) for m in re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", s)}
    example = example_env()
    assert used and used <= set(example), used - set(example)
    for name, value in example.items():
        if any(word in name for word in ("PASSWORD", "SECRET")):
            assert value.endswith("-change-me"), (name, value)
    # No service reads a whole env file: that would hand it every credential.
    assert not [name for name, service in raw["services"].items() if "env_file" in service]


@pytest.mark.tools
@pytest.mark.parametrize("name", sorted(set(example_env()) - {"GF_SECURITY_ADMIN_USER"}))
def test_compose_refuses_to_run_without_a_credential(compose_env, tmp_path, name) -> None:
    """No defaults: without the variable, compose stops and names it (Grafana's password too)."""
    partial = tmp_path / "partial.env"
    partial.write_text("".join(f"{k}={v}\n" for k, v in example_env().items() if k != name))
    proc = docker_compose(compose_env, "config", "--quiet", env_file=partial)
    assert proc.returncode != 0 and f"required variable {name} is missing" in proc.stderr, proc.stderr


@pytest.mark.tools
def test_compose_credentials(compose) -> None:
    services = compose["services"]
    example = example_env()
    root_values = {example[name] for name in MINIO_ROOT}
    # The MinIO root user: the server and the init job only.
    holders = {
        name
        for name, service in services.items()
        for key, value in (service.get("environment") or {}).items()
        if key in MINIO_ROOT or value in root_values
    }
    assert holders == {"minio", "minio-init"}, holders
    # The pipeline: the user minio-init creates.
    pipeline = services["cdc-pipeline"]["environment"]
    init = services["minio-init"]["environment"]
    assert (
        pipeline["AWS_ACCESS_KEY_ID"] == init["PIPELINE_ACCESS_KEY"] == example["PIPELINE_MINIO_ACCESS_KEY"]
    )
    assert pipeline["AWS_SECRET_ACCESS_KEY"] == init["PIPELINE_SECRET_KEY"]
    assert pipeline["AWS_SECRET_ACCESS_KEY"] == example["PIPELINE_MINIO_SECRET_KEY"]
    assert pipeline["AWS_ACCESS_KEY_ID"] != example["MINIO_ROOT_USER"]
    # Grafana: its own admin password, nothing of MinIO's.
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == example["GF_SECURITY_ADMIN_PASSWORD"]
    minio_values = root_values | {example["PIPELINE_MINIO_ACCESS_KEY"], example["PIPELINE_MINIO_SECRET_KEY"]}
    assert not [k for k in grafana if re.search("MINIO|AWS|PIPELINE", k)], grafana
    assert not [k for k, v in grafana.items() if v in minio_values], grafana


def minio_init_script(compose_file: dict) -> str:
    """The shell script minio-init runs (compose's `$$` is the shell's `$`)."""
    service = compose_file["services"]["minio-init"]
    assert service["entrypoint"] == ["/bin/sh", "-c"]
    [script] = service["command"]
    return script.replace("$$", "$")


def lake_policy(script: str) -> tuple[str, str]:
    """(name, JSON text) of the policy the script creates from an inline document."""
    [(document, path)] = re.findall(r"^printf '%s\\n' '(\{.*?\})' >(\S+)$", script, re.M | re.S)
    [name] = re.findall(rf"^mc admin policy create local (\S+) {re.escape(path)}$", script, re.M)
    return name, document


@pytest.mark.tools
def test_minio_init_gives_the_pipeline_user_only_the_lake_bucket(compose) -> None:
    from urllib.parse import urlsplit

    script = minio_init_script(compose)
    bucket = urlsplit(compose["services"]["cdc-pipeline"]["environment"]["CDC_LAKE_URI"]).netloc
    assert bucket == "lake"
    assert script.startswith("set -eu\n")
    assert f"\nmc mb --ignore-existing local/{bucket}\n" in script
    assert '\nmc admin user add local "$PIPELINE_ACCESS_KEY" "$PIPELINE_SECRET_KEY"\n' in script
    name, document = lake_policy(script)
    # The only policy attached to the user is that one (`policy` wraps `mc admin policy`).
    attached = re.findall(
        r"^(?:mc admin )?policy attach local (\S+) --user \"\$PIPELINE_ACCESS_KEY\"$", script, re.M
    )
    assert attached == [name], attached
    assert re.search(r"^policy\(\) \{\n  if ! out=\$\(mc admin policy \"\$@\" 2>&1\)", script, re.M)
    policy = json.loads(document)
    assert policy["Version"] == "2012-10-17"
    granted: dict[str, set[str]] = {}
    for statement in policy["Statement"]:
        assert set(statement) == {"Effect", "Action", "Resource"}, statement
        assert statement["Effect"] == "Allow"
        for resource in statement["Resource"]:
            granted.setdefault(resource, set()).update(statement["Action"])
    assert granted == {
        f"arn:aws:s3:::{bucket}": LAKE_BUCKET_ACTIONS,
        f"arn:aws:s3:::{bucket}/*": LAKE_OBJECT_ACTIONS,
    }, granted


@pytest.mark.integration
def test_the_lake_policy_lets_the_pipeline_run_and_nothing_more(s3, tmp_path) -> None:
    """minio-init's policy in a real MinIO: the pipeline writes its tables with that user, and the
    user can do nothing outside the bucket."""
    import io

    from minio import Minio, MinioAdmin
    from minio.credentials import StaticProvider
    from minio.error import S3Error

    from tests.harness import pipeline_env, run_pipeline, table_rows

    # docker-compose.yml itself (no docker compose needed: the script has no variables in it).
    [raw] = load_yaml(COMPOSE.read_text())
    _, document = lake_policy(minio_init_script(raw))
    bucket, other = s3.bucket("lake"), s3.bucket("other")
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(document.replace("arn:aws:s3:::lake", f"arn:aws:s3:::{bucket}"))
    endpoint = s3.env["AWS_ENDPOINT_URL"].removeprefix("http://")
    root = StaticProvider(s3.env["AWS_ACCESS_KEY_ID"], s3.env["AWS_SECRET_ACCESS_KEY"])
    admin = MinioAdmin(endpoint=endpoint, credentials=root, secure=False)
    name, user, secret = f"lake-{bucket}", f"u-{bucket}"[:40], "pipeline-test-secret"
    admin.policy_add(name, policy_file=policy_file)
    admin.user_add(user, secret)
    admin.attach_policy([name], user=user)
    user_env = {**s3.env, "AWS_ACCESS_KEY_ID": user, "AWS_SECRET_ACCESS_KEY": secret}

    # The pipeline, on the bundled sample, in both modes (MERGE and append).
    run_pipeline(
        pipeline_env(
            CDC_LAKE_URI=f"s3://{bucket}/cdc",
            CDC_TABLE_MODE="merge",
            CDC_DLQ_FALLBACK=str(tmp_path / "fallback.jsonl"),
            **user_env,
        )
    )
    assert table_rows(f"s3://{bucket}/cdc/shop/orders", s3.storage_options)
    assert table_rows(f"s3://{bucket}/cdc/_changelog/shop/orders", s3.storage_options)

    client = Minio(endpoint, access_key=user, secret_key=secret, secure=False)
    # A multipart upload, then a delete, in the bucket.
    data = b"x" * (6 * 1024 * 1024)
    client.put_object(bucket, "multipart", io.BytesIO(data), length=-1, part_size=5 * 1024 * 1024)
    assert client.stat_object(bucket, "multipart").size == len(data)
    client.remove_object(bucket, "multipart")
    # Nothing outside it.
    # MinIO lists only the buckets a user may use.
    assert [b.name for b in client.list_buckets()] == [bucket]
    denied = [
        lambda: list(client.list_objects(other)),
        lambda: client.put_object(other, "x", io.BytesIO(b"x"), 1),
        lambda: client.make_bucket(f"{bucket}-new"),
    ]
    for attempt in denied:
        with pytest.raises(S3Error, match="Access Denied|AccessDenied"):
            attempt()


def _seconds(duration: str) -> float:
    total = 0.0
    for value, unit in re.findall(r"([\d.]+)(h|ms|m|s|us|ns)", duration):
        total += float(value) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}[unit]
    return total


# --- every image pinned ---------------------------------------------------------------


def pinned(image: str) -> bool:
    """An explicit tag that is not `latest`, or a digest."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def test_pinned_helper() -> None:
    assert pinned("apache/kafka:3.9.1") and pinned("localhost:5000/x:1.0") and pinned("x@sha256:" + "a" * 64)
    assert not pinned("mongo") and not pinned("mongo:latest") and not pinned("localhost:5000/x")


@pytest.mark.tools
def test_every_image_is_pinned(compose, resources, materialized) -> None:
    images = {f"compose {n}": s["image"] for n, s in compose["services"].items() if "image" in s}
    assert not [n for n, s in compose["services"].items() if "image" not in s], "a service without image"
    for key, res in [*resources.items(), *materialized.items()]:
        pod = res.get("spec", {}).get("template", {}).get("spec")
        for container in (pod or {}).get("containers", []) + (pod or {}).get("initContainers", []):
            images[f"k8s {key} {container['name']}"] = container["image"]
    # The raw files too (what `kubectl apply -f` would send, without kustomize's images:).
    for path in manifest_files() + manifest_files(MATERIALIZER):
        for doc in load_yaml(path.read_text()):
            pod = doc.get("spec", {}).get("template", {}).get("spec") or {}
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                images[f"{path.name} {container['name']}"] = container["image"]
    assert len(images) >= 12, images
    unpinned = {k: v for k, v in images.items() if not pinned(v)}
    assert not unpinned, unpinned


def test_dockerfile_base_is_pinned() -> None:
    text = (ROOT / "Dockerfile").read_text()
    [base] = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(f == "${PYTHON_IMAGE}" for f in froms), froms
    assert re.search(r"^USER 10001(:10001)?$", text, re.M)
    assert 'ENTRYPOINT ["python", "-m", "dataflow"]' in text
    assert re.search(r"^EXPOSE 3030$", text, re.M)
    assert re.search(r"pip install \.(\s|$)", text) and "[dev]" not in text


# --- the Debezium connector config and our parser ----------------------------------------


@pytest.fixture(scope="module")
def connector() -> dict[str, str]:
    doc = json.loads(CONNECTOR.read_text())
    assert doc["name"] == "mongodb-shop"
    return doc["config"]


def test_connector_settings_are_the_documented_ones(connector) -> None:
    assert connector["connector.class"] == "io.debezium.connector.mongodb.MongoDbConnector"
    assert connector["topic.prefix"] == "cdc"
    assert connector["capture.mode"] == "change_streams_update_full"
    assert connector["tombstones.on.delete"] == "true"
    for side in ("key", "value"):
        assert connector[f"{side}.converter"] == "org.apache.kafka.connect.json.JsonConverter"
        assert connector[f"{side}.converter.schemas.enable"] == "true"
    assert connector["mongodb.connection.string"].startswith("mongodb://mongo:27017/")
    assert "replicaSet=rs0" in connector["mongodb.connection.string"]
    # The topics it writes (`<prefix>.<db>.<collection>`) are the ones the pipeline reads.
    include = re.compile(connector["collection.include.list"])
    assert include.fullmatch("shop.orders") and not include.fullmatch("shopping.orders")
    assert all(isinstance(v, str) for v in connector.values())  # Connect's REST API wants strings


def _wrap(schema: dict, payload: Any, schemas_enable: bool) -> bytes:
    """What Kafka Connect's JsonConverter writes with schemas.enable true/false."""
    return json.dumps({"schema": schema, "payload": payload} if schemas_enable else payload).encode()


SOURCE_SCHEMA = {
    "type": "struct",
    "optional": False,
    "name": "io.debezium.connector.mongo.Source",
    "fields": [
        {"type": "string", "optional": False, "field": "version"},
        {"type": "string", "optional": False, "field": "connector"},
        {"type": "string", "optional": False, "field": "name"},
        {"type": "int64", "optional": False, "field": "ts_ms"},
        {"type": "string", "optional": True, "field": "snapshot", "default": "false"},
        {"type": "string", "optional": False, "field": "db"},
        {"type": "string", "optional": True, "field": "sequence"},
        {"type": "int64", "optional": True, "field": "ts_us"},
        {"type": "int64", "optional": True, "field": "ts_ns"},
        {"type": "string", "optional": False, "field": "collection"},
        {"type": "int32", "optional": False, "field": "ord"},
        {"type": "string", "optional": True, "field": "lsid"},
        {"type": "int64", "optional": True, "field": "txnNumber"},
        {"type": "int64", "optional": True, "field": "wallTime"},
    ],
}


def debezium_message(
    connector: dict[str, str], *, op: str, doc: dict | None, oid: str, offset: int, update: dict | None = None
) -> KafkaSourceMessage:
    """A Debezium 2.7 MongoDB connector record for shop.orders, as `connector` would emit it."""
    prefix = connector["topic.prefix"]
    topic = f"{prefix}.shop.orders"
    schemas = connector["value.converter.schemas.enable"] == "true"
    key_schemas = connector["key.converter.schemas.enable"] == "true"
    key_schema = {
        "type": "struct",
        "optional": False,
        "name": f"{topic}.Key",
        "fields": [{"type": "string", "optional": False, "field": "id"}],
    }
    key = _wrap(key_schema, {"id": json.dumps({"$oid": oid})}, key_schemas)
    json_string = {
        "type": "string",
        "optional": True,
        "name": "io.debezium.data.Json",
        "version": 1,
        "field": "",
    }
    value_schema = {
        "type": "struct",
        "optional": False,
        "name": f"{topic}.Envelope",
        "version": 1,
        "fields": [
            {**json_string, "field": "before"},
            {**json_string, "field": "after"},
            {
                "type": "struct",
                "optional": True,
                "name": "io.debezium.connector.mongodb.changestream.updatedescription",
                "version": 1,
                "field": "updateDescription",
                "fields": [
                    {
                        "type": "array",
                        "items": {"type": "string", "optional": False},
                        "optional": True,
                        "field": "removedFields",
                    },
                    {**json_string, "field": "updatedFields"},
                    {
                        "type": "array",
                        "optional": True,
                        "field": "truncatedArrays",
                        "items": {"type": "struct", "optional": False, "fields": []},
                    },
                ],
            },
            {**SOURCE_SCHEMA, "field": "source"},
            {"type": "string", "optional": True, "field": "op"},
            {"type": "int64", "optional": True, "field": "ts_ms"},
            {
                "type": "struct",
                "optional": True,
                "name": "event.block",
                "version": 1,
                "field": "transaction",
                "fields": [],
            },
        ],
    }
    ts_ms = 1_732_000_000_000 + offset
    payload = {
        "before": None,
        # change_streams_update_full: `after` is the whole current document, as an Extended JSON string.
        "after": None if doc is None else json.dumps(doc),
        "updateDescription": update,
        "source": {
            "version": "2.7.3.Final",
            "connector": "mongodb",
            "name": prefix,
            "ts_ms": ts_ms,
            "snapshot": "false",
            "db": "shop",
            "sequence": None,
            "ts_us": ts_ms * 1000,
            "ts_ns": ts_ms * 1_000_000,
            "collection": "orders",
            "ord": 1,
            "lsid": None,
            "txnNumber": None,
            "wallTime": ts_ms,
        },
        "op": op,
        "ts_ms": ts_ms + 5,
        "transaction": None,
    }
    return KafkaSourceMessage(
        key=key, value=_wrap(value_schema, payload, schemas), topic=topic, partition=0, offset=offset
    )


OID = "6740f0c2a1b2c3d4e5f60718"
ORDER = {
    "_id": {"$oid": OID},
    "customer": "ada",
    "qty": 3,
    "price": {"$numberDecimal": "19.90"},
    "created": {"$date": "2024-11-19T08:00:00Z"},
    "items": [{"sku": "A-1", "n": 2}],
}


def test_connector_insert_parses_to_a_change_event(connector) -> None:
    assert connector["topic.prefix"] + ".shop.orders" == "cdc.shop.orders"
    assert re.fullmatch(r"cdc\.shop\..*", "cdc.shop.orders")  # the compose/k8s CDC_TOPIC_PATTERN
    ev = parse(debezium_message(connector, op="c", doc=ORDER, oid=OID, offset=7))
    assert isinstance(ev, ChangeEvent), ev
    assert (ev.db, ev.collection, ev.id, ev.op) == ("shop", "orders", OID, "insert")
    assert ev.doc is not None and ev.doc["customer"] == "ada" and ev.doc["qty"] == 3
    assert (ev.topic, ev.partition, ev.offset) == ("cdc.shop.orders", 0, 7)


def test_connector_update_carries_the_full_document(connector) -> None:
    after = {**ORDER, "qty": 4}
    update = {"removedFields": None, "updatedFields": json.dumps({"qty": 4}), "truncatedArrays": None}
    ev = parse(debezium_message(connector, op="u", doc=after, oid=OID, offset=8, update=update))
    assert isinstance(ev, ChangeEvent), ev
    assert ev.op in ("update", "replace") and ev.doc is not None and ev.doc["qty"] == 4


def test_connector_delete_and_its_tombstone(connector) -> None:
    ev = parse(debezium_message(connector, op="d", doc=None, oid=OID, offset=9))
    assert isinstance(ev, ChangeEvent) and ev.op == "delete" and ev.id == OID, ev
    tombstone = debezium_message(connector, op="d", doc=None, oid=OID, offset=10)
    skipped = parse(
        KafkaSourceMessage(key=tombstone.key, value=None, topic=tombstone.topic, partition=0, offset=10)
    )
    assert skipped == TOMBSTONE  # Debezium's own tombstone after its `d` event is not a second delete


def test_snapshot_read_parses(connector) -> None:
    assert connector["snapshot.mode"] == "initial"  # existing documents arrive as op "r"
    ev = parse(debezium_message(connector, op="r", doc=ORDER, oid=OID, offset=1))
    assert isinstance(ev, ChangeEvent) and ev.doc is not None, ev
