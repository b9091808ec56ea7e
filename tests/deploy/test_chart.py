"""The Helm chart `charts/lmforge`, rendered offline and validated like an API server would.

Every value set in charts/lmforge/ci/*-values.yaml is rendered through Helm's own library
(helm-python-sdk, via scripts/render_chart.py, the helper scripts/kind_e2e.sh applies with), then:
core objects are validated strictly against the Kubernetes 1.30 schemas (kubernetes-validate), every
ray.io/v1 object against KubeRay v1.7.0's CRD schemas with unknown keys rejected, and the RayService's
Serve config is parsed and checked with lmforge's own ServeConfig (model URI, image, resources, secret
wiring). Bad values must fail at install time with a message naming the value.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "lmforge"
CRD_DIR = REPO_ROOT.parent / "shared" / "reference" / "kuberay-crds"
VALUE_SETS = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.30.0"


def _load_render_chart():
    spec = importlib.util.spec_from_file_location("render_chart", REPO_ROOT / "scripts" / "render_chart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_chart = _load_render_chart()


def values_of(name: str) -> dict[str, Any]:
    """The chart's values.yaml with the ci value set on top (what the render saw)."""
    return render_chart.load_values([CHART / "values.yaml", CHART / "ci" / name])


@pytest.fixture(scope="module", params=VALUE_SETS)
def case(request) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(values, rendered objects) for one ci value set."""
    docs = render_chart.render(values_files=[CHART / "ci" / request.param])
    return values_of(request.param), docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def ray_pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod templates of a RayService / RayCluster / RayJob (head first)."""
    spec = doc["spec"]
    cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(object name, pod spec) of every pod the chart creates, directly or through KubeRay."""
    out = []
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            out.append((name, d["spec"]["template"]["spec"]))
        elif d["apiVersion"].startswith("ray.io/"):
            out += [(name, t["spec"]) for t in ray_pod_templates(d)]
            if d["kind"] == "RayJob" and "submitterPodTemplate" in d["spec"]:
                out.append((name + "/submitter", d["spec"]["submitterPodTemplate"]["spec"]))
    return out


# ---- lint and Kubernetes schemas ---------------------------------------------------------------
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_chart_lints_strictly(value_set):
    import helm_python

    report = helm_python.lint(str(CHART), render_chart.load_values([CHART / "ci" / value_set]), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_every_ci_value_set_is_tested():
    assert {"default-values.yaml", "kind-values.yaml", "vllm-values.yaml"} <= set(VALUE_SETS)


def test_core_objects_validate_strictly(case):
    import kubernetes_validate

    _, docs = case
    core = [d for d in docs if not d["apiVersion"].startswith(("ray.io/", "monitoring.coreos.com/"))]
    assert core, "the chart rendered no core objects"
    for doc in core:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {err}")


# ---- KubeRay CRDs --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, dict[str, Any]]:
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRD_DIR} (reference data outside a user's clone)")
    schemas = {}
    for path in CRD_DIR.glob("ray.io_*.yaml"):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 3 MB
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schemas[crd["spec"]["names"]["kind"]] = v1["schema"]["openAPIV3Schema"]
    return schemas


def unknown_keys(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Keys of `obj` the schema does not declare. The API server would silently prune them (a typo in
    a field name is lost without an error), so the chart tests reject them."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            if props is not None and key in props:
                found += unknown_keys(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_keys(value, extra, f"{path}.{key}")
            elif props is not None:
                found.append(f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            found += unknown_keys(item, schema["items"], f"{path}[{i}]")
    return found


def crd_errors(doc: dict[str, Any], schemas: dict[str, dict[str, Any]]) -> list[str]:
    import jsonschema

    schema = schemas[doc["kind"]]
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(doc)
    ]
    return errors + [f"{key}: unknown field" for key in unknown_keys(doc, schema)]


def test_ray_objects_match_kuberay_crds(case, crd_schemas):
    _, docs = case
    ray_objects = [d for d in docs if d["apiVersion"].startswith("ray.io/")]
    for doc in ray_objects:
        assert doc["apiVersion"] == "ray.io/v1"
        assert crd_errors(doc, crd_schemas) == [], f"{doc['kind']}/{doc['metadata']['name']}"


def test_crd_check_catches_typos_and_wrong_types(crd_schemas):
    (service,) = by_kind(render_chart.render(), "RayService")
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "0"}
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    errors = crd_errors(service, crd_schemas)
    assert any("rayStartParam: unknown field" in e for e in errors), errors
    assert any("maxReplicas" in e and "integer" in e for e in errors), errors


def test_ray_objects_present(case):
    values, docs = case
    assert len(by_kind(docs, "RayService")) == int(values["serving"]["enabled"])
    assert len(by_kind(docs, "RayCluster")) == int(values["training"]["cluster"]["enabled"])
    assert len(by_kind(docs, "RayJob")) == int(values["training"]["job"]["enabled"])


# ---- the Serve config ------------------------------------------------------------------------------
def serve_app(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    (service,) = by_kind(docs, "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    (app,) = config["applications"]
    return service, app


def mounted_secrets(template: dict[str, Any]) -> dict[str, tuple[str, dict[str, str]]]:
    """mountPath -> (secret name, {secret key: file name}) for the Ray container of a pod template."""
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    out = {}
    for mount in template["spec"]["containers"][0]["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret:
            items = {i["key"]: i["path"] for i in secret.get("items", [])}
            out[mount["mountPath"]] = (secret["secretName"], items)
    return out


def test_lmforge_serve_config_is_a_valid_serveconfig(case):
    from lmforge.serving.app import serve_config
    from lmforge.serving.config import build_serve_config

    values, docs = case
    s = values["serving"]
    if not s["enabled"] or s["backend"] != "lmforge":
        pytest.skip("no lmforge RayService in this value set")
    service, app = serve_app(docs)
    cfg = build_serve_config(app["args"])  # lmforge's own validation of every field the chart wrote

    # the application is exactly what `lmforge serve --write-serve-config` would write for cfg
    expected = serve_config(cfg)["applications"][0]
    assert app["import_path"] == expected["import_path"] == "lmforge.serving.app:app_builder"
    assert {k: v for k, v in app.items() if k != "args"} == {k: v for k, v in expected.items() if k != "args"}

    assert cfg.model == s["model"]
    assert cfg.host == "0.0.0.0" and cfg.port == 8000
    assert cfg.model_cache_dir == "/models"
    assert (cfg.num_cpus, cfg.num_gpus) == (s["replicaResources"]["cpus"], s["replicaResources"]["gpus"])
    if s["autoscaling"]["enabled"]:
        a = cfg.autoscaling
        assert (a.min_replicas, a.max_replicas) == (
            s["autoscaling"]["minReplicas"],
            s["autoscaling"]["maxReplicas"],
        )
    else:
        assert cfg.autoscaling is None and cfg.replicas == s["replicas"]
    as_dict = cfg.to_dict()
    for key, value in s["lmforge"].items():  # every user setting reached the config unchanged
        if isinstance(value, dict):
            assert {k: as_dict[key][k] for k in value} == value, key
        else:
            assert as_dict[key] == value, key
    assert cfg.served_model_name == (s["servedModelName"] or None)

    # keys: the files named in the config are mounted from the values' Secrets on every Ray pod
    secrets = {"api_keys_file": s["apiKeys"]}
    if s["adminApiKeys"]["existingSecret"]:
        secrets["admin_api_keys_file"] = s["adminApiKeys"]
    else:
        assert cfg.admin_api_keys_file is None
    for template in ray_pod_templates(service):
        mounted = mounted_secrets(template)
        for field, ref in secrets.items():
            path = Path(getattr(cfg, field))
            assert mounted[str(path.parent)] == (ref["existingSecret"], {ref["key"]: path.name}), field


def test_ray_pods_image_and_resources(case):
    values, docs = case
    s = values["serving"]
    if not s["enabled"]:
        pytest.skip("serving disabled")
    (service,) = by_kind(docs, "RayService")
    image = f"{values['image']['repository']}:{values['image']['tag']}"
    if s["backend"] == "vllm" and s["vllm"]["image"]["repository"]:
        image = f"{s['vllm']['image']['repository']}:{s['vllm']['image']['tag'] or values['image']['tag']}"
    cluster = service["spec"]["rayClusterConfig"]
    head, (workers,) = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    assert head["template"]["spec"]["containers"][0]["image"] == image
    assert workers["template"]["spec"]["containers"][0]["image"] == image
    assert head["template"]["spec"]["containers"][0]["resources"] == s["head"]["resources"]
    worker_res = workers["template"]["spec"]["containers"][0]["resources"]
    gpus = s["workers"]["gpusPerPod"]
    for side in ("requests", "limits"):
        want = dict(s["workers"]["resources"][side])
        if gpus:
            want["nvidia.com/gpu"] = gpus
        assert worker_res[side] == want
    assert workers["rayStartParams"]["num-gpus"] == str(gpus)
    assert (workers["replicas"], workers["minReplicas"], workers["maxReplicas"]) == (
        s["workers"]["replicas"],
        s["workers"]["minReplicas"],
        s["workers"]["maxReplicas"],
    )
    assert cluster["enableInTreeAutoscaling"] is s["autoscaling"]["enabled"]
    if s["workers"]["tolerations"]:
        assert workers["template"]["spec"]["tolerations"] == s["workers"]["tolerations"]


def test_vllm_serve_config():
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    values = values_of("vllm-values.yaml")
    docs = render_chart.render(values_files=[CHART / "ci" / "vllm-values.yaml"])
    service, app = serve_app(docs)
    s = values["serving"]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    (llm,) = app["args"]["llm_configs"]
    config = LLMConfig(**llm)  # Ray Serve LLM's own validation (no vLLM needed to build it)
    assert config.model_id == "support-bot"
    assert llm["model_loading_config"]["model_source"] == "/models/current"
    assert llm["engine_kwargs"] == s["vllm"]["engineKwargs"]
    assert llm["accelerator_type"] == "L4"
    assert llm["deployment_config"]["autoscaling_config"]["max_replicas"] == 4
    # the worker's init container resolves the champion into /models/current before Ray starts
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]
    (init,) = worker["spec"]["initContainers"]
    assert init["command"][-1] == s["model"]
    assert "/models/current" in init["command"][2]
    assert {"name": "models", "mountPath": "/models"} in init["volumeMounts"]
    assert init["image"] == f"{values['image']['repository']}:{values['image']['tag']}"  # has lmforge
    assert worker["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert service["metadata"]["annotations"]["lmforge.io/model-revision"] == "3"


def test_values_schema_covers_serveconfig():
    """Every ServeConfig field is either settable under serving.lmforge or set by the chart itself, so a
    new field in serving/config.py fails here until the chart decides which it is."""
    import dataclasses

    from lmforge.serving.config import EngineConfig, ServeConfig

    chart_managed = {
        "model", "served_model_name", "tracking_uri", "model_cache_dir", "host", "port", "route_prefix",
        "api_keys_env", "api_keys_file", "admin_api_keys_env", "admin_api_keys_file",
        "allow_unauthenticated", "replicas", "autoscaling", "num_cpus", "num_gpus",
    }  # fmt: skip
    schema = json.loads((CHART / "values.schema.json").read_text())
    lmforge = schema["properties"]["serving"]["properties"]["lmforge"]
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    assert set(lmforge["properties"]) | chart_managed == fields
    assert not set(lmforge["properties"]) & chart_managed
    assert set(lmforge["properties"]["engine"]["properties"]) == {
        f.name for f in dataclasses.fields(EngineConfig)
    }


# ---- security, resources, probes, secrets ---------------------------------------------------------
def test_pods_are_hardened_and_bounded(case):
    _, docs = case
    for name, spec in pod_specs(docs):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        init = spec.get("initContainers", [])
        for c in init + spec["containers"]:
            sc = c["securityContext"]
            where = f"{name} container {c['name']}"
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for side in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][side]), f"{where}: resources.{side}"
            runs_to_completion = name.startswith("Job/") or name.endswith("/submitter") or c in init
            if not runs_to_completion:
                assert {"livenessProbe", "readinessProbe"} <= set(c), f"{where}: probes missing"


def test_no_secret_material_in_manifests(case):
    values, docs = case
    assert by_kind(docs, "Secret") == []
    text = render_chart.render_yaml(docs)
    assert "password:" not in text.lower()
    allowed = {
        values["s3"]["existingSecret"],
        values["mlflow"]["postgres"]["existingSecret"],
        values["mlflow"]["backendStore"]["existingSecret"],
        values["serving"]["apiKeys"]["existingSecret"],
        values["serving"]["adminApiKeys"]["existingSecret"],
    } - {""}
    referenced = set()
    for _, spec in pod_specs(docs):
        referenced |= {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        for c in spec.get("initContainers", []) + spec["containers"]:
            referenced |= {
                e["valueFrom"]["secretKeyRef"]["name"]
                for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})
            }
    assert referenced and referenced <= allowed, referenced - allowed
    for _, spec in pod_specs(docs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            for env in c.get("env", []):
                if re.search("PASSWORD|SECRET|ACCESS_KEY", env["name"]):
                    assert "valueFrom" in env, f"{env['name']} must come from a Secret"


def test_rbac_lets_kfp_runs_create_rayjobs_and_patch_the_rayservice(case):
    values, docs = case
    (role,) = by_kind(docs, "Role")
    allowed = {(res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}
    assert {
        ("rayjobs", "create"),
        ("rayjobs", "get"),
        ("rayservices", "get"),
        ("rayservices", "patch"),
    } <= allowed
    assert not any(verb in ("*",) or res == "secrets" for res, verb in allowed)
    (binding,) = by_kind(docs, "RoleBinding")
    subjects = {(s["name"], s["namespace"]) for s in binding["subjects"]}
    for sa in values["rbac"]["kfpServiceAccounts"]:
        assert (sa["name"], sa["namespace"]) in subjects


def test_network_policies_and_pdbs(case):
    values, docs = case
    policies = by_kind(docs, "NetworkPolicy")
    if not values["networkPolicy"]["enabled"]:
        assert policies == []
        return
    names = {p["metadata"]["name"].rsplit("-", 1)[-1] for p in policies}
    assert names == {"postgres", "storage", "ray"}
    pdbs = {p["metadata"]["name"] for p in by_kind(docs, "PodDisruptionBudget")}
    assert any(n.endswith("-mlflow") for n in pdbs)
    assert any(n.endswith("-serving") for n in pdbs) == (values["serving"]["pdb"]["enabled"])


def test_ingress_exposes_only_the_openai_api():
    docs = render_chart.render(values_files=[CHART / "ci" / "gpu-values.yaml"])
    (ingress,) = by_kind(docs, "Ingress")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    assert [p["path"] for p in rule["http"]["paths"]] == ["/v1"]  # not /metrics, /admin
    assert ingress["spec"]["tls"][0]["secretName"] == "llm-example-tls"


# ---- monitoring matches what the server exports -------------------------------------------------
def exported_metric_names() -> set[str]:
    """Sample names a real router exports after serving (serving/metrics.py)."""
    from prometheus_client.parser import text_string_to_metric_families

    from lmforge.serving.metrics import SequenceTimer, ServingMetrics

    m = ServingMetrics()
    m.requests.labels("/v1/completions", "200").inc()
    m.request_duration.labels("/v1/completions").observe(0.1)
    timer = SequenceTimer(m, "bot", start=0.0)
    timer.tokens(1, now=0.1)
    timer.tokens(2, now=0.2)
    m.generated_tokens.labels("bot").inc(3)
    m.prompt_tokens.labels("bot").inc(5)
    m.sequences_finished.labels("bot", "stop").inc()
    m.model_reloads.labels("a", "bot/2").inc()
    m.engine.update("a", {"replica": "r1", "model": "bot/2", "queue_depth": 1, "running": 2,
                          "num_slots": 4, "kv_cache_usage": 0.5, "aborted": 0})  # fmt: skip
    families = text_string_to_metric_families(m.render().decode())
    return {sample.name for family in families for sample in family.samples}


def test_dashboard_queries_metrics_the_server_exports():
    dashboard = json.loads((CHART / "dashboards" / "lmforge-serving.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\blmforge_[a-z_]+", expr)}
    exported = exported_metric_names()
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in (
        "request rate",
        "latency",
        "first token",
        "tokens per second",
        "queue",
        "errors",
        "version",
    ):
        assert topic in titles, topic
    # the ConfigMap carries the same file, labelled for the Grafana sidecar
    (cm,) = [
        c for c in by_kind(render_chart.render(), "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")
    ]
    assert json.loads(cm["data"]["lmforge-serving.json"]) == dashboard
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_servicemonitor_scrapes_the_router_metrics_endpoint():
    from lmforge.serving.api import KNOWN_PATHS

    docs = render_chart.render()
    (monitor,) = by_kind(docs, "ServiceMonitor")
    (service,) = by_kind(docs, "RayService")
    serve_svc = service["spec"]["serveService"]
    # the monitor selects the serve Service KubeRay creates from this template
    assert monitor["spec"]["selector"]["matchLabels"].items() <= serve_svc["metadata"]["labels"].items()
    ports = {p["name"]: p for p in serve_svc["spec"]["ports"]}
    endpoints = {e["port"]: e["path"] for e in monitor["spec"]["endpoints"]}
    assert endpoints == {"http": "/metrics", "ray-metrics": "/metrics"}
    _, app = serve_app(docs)
    assert ports["http"]["targetPort"] == app["args"]["port"] == 8000
    assert "/metrics" in KNOWN_PATHS  # the router's Prometheus endpoint (serving/api.py)
    # vLLM's Serve LLM app has no lmforge /metrics: only Ray's metrics port is scraped there
    vllm = render_chart.render(values_files=[CHART / "ci" / "vllm-values.yaml"])
    (monitor,) = by_kind(vllm, "ServiceMonitor")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["ray-metrics"]


# ---- bad values fail at install time, naming the value -------------------------------------------
BAD_VALUES = [
    ({"serving": {"backend": "tgi"}}, "at '/serving/backend': value must be one of 'lmforge', 'vllm'"),
    ({"serving": {"replica": 2}}, "additional properties 'replica' not allowed"),
    ({"serving": {"lmforge": {"host": "0.0.0.0"}}}, "at '/serving/lmforge': additional properties 'host'"),
    ({"serving": {"lmforge": {"engine": {"num_slots": 0}}}}, "/serving/lmforge/engine/num_slots"),
    ({"serving": {"model": "/data/model"}}, "at '/serving/model'"),
    ({"serving": {"replicas": "two"}}, "at '/serving/replicas'"),
    ({"serving": {"apiKeys": {"existingSecret": ""}}}, "at '/serving/apiKeys/existingSecret'"),
    ({"s3": {"existingSecret": ""}}, "at '/s3/existingSecret'"),
    ({"mlflow": {"postgres": {"password": "hunter2"}}}, "additional properties 'password' not allowed"),
    ({"minio": {"enabled": False}}, "s3.endpoint is required when minio.enabled is false"),
    ({"mlflow": {"postgres": {"enabled": False}}}, "mlflow.backendStore.existingSecret is required"),
    ({"serving": {"backend": "vllm"}}, "serving.backend=vllm needs GPU workers"),
    ({"serving": {"replicaResources": {"gpus": 1}}}, "needs serving.workers.gpusPerPod >= 1"),
    (
        {"serving": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
        "serving.autoscaling.minReplicas=5 must be <= serving.autoscaling.maxReplicas=2",
    ),
    ({"serving": {"ingress": {"enabled": True}}}, "serving.ingress.host is required"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES, ids=[m[:40] for _, m in BAD_VALUES])
def test_bad_values_are_rejected_with_a_clear_message(values, message):
    import helm_python

    with pytest.raises((helm_python.HelmValuesError, helm_python.HelmRenderError)) as err:
        render_chart.render(values)
    assert message in str(err.value)


def test_render_cli_writes_the_manifests(tmp_path, capsys):
    out = tmp_path / "manifests.yaml"
    assert render_chart.main(["-f", str(CHART / "ci" / "kind-values.yaml"), "-o", str(out)]) == 0
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    assert docs == render_chart.render(values_files=[CHART / "ci" / "kind-values.yaml"])
    assert all(d["metadata"]["namespace"] == "lmforge" for d in docs)
    assert render_chart.main(["--values", str(CHART / "ci" / "kind-values.yaml"), "--name", "x"]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("serving: {backend: tgi}\n")
    assert render_chart.main(["-f", str(bad)]) == 2
    assert "serving/backend" in capsys.readouterr().err


def test_kind_script_applies_the_rendered_kind_values():
    """scripts/kind_e2e.sh installs the chart with this file's renderer and kind-values.yaml (tested above)
    and nothing else: no helm binary, no values of its own."""
    script = (REPO_ROOT / "scripts" / "kind_e2e.sh").read_text()
    assert "scripts/render_chart.py -f charts/lmforge/ci/kind-values.yaml" in script
    assert "helm " not in script.replace("helm-python", "")
    applied = [line for line in script.splitlines() if " apply " in line and "$WORKDIR" in line]
    assert applied and all("platform.yaml" in line or "serving.yaml" in line for line in applied)


def test_env_configmap_names_the_services():
    docs = render_chart.render(namespace="ml")
    (env,) = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-env")]
    assert env["data"]["MLFLOW_TRACKING_URI"] == "http://lmforge-mlflow.ml.svc:5000"
    assert env["data"]["RAY_ADDRESS"] == "http://lmforge-train-head-svc.ml.svc:8265"
    assert env["data"]["LMFORGE_S3_ENDPOINT"] == "http://lmforge-minio.ml.svc:9000"
    (mlflow,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "lmforge-mlflow"]
    assert mlflow["spec"]["ports"][0]["port"] == 5000


@pytest.mark.slow  # MLflow's sqlite migrations and two Python processes importing mlflow (~30-90 s)
def test_vllm_init_container_fetches_the_champion(tmp_path):
    """The vllm workers' init container script, run for real against an MLflow registry (sqlite here):
    it resolves the alias, downloads the version and points `current` at it, and can run again."""
    import subprocess
    import sys

    from lmforge.registry import RegistryClient

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    (model_dir / "model.safetensors").write_bytes(b"weights")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = RegistryClient(tracking_uri=tracking)
    client.register_model_dir(model_dir, "bot", alias="champion")
    client.register_model_dir(model_dir, "bot")

    docs = render_chart.render(
        values_files=[CHART / "ci" / "vllm-values.yaml"],
        values={"serving": {"model": "models:/bot@champion"}},
    )
    (service,) = by_kind(docs, "RayService")
    (init,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["initContainers"]
    cache = tmp_path / "models"
    cache.mkdir()
    command = [
        sys.executable,
        *init["command"][1:2],
        init["command"][2].replace("/models", str(cache)),
        *init["command"][3:],
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    for _ in range(2):  # a restarted init container finds the link of its first run
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    current = cache / "current"
    assert current.is_symlink() and (current / "model.safetensors").read_bytes() == b"weights"
    assert Path(os.readlink(current)).parts[-2:] == ("bot", "1")  # the champion, not the latest
