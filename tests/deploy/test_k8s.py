"""deploy/k8s: valid against the Kubernetes API schemas (kubernetes-validate, strict), and wired together:
the Service selects the Deployment's pods, the HPA scales it, probes and scrape annotations hit the port the
server listens on, and both workloads mount the one checkpoint claim."""

from __future__ import annotations

import pytest
import yaml
from deploy_files import (
    K8S_DIR,
    ROOT,
    dockerfile_instructions,
    k8s_documents,
    k8s_objects,
    load_compose,
    trainer_job,
)

from service.settings import Settings

K8S_VERSION = "1.30.0"  # the oldest Kubernetes still in wide use that these manifests target


def _env(container) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _pod(kind: str, name: str) -> dict:
    return k8s_objects()[(kind, name)]["spec"]["template"]


def _server_pod() -> dict:
    return _pod("Deployment", "smollm-server")


def _trainer_pod() -> dict:
    return _pod("Job", "smollm-trainer")


def test_kustomization_lists_every_manifest():
    listed = set(k8s_documents())
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize("name", sorted(k8s_documents()))
def test_manifest_is_valid_kubernetes(kubernetes_validate, name):
    for doc in k8s_documents()[name]:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")


def test_validation_rejects_an_unknown_field(kubernetes_validate):
    # strict=True must catch a misspelt field, or the check above proves little.
    doc = yaml.safe_load((K8S_DIR / "server-deployment.yaml").read_text())
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = doc["spec"]["template"]["spec"]["containers"][
        0
    ]["readinessProbe"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_expected_objects_exist():
    assert set(k8s_objects()) == {
        ("PersistentVolumeClaim", "smollm-checkpoints"),
        ("Job", "smollm-trainer"),
        ("Deployment", "smollm-server"),
        ("Service", "smollm-server"),
        ("HorizontalPodAutoscaler", "smollm-server"),
    }


def test_a_replacement_trainer_pod_starts_only_after_the_old_one_ended():
    assert k8s_objects()[("Job", "smollm-trainer")]["spec"]["podReplacementPolicy"] == "Failed"


def test_server_probes_port_and_scrape_annotations_agree():
    pod = _server_pod()
    (container,) = pod["spec"]["containers"]
    env = _env(container)
    port = Settings(port=env["SMOLLM_PORT"]).port
    (container_port,) = container["ports"]
    assert container_port["containerPort"] == port
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": container_port["name"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": container_port["name"]}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert container["command"] == ["python", "-m", "service", "--host", "0.0.0.0"]


def test_service_selects_the_server_pods_and_hpa_scales_the_deployment():
    objects = k8s_objects()
    deployment = objects[("Deployment", "smollm-server")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = objects[("Service", "smollm-server")]
    assert service["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    hpa = objects[("HorizontalPodAutoscaler", "smollm-server")]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "smollm-server")
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    # Utilization targets are relative to requests: every container must request CPU.
    assert all("cpu" in c["resources"]["requests"] for c in deployment["spec"]["template"]["spec"]["containers"])


def test_server_env_is_valid_settings_and_threads_fit_the_cpu_limit():
    (container,) = _server_pod()["spec"]["containers"]
    env = {k: v for k, v in _env(container).items() if v is not None}
    fields = {f"SMOLLM_{name.upper()}" for name in Settings.model_fields}
    assert {k for k in _env(container) if k.startswith("SMOLLM_")} <= fields
    settings = Settings(**{k.removeprefix("SMOLLM_").lower(): v for k, v in env.items()})
    assert settings.checkpoint in {m["mountPath"] for m in container["volumeMounts"]}
    assert settings.threads == int(container["resources"]["limits"]["cpu"])
    # Kubernetes sends SIGKILL after the grace period: the server's own drain must fit inside it.
    assert _server_pod()["spec"]["terminationGracePeriodSeconds"] > settings.shutdown_grace


@pytest.mark.parametrize("kind,name", [("Deployment", "smollm-server"), ("Job", "smollm-trainer")])
def test_pods_are_non_root_with_resources_and_share_the_checkpoint_claim(kind, name):
    pod = _pod(kind, name)["spec"]
    image_uid = next(arg for op, arg in reversed(dockerfile_instructions(ROOT / "Dockerfile.serve")) if op == "USER")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(image_uid)
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= container["resources"][section].keys(), f"{container['name']}: {section}"
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/checkpoints"]
        claim = volumes[mount["name"]]["persistentVolumeClaim"]
        assert ("PersistentVolumeClaim", claim["claimName"]) in k8s_objects()
        # The server only reads checkpoints; the trainer writes them.
        assert bool(mount.get("readOnly")) is (kind == "Deployment")
        assert bool(claim.get("readOnly")) is (kind == "Deployment")


def test_checkpoint_claim_can_be_shared_across_nodes():
    pvc = k8s_objects()[("PersistentVolumeClaim", "smollm-checkpoints")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_workloads_run_the_compose_commands_and_images():
    compose = load_compose()["services"]
    (server,) = _server_pod()["spec"]["containers"]
    (trainer,) = _trainer_pod()["spec"]["containers"]
    assert server["command"] == compose["server"]["command"]
    assert trainer["command"] == compose["trainer"]["command"]
    assert server["image"] == compose["server"]["image"]
    assert trainer["image"] == compose["trainer"]["image"]
    assert _trainer_pod()["spec"]["restartPolicy"] == "Never"
    annotations = _trainer_pod()["metadata"]["annotations"]
    _args, config = trainer_job(trainer["command"])
    assert annotations["prometheus.io/port"] == str(config.metrics_port)
    assert {p["containerPort"] for p in trainer["ports"]} == {config.metrics_port}
