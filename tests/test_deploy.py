"""Deployment artifacts validated without a cluster (docs/deploy.md): the Helm chart rendered by Helm's
own engine (helm-python-sdk) for a generated repository, CPU and GPU, every object checked against
Kubernetes' schemas (kubernetes-validate, strict) and the InferenceService against KServe's vendored CRD
schema; and broken objects refused."""
from __future__ import annotations

import argparse
import copy
import shutil

import pytest
import yaml

from conftest import make_model
from crema import deploy
from crema.deploy import DeployError, render, validate_isvc, validate_k8s, validate_objects
from export.onnx_export import export_artifacts
from triton_models.repository import generate_repository, validate

PYTHON_MODELS = {"crema", "preprocess", "vision", "mmqa_rgb", "llm"}
NATIVE_MODELS = PYTHON_MODELS | {"fuse_encode", "decoder_first", "decoder_step"}


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    art = export_artifacts(make_model(("rgb",)), root / "art", {"preset": "tiny", "seed": 0}, progress=False)
    return {"python": generate_repository(art, root / "repo-python"),
            "native": generate_repository(art, root / "repo-native", flavour="native"), "root": root}


def rendered(repos, tmp_path, gpu: bool) -> dict[str, list[dict]]:
    paths = render(repos["native" if gpu else "python"], tmp_path / "out", gpu=gpu)
    assert [p.name for p in paths] == ["values.yaml", "crema.yaml", "prometheus-adapter-values.yaml",
                                       "inferenceservice.yaml"]
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in paths}


def by_kind(objects: list[dict]) -> dict[str, dict]:
    return {o["kind"]: o for o in objects}


