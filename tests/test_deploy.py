"""The deployment artifacts in deploy/ and the Dockerfile, checked with the real tools.

Fast: promtool on the Prometheus config, rules and rule unit tests; the dashboard's structure; the Kubernetes
manifests rendered by kubectl's kustomize and validated against Kubernetes' schemas (kubernetes-validate) and,
for the ServiceMonitor, prometheus-operator's generated validators (npm, deploy/validate); the Compose files
against the Compose spec's JSON schema; and every env var, port and path in them against the CLI's own.
Slow: a real Prometheus scrapes the session's real server and evaluates every dashboard and alert expression.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "shortgpt.json"
K8S = DEPLOY / "k8s"
MULTI_NODE = "k8s/overlays/multi-node"
LWS_SCHEMA = DEPLOY / "validate" / "leaderworkerset-v1.schema.json"
BIN = Path(sys.executable).parent
VALIDATORS = BIN.parent / "deploy-validate" / "node_modules"
SETUP = "run scripts/setup.sh --dev"
JOBS = {"shortgpt-launcher", "shortgpt-vllm"}
ALERTS = {
    "ShortgptEngineDown",
    "ShortgptTargetDown",
    "ShortgptNotReady",
    "ShortgptQualityBelowFloor",
    "ShortgptLatencyBudgetMissed",
    "ShortgptSlowerThanPredicted",
    "ShortgptLiveAgreementLow",
    "ShortgptLiveSavingBelowStartup",
    "ShortgptEngineRestarting",
    "ShortgptContextBeyondRopeBound",
}
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests target; the newest bundled schema is checked too


def tool(name: str) -> str:
    path = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if path is None:
        pytest.fail(f"{name} is not installed; {SETUP}")
    return path


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


def load_yaml_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def cli_envvars() -> set[str]:
    from shortgpt_serve.cli import cli

    names: set[str] = set()
    for command in cli.commands.values():
        names |= {p.envvar for p in command.params if isinstance(p.envvar, str)}
    return names


def serve_defaults() -> Any:
    from shortgpt_serve.config import ServeConfig

    return ServeConfig()


def launcher_metric_names() -> set[str]:
    """Every sample name shortgpt-serve exposes (counters with _total, histograms with their series), from the real
    declarations: the launcher's own metrics and the live comparison's, which the shadow middleware registers on
    vLLM's /metrics."""
    from shortgpt_serve.serving.live import LiveMetrics
    from shortgpt_serve.serving.metrics import LauncherMetrics

    registry = LauncherMetrics().registry
    LiveMetrics(registry)
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        names |= {sample.name for sample in family.samples}
        names |= {f"{family.name}{suffix}" for suffix in ("_total",) if family.type == "counter"}
    return names


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p["targets"]]


def docs_queries() -> list[str]:
    """The PromQL examples of docs/deploy.md: ```promql blocks, one query per paragraph, comments dropped."""
    text = (REPO / "docs" / "deploy.md").read_text()
    queries = []
    for block in re.findall(r"```promql\n(.*?)```", text, re.S):
        for paragraph in block.split("\n\n"):
            lines = [line for line in paragraph.splitlines() if line.strip() and not line.lstrip().startswith("#")]
            if lines:
                queries.append(" ".join(line.strip() for line in lines))
    return queries


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    return [r for g in groups for r in g["rules"]]


