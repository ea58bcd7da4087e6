"""The multi-node overlay (deploy/k8s/overlays/multi-node): a LeaderWorkerSet serving vLLM across nodes on Ray.

Its objects are validated with the other overlays in tests/test_deploy.py (the LeaderWorkerSet against its CRD's
schema, its pod templates as core objects); here: that the validator can fail, and the shape that matters.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.test_deploy import (
    DEPLOY,
    K8S,
    MULTI_NODE,
    REPO,
    by_kind,
    container_env,
    kustomize,
    run,
    validate_leader_worker_sets,
)


def test_lws_validator_rejects_broken_manifests() -> None:
    """The LeaderWorkerSet check can fail: a typo'd LWS field, a wrong type, a typo inside a pod template."""
    import jsonschema
    import kubernetes_validate

    lws = by_kind(kustomize(DEPLOY / MULTI_NODE))["LeaderWorkerSet"]
    validate_leader_worker_sets(lws)

    def broken(change: Any) -> dict[str, Any]:
        copy: dict[str, Any] = json.loads(json.dumps(lws))
        change(copy["spec"]["leaderWorkerTemplate"])
        return copy

    with pytest.raises(jsonschema.ValidationError, match="'sise' was unexpected"):
        validate_leader_worker_sets(broken(lambda t: t.update(sise=2)))
    with pytest.raises(jsonschema.ValidationError, match="'2' is not of type 'integer'"):
        validate_leader_worker_sets(broken(lambda t: t.update(size="2")))
    with pytest.raises(jsonschema.ValidationError, match="'Sometimes' is not one of"):
        validate_leader_worker_sets(broken(lambda t: t.update(restartPolicy="Sometimes")))
    with pytest.raises(jsonschema.ValidationError, match="'workerTemplate' is a required property"):
        validate_leader_worker_sets(broken(lambda t: t.pop("workerTemplate")))
    typo = broken(lambda t: t["leaderTemplate"]["spec"]["containers"][0]["startupProbe"].update(failureTreshold=3))
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_leader_worker_sets(typo)


def shell_command(script: str, command: str, env: dict[str, str]) -> list[str]:
    """The words of the line of ``script`` that runs ``command``, with shell variables from ``env`` put in."""
    import shlex
    import string

    (line,) = [line for line in script.splitlines() if command in line]
    words = [string.Template(w).substitute(env) for w in shlex.split(line)]
    return words[words.index(next(w for w in words if w.endswith(command))) :]


def test_k8s_multi_node_overlay_serves_across_nodes() -> None:
    """Pipeline parallel across the group's pods, tensor parallel over each pod's GPUs, Ray between them, and the
    leader run as the base's Deployment runs (env, probes, cache and Hugging Face cache, config)."""
    kinds = by_kind(kustomize(DEPLOY / MULTI_NODE))
    base_kinds = by_kind(kustomize(K8S))
    (base,) = base_kinds["Deployment"]["spec"]["template"]["spec"]["containers"]
    lws = kinds["LeaderWorkerSet"]["spec"]
    template = lws["leaderWorkerTemplate"]
    size = template["size"]
    assert size >= 2 and lws["replicas"] == 1
    assert lws["startupPolicy"] == "LeaderCreated", "the leader is ready only once the workers have joined"
    assert template["restartPolicy"] == "RecreateGroupOnPodRestart"
    (leader,) = template["leaderTemplate"]["spec"]["containers"]
    (worker,) = template["workerTemplate"]["spec"]["containers"]

    # The launcher's command: vLLM's flags after `--`, pipeline stages = pods, tensor parallel = GPUs per pod.
    assert leader["command"] == worker["command"] == ["/bin/sh", "-c"]
    (script,) = leader["args"]
    (worker_script,) = worker["args"]
    for text in (script, worker_script):
        assert "$(" not in text, "Kubernetes expands $(VAR) in args: use backticks in the scripts"
        assert run(["sh", "-n", "-c", text]).returncode == 0
    lws_env = {
        "LWS_GROUP_SIZE": str(size),
        "LWS_LEADER_ADDRESS": "shortgpt-serve-0.shortgpt-serve",
        "bin": "/app/.venv/bin",
    }
    words = shell_command(script, "/shortgpt-serve", lws_env)
    assert words[:3] == ["/app/.venv/bin/shortgpt-serve", "run", "--"], words
    vllm = dict(zip(words[3::2], words[4::2], strict=True))
    gpus = {c["name"]: c["resources"]["limits"]["nvidia.com/gpu"] for c in (leader, worker)}
    for c in (leader, worker):
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
    assert int(vllm["--tensor-parallel-size"]) == gpus["shortgpt-serve"] == gpus["ray-worker"]
    assert int(vllm["--pipeline-parallel-size"]) == size
    assert vllm["--distributed-executor-backend"] == "ray"
    # Ray: the leader starts the head and waits for the whole group; each worker joins the leader's head port.
    head = shell_command(script, "/ray", lws_env)
    assert head[1:3] == ["start", "--head"] and "$LWS_GROUP_SIZE" in script
    port = dict(w.split("=", 1) for w in head if w.startswith("--port="))["--port"]
    join = shell_command(worker_script, "/ray", lws_env)
    assert f"--address={lws_env['LWS_LEADER_ADDRESS']}:{port}" in join and "--block" in join
    assert {"name": "ray", "containerPort": int(port), "protocol": "TCP"} in leader["ports"]

    # The leader is the base's container in all else: env, ports, probes (a longer start), mounts.
    assert leader["image"].startswith(base["image"].split(":")[0] + ":")
    assert container_env(leader) == container_env(base)
    assert leader["ports"][:2] == base["ports"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert leader[probe] == base[probe], probe
    startup = leader["startupProbe"]
    assert startup["httpGet"] == base["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= base["startupProbe"]["periodSeconds"] * base["startupProbe"]["failureThreshold"]
    assert leader["volumeMounts"] == base["volumeMounts"]
    base_volumes = {v["name"]: v for v in base_kinds["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    leader_volumes = {v["name"]: v for v in template["leaderTemplate"]["spec"]["volumes"]}
    worker_volumes = {v["name"]: v for v in template["workerTemplate"]["spec"]["volumes"]}
    assert leader_volumes["config"] == base_volumes["config"] and leader_volumes["cache"] == base_volumes["cache"]
    # Every pod reads the checkpoint (and the Hugging Face cache) at the same paths, from one shared volume.
    assert worker_volumes["cache"] == leader_volumes["cache"]
    assert {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}["cache"] == "/cache"
    assert container_env(worker)["HF_HOME"] == container_env(leader)["HF_HOME"]
    assert "ReadWriteMany" in kinds["PersistentVolumeClaim"]["spec"]["accessModes"]
    assert {"medium": "Memory"}.items() <= worker_volumes["dshm"]["emptyDir"].items()

    # Only the leader is behind the Service (and so the ServiceMonitor); the workers serve nothing.
    selector = kinds["Service"]["spec"]["selector"]
    assert selector.items() <= template["leaderTemplate"]["metadata"]["labels"].items()
    assert not selector.items() <= template["workerTemplate"]["metadata"]["labels"].items()
    assert kinds["Service"]["spec"]["ports"] == base_kinds["Service"]["spec"]["ports"]
    # The image the overlay names is the GPU image with Ray: the Dockerfile can build it.
    assert re.search(r"EXTRA_PIP=\S*ray", (REPO / "Dockerfile").read_text())