def check_container(c: dict, http_port) -> None:
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": http_port}
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": http_port}
    # generous start-up allowance for model loading, at least crema serve's own --timeout
    startup = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    assert startup >= int(next(a for a in c["args"] if a.startswith("--timeout=")).split("=")[1]) >= 600
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert "--host=0.0.0.0" in c["args"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", "/dev/shm"} <= mounts


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_chart_and_inference_service_render_and_validate(repos, tmp_path, gpu):
    files = rendered(repos, tmp_path, gpu)
    repo = repos["native" if gpu else "python"]
    models = sorted(validate(repo))
    assert set(models) == (NATIVE_MODELS if gpu else PYTHON_MODELS)
    assert files["values.yaml"] == [{"gpu": gpu, "models": models}]
    objects = by_kind(files["crema.yaml"])
    assert set(objects) == {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    validate_objects(files["crema.yaml"] + files["inferenceservice.yaml"])  # render validated too; again here

    pod = objects["Deployment"]["spec"]["template"]
    assert pod["metadata"]["annotations"]["crema-models"] == ",".join(models)
    assert pod["spec"]["securityContext"]["runAsNonRoot"] and pod["spec"]["automountServiceAccountToken"] is False
    (c,) = pod["spec"]["containers"]  # the gateway is off by default
    check_container(c, "http")
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert c["args"][0] == "serve" and "--repo=/models" in c["args"]
    assert ("--tritonserver=/opt/tritonserver/bin/tritonserver" in c["args"]) == gpu
    assert c["image"].startswith("crema-gpu:" if gpu else "crema-cpu:")
    assert c["resources"]["limits"].get("nvidia.com/gpu") == (1 if gpu else None)
    assert pod["spec"]["volumes"][0] == {"name": "models", "persistentVolumeClaim": {"claimName": "crema-models",
                                                                                    "readOnly": True}}
    assert {p["name"]: p["port"] for p in objects["Service"]["spec"]["ports"]} == {"http": 8000, "grpc": 8001,
                                                                                   "metrics": 8002}

    # HPA on the queue-time Pods metric the adapter rule defines, over the repository's real models
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == objects["Deployment"]["metadata"]["name"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "crema_queue_time_us"
    (rule,) = files["prometheus-adapter-values.yaml"][0]["rules"]["custom"]
    assert rule["name"]["as"] == "crema_queue_time_us" and "nv_inference_queue_duration_us" in rule["seriesQuery"]
    queued = sorted(set(models) - {"crema"})
    assert f'model=~"{"|".join(queued)}"' in rule["metricsQuery"] and 'model="crema"' in rule["metricsQuery"]
    assert yaml.safe_load(objects["ConfigMap"]["data"]["config.yaml"])["rules"] == [rule]

    (isvc,) = files["inferenceservice.yaml"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton" and model["protocolVersion"] == "v2"
    assert isvc["metadata"]["annotations"]["crema-models"] == ",".join(models)
    check_container(model, 8080)
    assert "--http-port=8080" in model["args"] and "--grpc-port=9000" in model["args"]
    assert model["resources"]["limits"].get("nvidia.com/gpu") == (1 if gpu else None)
    assert ("--tritonserver=/opt/tritonserver/bin/tritonserver" in model["args"]) == gpu


def test_gateway_and_fixed_replicas_render_valid(repos):
    objects = by_kind(deploy.render_chart({"models": sorted(validate(repos["python"])), "gateway": {"enabled": True},
                                           "autoscaling": {"enabled": False}, "replicaCount": 2}))
    assert set(objects) == {"Deployment", "Service"}  # no HPA, no adapter rule
    validate_objects(list(objects.values()))
    spec = objects["Deployment"]["spec"]
    assert spec["replicas"] == 2
    gateway = spec["template"]["spec"]["containers"][1]
    assert gateway["args"] == ["gateway", "--url", "localhost:8001"] and gateway["securityContext"]["readOnlyRootFilesystem"]


def test_chart_lints_clean():
    import helm_python

    report = helm_python.lint(deploy.CHART, kube_version=f"v{deploy.K8S_VERSION}", strict=True)
    assert not report["errors"] and not [m for m in report["messages"] if m["severity"] >= 2], report


def _deployment() -> dict:
    return by_kind(deploy.render_chart({"models": ["crema"]}))["Deployment"]


BROKEN_DEPLOYMENTS = {
    "probe port a list": lambda c: c["readinessProbe"]["httpGet"].__setitem__("port", [8000]),
    "probe port a float": lambda c: c["livenessProbe"]["httpGet"].__setitem__("port", 8000.5),
    "containerPort a string": lambda c: c["ports"][0].__setitem__("containerPort", "8000"),
    "misspelt field": lambda c: c.__setitem__("readinesProbe", c.pop("readinessProbe")),
    "container without a name": lambda c: c.pop("name"),
}


@pytest.mark.parametrize("break_it", BROKEN_DEPLOYMENTS.values(), ids=BROKEN_DEPLOYMENTS.keys())
def test_a_broken_deployment_fails_validation(break_it):
    good = _deployment()
    validate_k8s(good)
    bad = copy.deepcopy(good)
    break_it(bad["spec"]["template"]["spec"]["containers"][0])
    with pytest.raises(DeployError, match="Deployment/crema: spec.template.spec.containers"):
        validate_k8s(bad)


BROKEN_ISVCS = {
    "probe port a list": lambda p: p["model"]["readinessProbe"]["httpGet"].__setitem__("port", [8080]),
    "modelFormat a string": lambda p: p["model"].__setitem__("modelFormat", "triton"),
    "modelFormat without a name": lambda p: p["model"]["modelFormat"].pop("name"),
    "unknown field": lambda p: p.__setitem__("modle", p.pop("model")),
    "minReplicas a string": lambda p: p.__setitem__("minReplicas", "1"),
}


@pytest.mark.parametrize("break_it", BROKEN_ISVCS.values(), ids=BROKEN_ISVCS.keys())
def test_a_broken_inference_service_fails_validation(break_it):
    good = deploy.inference_service(["crema"], gpu=False)
    validate_isvc(good)
    bad = copy.deepcopy(good)
    break_it(bad["spec"]["predictor"])
    with pytest.raises(DeployError, match="InferenceService/crema: spec.predictor.*KServe CRD schema"):
        validate_isvc(bad)
    bad = copy.deepcopy(good)
    bad["metadata"]["labels"] = ["not", "a", "map"]  # metadata: Kubernetes' ObjectMeta
    with pytest.raises(DeployError, match="metadata.labels"):
        validate_isvc(bad)


def test_flavour_and_repository_errors_are_one_line(repos, tmp_path):
    with pytest.raises(DeployError, match="native-flavour repository needs the GPU image: add --gpu"):
        render(repos["native"], tmp_path / "a", gpu=False)
    with pytest.raises(DeployError, match="python-flavour repository.*--flavour native"):
        render(repos["python"], tmp_path / "b", gpu=True)
    on_gpu = repos["root"] / "repo-gpu"
    shutil.copytree(repos["python"], on_gpu)
    (on_gpu / "crema.json").write_text((on_gpu / "crema.json").read_text().replace('"device": "cpu"', '"device": "gpu"'))
    for gpu in (False, True):
        with pytest.raises(DeployError, match="python-flavour --device gpu repository: neither image"):
            render(on_gpu, tmp_path / "e", gpu=gpu)
    parser = argparse.ArgumentParser()
    deploy.add_deploy(parser.add_subparsers())
    for repo, message in ((tmp_path / "missing", "no such directory"), (repos["root"] / "art", "not a model "
                                                                        "repository written by `crema triton-repo`")):
        args = parser.parse_args(["deploy", "--repo", str(repo), "--out", str(tmp_path / "c")])
        with pytest.raises(ValueError, match=message) as e:  # crema's main prints it as `error: ...`, exit 2
            args.func(args)
        assert "\n" not in str(e.value)
    broken = tmp_path / "broken"
    shutil.copytree(repos["python"], broken)
    (broken / "vision" / "config.pbtxt").write_text("name: 'vision' max_batch_size: lots")
    with pytest.raises(DeployError, match="invalid repository: .*vision/config.pbtxt: not a valid Triton"):
        render(broken, tmp_path / "d", gpu=False)
    assert not any((tmp_path / x).exists() for x in "abcde")  # nothing written on an error


def test_cli_writes_and_reports(repos, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    deploy.add_deploy(parser.add_subparsers())
    args = parser.parse_args(["deploy", "--repo", str(repos["native"]), "--out", str(tmp_path / "o"), "--gpu"])
    args.func(args)
    assert f"validated against Kubernetes {deploy.K8S_VERSION}" in capsys.readouterr().out
    assert (tmp_path / "o" / "inferenceservice.yaml").read_text().startswith("# written by `crema deploy")


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_pin_their_base_copy_every_package_and_run_as_non_root(name):
    """Static checks only (no Docker engine here): a pinned base, every package of pyproject.toml
    copied, the server started as uid 1000."""
    import re
    import tomllib

    text = (deploy.DEPLOY / name).read_text()
    lines = [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    (base,) = [w[1] for w in lines if w[0] == "FROM"]
    args = dict(w[1].split("=", 1) for w in lines if w[0] == "ARG" and "=" in w[1])
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert base == ("python:3.11-slim-bookworm" if name.endswith("cpu") else "nvcr.io/nvidia/tritonserver:24.10-py3")
    packages = tomllib.loads((deploy.DEPLOY.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    copied = {w[1] for w in lines if w[0] == "COPY"}
    assert {p.rstrip("*") for p in packages["find"]["include"]} | {"pyproject.toml"} <= copied
    users = [w[1] for w in lines if w[0] == "USER"]
    assert users == ["1000:1000"] and lines[-2][0] == "ENTRYPOINT" and '["crema"]' in text
    assert [i for i, w in enumerate(lines) if w[0] == "USER"][0] > max(i for i, w in enumerate(lines) if w[0] == "RUN")