# --- Prometheus: the real promtool -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool(args: list[str]) -> None:
    result = run([tool("promtool"), *args], cwd=PROM)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_rule_tests_cover_every_alert() -> None:
    """alerts.test.yml makes each alert fire at least once and checks at least one time it must not."""
    tests = yaml.safe_load((PROM / "alerts.test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t["alert_rule_test"]]
    fires = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert {r["alert"] for r in alert_rules()} == ALERTS
    assert fires == ALERTS, ALERTS - fires
    assert quiet >= ALERTS - {"ShortgptQualityBelowFloor", "ShortgptLatencyBudgetMissed"}, ALERTS - quiet


def test_scrape_config_matches_the_cli_ports() -> None:
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == JOBS
    defaults = serve_defaults()
    for job, port in (("shortgpt-launcher", defaults.metrics_port), ("shortgpt-vllm", defaults.port)):
        assert jobs[job].get("metrics_path", "/metrics") == "/metrics"
        targets = [t for sc in jobs[job]["static_configs"] for t in sc["targets"]]
        assert targets == [f"shortgpt-serve:{port}"], (job, targets)
    assert config["rule_files"] == ["alerts.yml"]


def test_every_shortgpt_metric_in_dashboard_and_alerts_is_declared() -> None:
    """A typo in a metric name would silently show 'No data': every shortgpt_* name must be a real one."""
    declared = launcher_metric_names()
    exprs = dashboard_exprs() + [r["expr"] for r in alert_rules()]
    used = {m for e in exprs for m in re.findall(r"\bshortgpt_[a-z0-9_]+", e)}
    assert used - declared == set()
    vllm_used = {m for e in exprs for m in re.findall(r"vllm:[a-z0-9_]+", e)}
    assert vllm_used, "the dashboard has no live vLLM panels"


# --- Grafana ----------------------------------------------------------------------------------------------


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    panels = dashboard_panels()
    assert len(panels) >= 15
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["title"] and p["targets"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == uid, p["title"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    used = {v for e in dashboard_exprs() for v in re.findall(r"\$(\w+)", e)} - {"__rate_interval"}
    assert used <= variables, used - variables
    titles = " ".join(p["title"] for p in panels)
    for needed in ("tokens/s", "TTFT", "latency", "Speedup", "Quality", "accuracy", "Layers", "Block Influence"):
        assert needed in titles, needed


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/shortgpt.yml").read_text())["providers"][0]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert urllib.parse.urlsplit(ds["url"]).hostname in compose["services"]


# --- Kubernetes -------------------------------------------------------------------------------------------


def kustomize(folder: Path) -> list[dict[str, Any]]:
    result = run([tool("kubectl"), "kustomize", str(folder)])
    assert result.returncode == 0, result.stderr
    return load_yaml_docs(result.stdout)


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = {o["kind"]: o for o in objects}
    assert len(kinds) == len(objects), "one object per kind expected"
    return kinds


def validate_service_monitors(objects: list[dict[str, Any]]) -> str:
    script = DEPLOY / "validate" / "servicemonitor.mjs"
    if not VALIDATORS.is_dir():
        pytest.fail(f"the npm deploy validators are not installed in {VALIDATORS}; {SETUP}")
    result = run([tool("node"), str(script), str(VALIDATORS)], input=json.dumps(objects))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def strict_crd_schema(schema: Any) -> Any:
    """A CRD's structural schema as the API server applies it with strict field validation: an unknown field is
    an error wherever the schema lists the fields (and does not preserve unknown ones)."""
    if isinstance(schema, list):
        return [strict_crd_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_crd_schema(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out.setdefault("x-kubernetes-preserve-unknown-fields", False)
        if not out["x-kubernetes-preserve-unknown-fields"]:
            out["additionalProperties"] = False
    return out


def validate_leader_worker_sets(obj: dict[str, Any]) -> None:
    """A LeaderWorkerSet against its CRD's schema (deploy/validate/leaderworkerset-v1.schema.json, strict), and
    its pod templates and volume claim templates against Kubernetes' own schemas, strictly, as core objects."""
    import jsonschema
    import kubernetes_validate

    crd = json.loads(LWS_SCHEMA.read_text())
    assert obj["apiVersion"] == f"{crd['group']}/{crd['version']}" and obj["kind"] == crd["kind"]
    jsonschema.Draft7Validator(strict_crd_schema(crd["schema"])).validate(obj)
    template = obj["spec"]["leaderWorkerTemplate"]
    cores = [
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role}, "template": template[role]}
        for role in ("leaderTemplate", "workerTemplate")
        if role in template
    ]
    cores += [
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", **c} for c in template.get("volumeClaimTemplates", [])
    ]
    for core in cores:
        for version in (K8S_VERSION, kubernetes_validate.latest_version()):
            kubernetes_validate.validate(core, version, strict=True)


@pytest.mark.parametrize(
    ("folder", "workload"),
    [("k8s", "Deployment"), ("k8s/overlays/tensor-parallel-2", "Deployment"), (MULTI_NODE, "LeaderWorkerSet")],
)
def test_k8s_manifests_validate(folder: str, workload: str) -> None:
    """Rendered by kubectl's own kustomize, then validated strictly (unknown fields are errors)."""
    import kubernetes_validate

    objects = kustomize(DEPLOY / folder)
    kinds = by_kind(objects)
    assert set(kinds) == {"ConfigMap", "PersistentVolumeClaim", workload, "Service", "ServiceMonitor"}
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            continue
        if obj["kind"] == "LeaderWorkerSet":
            validate_leader_worker_sets(obj)
            continue
        for version in (K8S_VERSION, kubernetes_validate.latest_version()):
            kubernetes_validate.validate(obj, version, strict=True)
    assert "OK ServiceMonitor/shortgpt-serve" in validate_service_monitors([kinds["ServiceMonitor"]])


def test_k8s_validators_reject_broken_manifests() -> None:
    """The validators above can fail: a typo'd field and a wrong type are caught."""
    import kubernetes_validate

    kinds = by_kind(kustomize(K8S))
    bad = json.loads(json.dumps(kinds["Deployment"]))
    bad["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["failureTreshold"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    monitor = json.loads(json.dumps(kinds["ServiceMonitor"]))
    monitor["spec"]["endpoints"][0]["interva"] = "15s"
    monitor["spec"]["endpoints"][1]["port"] = 8000
    result = run(
        [tool("node"), str(DEPLOY / "validate/servicemonitor.mjs"), str(VALIDATORS)], input=json.dumps([monitor])
    )
    assert result.returncode == 1
    assert "interva: unknown field" in result.stdout and "port must be string" in result.stdout


def container_env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_k8s_matches_the_cli() -> None:
    kinds = by_kind(kustomize(K8S))
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(container)
    shortgpt_env = {k for k in env if k.startswith("SHORTGPT_SERVE_")}
    assert shortgpt_env <= cli_envvars(), shortgpt_env - cli_envvars()
    defaults = serve_defaults()
    assert env["SHORTGPT_SERVE_HOST"] == "0.0.0.0"
    assert int(env["SHORTGPT_SERVE_PORT"]) == defaults.port
    assert int(env["SHORTGPT_SERVE_METRICS_PORT"]) == defaults.metrics_port
    assert env["SHORTGPT_SERVE_API_KEY"] == {"secretKeyRef": {"name": "shortgpt-serve-api-key", "key": "api-key"}}

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": defaults.port, "metrics": defaults.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60, "profiling + boot take minutes"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1

    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["cache"] == env["SHORTGPT_SERVE_CACHE_DIR"] == "/cache"
    assert env["HF_HOME"].startswith("/cache/"), "hub downloads (the Hugging Face cache) must be on the PVC"
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == kinds["PersistentVolumeClaim"]["metadata"]["name"]
    config_map = kinds["ConfigMap"]
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    config_path = Path(env["SHORTGPT_SERVE_CONFIG"])
    assert str(config_path.parent) == mounts["config"] and config_path.name in config_map["data"]

    service = kinds["Service"]
    assert service["spec"]["selector"].items() <= kinds["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    svc_ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert svc_ports == {"http": (defaults.port, "http"), "metrics": (defaults.metrics_port, "metrics")}
    monitor = kinds["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    jobs = {e["port"]: e["relabelings"][0]["replacement"] for e in monitor["endpoints"]}
    assert jobs == {"metrics": "shortgpt-launcher", "http": "shortgpt-vllm"}
    assert all(e["path"] == "/metrics" for e in monitor["endpoints"])


def test_k8s_tensor_parallel_overlay_requests_its_gpus() -> None:
    (container,) = by_kind(kustomize(K8S / "overlays/tensor-parallel-2"))["Deployment"]["spec"]["template"]["spec"][
        "containers"
    ]
    args = container["args"]
    assert args[:2] == ["run", "--"], "vLLM's flags go after --"
    vllm = dict(zip(args[2::2], args[3::2], strict=True))
    gpus = int(vllm.get("--tensor-parallel-size", 1)) * int(vllm.get("--pipeline-parallel-size", 1))
    assert gpus == 2
    assert (
        container["resources"]["limits"]["nvidia.com/gpu"]
        == gpus
        == container["resources"]["requests"]["nvidia.com/gpu"]
    )
    assert "SHORTGPT_SERVE_API_KEY" in container_env(container), "the overlay keeps the base's env"


def show_config(config: Path) -> dict[str, Any]:
    result = run([sys.executable, "-m", "shortgpt_serve.cli", "show-config", "--config", str(config)])
    assert result.returncode == 0, result.stdout + result.stderr
    loaded: dict[str, Any] = yaml.safe_load(result.stdout)
    return loaded


def test_shipped_configs_are_valid_for_the_cli(tmp_path: Path) -> None:
    """The ConfigMap's YAML and deploy/shortgpt.yaml load with the CLI's strict config (unknown keys fail)."""
    data = by_kind(kustomize(K8S))["ConfigMap"]["data"]["shortgpt.yaml"]
    (tmp_path / "k8s.yaml").write_text(data)
    assert show_config(tmp_path / "k8s.yaml")["serve"]["health_timeout"] == 1800
    assert show_config(DEPLOY / "shortgpt.yaml")["selection"]["budget"] == 0.75
    (tmp_path / "bad.yaml").write_text(data.replace("health_timeout", "health_timout"))
    result = run([sys.executable, "-m", "shortgpt_serve.cli", "show-config", "--config", str(tmp_path / "bad.yaml")])
    assert result.returncode == 2, "an unknown key must be an error, or this test proves nothing"


# --- Compose ----------------------------------------------------------------------------------------------


COMPOSE_FILES = ["docker-compose.yml", "docker-compose.gpu.yml"]


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_matches_the_compose_spec_schema(name: str) -> None:
    """`docker compose config` needs the Compose plugin, absent here: the Compose spec's JSON schema instead."""
    import jsonschema

    schema_file = VALIDATORS / "compose-spec-schema/lib/compose-spec/schema/compose-spec.json"
    if not schema_file.exists():
        pytest.fail(f"{schema_file} is missing; {SETUP}")
    schema = json.loads(schema_file.read_text())
    assert schema["$schema"].startswith("http://json-schema.org/draft/2019-09/")
    validator = jsonschema.Draft201909Validator(schema)
    errors = [
        f"{'/'.join(map(str, e.path))}: {e.message}"
        for e in validator.iter_errors(yaml.safe_load((DEPLOY / name).read_text()))
    ]
    assert errors == []
    broken = yaml.safe_load((DEPLOY / name).read_text())
    broken["services"]["shortgpt-serve"]["heathcheck"] = {}
    assert list(validator.iter_errors(broken)), "the schema must reject unknown keys"


def test_compose_references_exist_and_match_the_cli() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services, volumes = compose["services"], compose["volumes"]
    for name, svc in services.items():
        for mount in svc.get("volumes", []):
            source, target = mount.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, source)
            else:
                assert source in volumes, (name, source)
            assert target.startswith("/"), (name, target)
        for dep in svc.get("depends_on", []):
            assert dep in services
    app = services["shortgpt-serve"]
    build = app["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    env = app["environment"]
    shortgpt_env = {k for k in env if k.startswith("SHORTGPT_SERVE_")}
    assert shortgpt_env <= cli_envvars(), shortgpt_env - cli_envvars()
    defaults = serve_defaults()
    assert env["SHORTGPT_SERVE_HOST"] == "0.0.0.0"
    assert {p.split(":")[1].split()[0] for p in app["ports"]} == {str(defaults.port), str(defaults.metrics_port)}
    mounts = dict(m.split(":")[:2] for m in app["volumes"])
    assert mounts["./shortgpt.yaml"] == env["SHORTGPT_SERVE_CONFIG"]
    assert mounts["shortgpt-cache"] == env["SHORTGPT_SERVE_CACHE_DIR"]
    assert env["HF_HOME"].startswith(f"{env['SHORTGPT_SERVE_CACHE_DIR']}/"), "the Hugging Face cache on the volume"
    prom_mounts = dict(m.split(":")[:2] for m in services["prometheus"]["volumes"])
    assert prom_mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    scrape = yaml.safe_load((PROM / "prometheus.yml").read_text())
    for rule_file in scrape["rule_files"]:
        assert f"./prometheus/{rule_file}" in prom_mounts, rule_file
    targets = {t for j in scrape["scrape_configs"] for sc in j["static_configs"] for t in sc["targets"]}
    assert {t.split(":")[0] for t in targets} == {"shortgpt-serve"}
    gpu = yaml.safe_load((DEPLOY / "docker-compose.gpu.yml").read_text())["services"]["shortgpt-serve"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["build"]["args"]["ENGINE"] == "gpu"


# --- Dockerfile (not built here: no container engine) -----------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def healthcheck_command() -> list[str]:
    (healthcheck,) = [v for k, v in dockerfile_instructions() if k == "HEALTHCHECK"]
    command: list[str] = json.loads(healthcheck.split(" CMD ", 1)[1])
    return command


def test_dockerfile_copies_real_files_and_runs_the_console_script() -> None:
    import tomllib

    instructions = dockerfile_instructions()
    for keyword, rest in instructions:
        if keyword == "COPY":
            *sources, _dest = rest.split()
            for source in sources:
                assert (REPO / source).exists(), source
    values = {k: v for k, v in instructions if k in ("ENTRYPOINT", "CMD", "HEALTHCHECK", "EXPOSE", "VOLUME")}
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = json.loads(values["ENTRYPOINT"])
    assert entrypoint == ["/app/.venv/bin/shortgpt-serve"] and "shortgpt-serve" in scripts
    from shortgpt_serve.cli import cli

    (command,) = json.loads(values["CMD"])
    assert command in cli.commands
    setup = [v for k, v in instructions if k == "RUN" and "scripts/setup.sh" in v]
    assert setup == ["scripts/setup.sh --${ENGINE}"]
    defaults = serve_defaults()
    assert values["EXPOSE"].split() == [str(defaults.port), str(defaults.metrics_port)]
    assert json.loads(values["VOLUME"]) == ["/cache"]
    assert healthcheck_command()[0] == "/app/.venv/bin/python"
    env_text = " ".join(v for k, v in instructions if k == "ENV")
    env = dict(re.findall(r"(SHORTGPT_SERVE_\w+)=(\S+)", env_text))
    assert set(env) <= cli_envvars(), set(env) - cli_envvars()
    assert re.search(r"\bHF_HOME=/cache/\S+", env_text), "hub downloads (the Hugging Face cache) on the volume"
    assert env["SHORTGPT_SERVE_HOST"] == "0.0.0.0" and env["SHORTGPT_SERVE_CACHE_DIR"] == "/cache"
    assert env["SHORTGPT_SERVE_CONFIG"].removeprefix("/app/") in {f"{s}" for s in ["deploy/shortgpt.yaml"]}
    assert (REPO / env["SHORTGPT_SERVE_CONFIG"].removeprefix("/app/")).is_file()


# --- Slow: a real Prometheus scrapes the real server ------------------------------------------------------


COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)")


def with_bool(expr: str) -> str:
    """Turn every comparison outside label matchers into its `bool` form.

    An alert expression filters: on a healthy server `shortgpt_engine_up == 0` returns nothing, which cannot
    tell a healthy server from a metric that does not exist. With `bool` it returns 0 or 1 for every series
    the comparison sees, so "returns data" proves every metric and label in it is really there.
    """
    out, depth, quoted, i = [], 0, False, 0
    while i < len(expr):
        c = expr[i]
        if c == '"' and (i == 0 or expr[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and c == "{":
            depth += 1
        elif not quoted and c == "}":
            depth -= 1
        elif not quoted and depth == 0 and (m := COMPARISON.match(expr, i)) and expr[i - 1] not in "=!~":
            out.append(f"{m.group(1)} bool")
            i += len(m.group(1))
            continue
        out.append(c)
        i += 1
    return "".join(out)


def test_docs_queries_are_found() -> None:
    queries = docs_queries()
    assert len(queries) >= 3 and any("group_left" in q and "label_replace" in q for q in queries), queries


def test_with_bool() -> None:
    assert with_bool('up{job=~"a|b"} == 0 and x >= 1') == 'up{job=~"a|b"} == bool 0 and x >= bool 1'
    assert with_bool("a > on(job) group_left() (b * 1.1)") == "a > bool on(job) group_left() (b * 1.1)"
    assert with_bool('m{l!="x"} < n') == 'm{l!="x"} < bool n'


def substitute(expr: str, variables: dict[str, str]) -> str:
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(f"${name}", variables[name])
    assert "$" not in expr, expr
    return expr


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:  # a query Prometheus cannot parse or evaluate: say which and why
        pytest.fail(f"{path} {params}: HTTP {e.code}: {e.read().decode(errors='replace')}")
    assert body["status"] == "success", body
    return body["data"]


@pytest.mark.slow
def test_dockerfile_healthcheck_probes_the_real_server(server: Any) -> None:
    """The image's HEALTHCHECK command, run here against the real server's port: 0 when up, 1 on a closed port."""
    command = [sys.executable, *healthcheck_command()[1:]]
    ok = run(command, env={"SHORTGPT_SERVE_PORT": str(server.port)})
    assert ok.returncode == 0, ok.stderr
    closed = run(command, env={"SHORTGPT_SERVE_PORT": str(free_port())})
    assert closed.returncode != 0


@pytest.fixture
def prometheus(server: Any, tmp_path: Path) -> Iterator[str]:
    """Prometheus on a free port, configured from deploy/prometheus with the session server as its targets."""
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"}
    targets = {"shortgpt-launcher": server.metrics_port, "shortgpt-vllm": server.port}
    assert {j["job_name"] for j in config["scrape_configs"]} == set(targets)
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{targets[job['job_name']]}"]}]
    config["rule_files"] = [str(PROM / f) for f in config["rule_files"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Prometheus did not start:\n{(tmp_path / 'prometheus.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(1)


@pytest.mark.slow
def test_prometheus_evaluates_every_dashboard_and_alert_query(server: Any, client: Any, prometheus: str) -> None:
    from tests.serving import NAME

    def targets_up() -> bool:
        active = api(prometheus, "targets")["activeTargets"]
        return {t["labels"]["job"] for t in active if t["health"] == "up"} == JOBS

    wait_until(targets_up, 30, "both scrape targets up")
    # Real traffic after the first scrapes, so vLLM's counters and histograms move inside the rate window.
    for i in range(4):
        reply = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=12
        )
        assert reply.choices[0].message.content
    time.sleep(4)

    launcher = f"127.0.0.1:{server.metrics_port}"
    assert NAME in api(prometheus, "label/served_model_name/values", **{"match[]": "shortgpt_build_info"})
    assert launcher in api(
        prometheus, "label/instance/values", **{"match[]": f'shortgpt_build_info{{served_model_name="{NAME}"}}'}
    )
    # As Grafana writes a regex variable into a PromQL string: regex-escaped, backslashes doubled.
    launcher_regex = re.escape(launcher).replace("\\", "\\\\")
    engine_regex = re.escape(f"127.0.0.1:{server.port}").replace("\\", "\\\\")
    variables = {"model_name": NAME, "launcher": launcher_regex, "engine": engine_regex, "__rate_interval": "1m"}
    queries = {f"dashboard: {e}": substitute(e, variables) for e in dashboard_exprs()}
    queries |= {f"alert {r['alert']}: {r['expr']}": with_bool(r["expr"]) for r in alert_rules()}
    queries |= {f"docs/deploy.md: {q}": q for q in docs_queries()}
    empty, nan = [], []
    for label, query in queries.items():
        result = api(prometheus, "query", query=query)["result"]  # a query Prometheus refuses fails here
        if not result and "shortgpt_live_" in query:
            continue  # the live series exist only with --shadow-url: their data is checked in tests/test_live.py
        if not result:
            empty.append(label)
        elif "histogram_quantile" in query and all(s["value"][1] == "NaN" for s in result):
            nan.append(label)
    assert empty == [], "no data for:\n" + "\n".join(empty)
    assert nan == [], "only NaN (no observations in the window) for:\n" + "\n".join(nan)

    def rules_evaluated() -> bool:
        rules = [r for g in api(prometheus, "rules")["groups"] for r in g["rules"]]
        return {r["name"] for r in rules} == ALERTS and all(r.get("lastEvaluation", "").startswith("2") for r in rules)

    wait_until(rules_evaluated, 10, "every alert rule evaluated")
    rules = [r for g in api(prometheus, "rules")["groups"] for r in g["rules"]]
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
