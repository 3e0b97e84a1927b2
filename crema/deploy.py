"""`crema deploy`: the Helm chart (deploy/helm/crema) and the KServe InferenceService
(deploy/kserve/inferenceservice.yaml) rendered for one model repository, and validated offline.

    crema deploy --repo repo/ --out deploy-out/ [--gpu]
      values.yaml                      the chart values it rendered with (gpu, the repository's models)
      crema.yaml                       the rendered chart (`helm template`): Deployment, Service, HPA, adapter rule
      prometheus-adapter-values.yaml   the HPA metric's rule as values of the prometheus-adapter chart
      inferenceservice.yaml            the KServe InferenceService (set its storageUri)

Rendering is Helm's own template engine (Helm 4's Go SDK in the helm-python-sdk wheel, called through
ctypes; no helm binary, no network). Every rendered object is validated against Kubernetes
K8S_VERSION's OpenAPI schemas in strict mode (unknown fields refused), bundled in kubernetes-validate;
the InferenceService against KServe's CRD schema vendored in deploy/kserve/schema/ (README there),
with unknown fields refused as `kubectl apply` (server-side field validation: Strict) refuses them.
The chart lives in the source tree, not in the wheel: run from a checkout or pass --chart.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from runtime.artifacts import ArtifactError

# yaml, helm_python, kubernetes_validate and jsonschema load inside the functions: crema/cli.py imports
# this module for add_deploy, and the serving install has none of them (the `deploy` extra does).

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
CHART = DEPLOY / "helm" / "crema"
ISVC = DEPLOY / "kserve" / "inferenceservice.yaml"
ISVC_SCHEMA = DEPLOY / "kserve" / "schema" / "inferenceservice-v1beta1.json"
K8S_VERSION = "1.33.0"  # the Kubernetes release whose schemas the objects are checked against
RELEASE = "crema"
TRITONSERVER = "/opt/tritonserver/bin/tritonserver"  # in the GPU image (NVIDIA's container)


class DeployError(ValueError):
    """A repository, chart or rendered object that cannot be deployed; the message says why."""


def repository_models(repo: Path, gpu: bool) -> list[str]:
    """The repository's model names (its config.pbtxt files, parsed), after checking that the image
    `gpu` chooses can serve its flavour."""
    from triton_models.layout import ENSEMBLE, MODEL_INFO
    try:
        from triton_models.repository import validate
    except ImportError:  # tritonclient's ModelConfig protobuf parses the configs
        raise DeployError("reading a repository needs the `triton` extra: pip install 'crema-runtime[triton]'") from None

    if not repo.is_dir():
        raise DeployError(f"{repo}: no such directory (write a repository with `crema triton-repo`)")
    if not (repo / ENSEMBLE / "config.pbtxt").is_file() or not (repo / MODEL_INFO).is_file():
        raise DeployError(f"{repo}: not a model repository written by `crema triton-repo`")
    try:
        models = sorted(validate(repo))
        info = json.loads((repo / MODEL_INFO).read_text())
    except (ArtifactError, ValueError) as e:
        raise DeployError(f"{repo}: invalid repository: {e}") from None
    flavour, device = info.get("flavour"), info.get("device", "cpu")
    if flavour == "python" and device != "cpu":
        raise DeployError(f"{repo}: a python-flavour --device gpu repository: neither image has onnxruntime-gpu; "
                          "generate it with --device cpu, or with --flavour native for --gpu")
    if gpu and flavour != "native":
        raise DeployError(f"{repo}: a {flavour}-flavour repository; the GPU image (NVIDIA's Triton) serves the "
                          "native flavour: `crema triton-repo --flavour native`")
    if not gpu and flavour != "python":
        raise DeployError(f"{repo}: a {flavour}-flavour repository needs the GPU image: add --gpu (the CPU "
                          "image's pip Triton serves the python flavour)")
    return models


def chart_values(models: list[str], gpu: bool) -> dict:
    return {"gpu": gpu, "models": models}


def render_chart(values: dict, chart: Path = CHART, namespace: str = "default") -> list[dict]:
    """`helm template`: the chart's objects, rendered by Helm's engine with `values` over its defaults."""
    try:
        import helm_python
    except ImportError:
        raise DeployError("rendering the chart needs helm-python-sdk: pip install 'crema-runtime[deploy]'") from None
    import yaml
    if not (chart / "Chart.yaml").is_file():
        raise DeployError(f"{chart}: no Helm chart there (the chart is in the source tree: deploy/helm/crema; "
                          "pass --chart)")
    try:
        with helm_python.Chart.load(chart) as c:
            manifests = c.render(values, name=RELEASE, namespace=namespace, is_install=True)
    except helm_python.HelmError as e:
        raise DeployError(f"{chart}: {e}") from None
    objects = []
    for name in sorted(manifests):
        if name.endswith(".yaml"):
            objects += [o for o in yaml.safe_load_all(manifests[name]) if o]
    return objects


def inference_service(models: list[str], gpu: bool, template: Path = ISVC) -> dict:
    """The InferenceService of deploy/kserve/ with the repository's models (and, for gpu, the GPU
    image, NVIDIA's tritonserver and one nvidia.com/gpu)."""
    import yaml

    isvc = yaml.safe_load(template.read_text())
    isvc["metadata"]["annotations"]["crema-models"] = ",".join(models)
    if gpu:
        model = isvc["spec"]["predictor"]["model"]
        model["image"] = model["image"].replace("crema-cpu", "crema-gpu")
        model["args"].append(f"--tritonserver={TRITONSERVER}")
        model["resources"].setdefault("limits", {})["nvidia.com/gpu"] = 1
    return isvc


# --- validation ----------------------------------------------------------------------------------

def _describe(obj: dict) -> str:
    return f"{obj.get('kind', '?')}/{(obj.get('metadata') or {}).get('name', '?')}"


def validate_k8s(obj: dict, version: str = K8S_VERSION) -> None:
    """A built-in Kubernetes object against `version`'s schemas, unknown fields refused."""
    try:
        import kubernetes_validate
    except ImportError:
        raise DeployError("validation needs kubernetes-validate: pip install 'crema-runtime[deploy]'") from None
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        raise DeployError(f"{_describe(obj)}: {where}: {e.message} (Kubernetes {e.version})") from None
    except kubernetes_validate.SchemaNotFoundError as e:
        raise DeployError(f"{_describe(obj)}: {e.message}") from None


def strict(schema):
    """A CRD's structural schema with unknown fields refused (additionalProperties: false on every
    object that lists its properties and does not preserve unknown fields), as the API server's
    strict field validation does."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


_ISVC_VALIDATOR = None


def validate_isvc(obj: dict) -> None:
    """An InferenceService against KServe's vendored CRD schema (strict), its metadata against
    Kubernetes' ObjectMeta (the CRD leaves metadata to the API server)."""
    global _ISVC_VALIDATOR
    import jsonschema

    if _ISVC_VALIDATOR is None:
        schema = strict(json.loads(ISVC_SCHEMA.read_text()))
        _ISVC_VALIDATOR = jsonschema.Draft7Validator(schema)  # the CRD's dialect: OpenAPI v3 ~ draft 4..7
    if obj.get("apiVersion") != "serving.kserve.io/v1beta1" or obj.get("kind") != "InferenceService":
        raise DeployError(f"{_describe(obj)}: not a serving.kserve.io/v1beta1 InferenceService")
    error = jsonschema.exceptions.best_match(_ISVC_VALIDATOR.iter_errors(obj))
    if error is not None:
        where = ".".join(str(p) for p in error.path)
        raise DeployError(f"{_describe(obj)}: {where}: {error.message} (KServe CRD schema)")
    validate_k8s({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})})


def validate_objects(objects: list[dict]) -> None:
    for obj in objects:
        (validate_isvc if obj.get("kind") == "InferenceService" else validate_k8s)(obj)


# --- render --------------------------------------------------------------------------------------

def adapter_values(objects: list[dict]) -> dict | None:
    """The rendered adapter-rule ConfigMap's rules, as values of the prometheus-adapter chart."""
    import yaml

    for obj in objects:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].endswith("-adapter-rule"):
            return {"rules": {"default": False, "custom": yaml.safe_load(obj["data"]["config.yaml"])["rules"]}}
    return None


def _dump(path: Path, docs: list, header: str) -> Path:
    import yaml

    class Dumper(yaml.SafeDumper):  # multi-line strings (the adapter rule's config.yaml) as literal blocks
        pass

    Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                                  style="|" if "\n" in s else None))
    body = yaml.dump_all(docs, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=1000)
    path.write_text(f"# {header}\n{body}")
    return path


def render(repo: Path, out: Path, gpu: bool, chart: Path = CHART) -> list[Path]:
    """Render and validate everything for `repo`; write it under `out`; the files written."""
    repo, out = Path(repo), Path(out)
    models = repository_models(repo, gpu)
    values = chart_values(models, gpu)
    objects = render_chart(values, chart)
    isvc = inference_service(models, gpu)
    validate_objects(objects + [copy.deepcopy(isvc)])
    out.mkdir(parents=True, exist_ok=True)
    source = f"written by `crema deploy --repo {repo}{' --gpu' if gpu else ''}`"
    paths = [_dump(out / "values.yaml", [values], f"{source}: helm install {RELEASE} deploy/helm/crema -f values.yaml"),
             _dump(out / "crema.yaml", objects, f"{source}: the chart rendered with values.yaml (helm template)")]
    adapter = adapter_values(objects)
    if adapter is not None:
        paths.append(_dump(out / "prometheus-adapter-values.yaml", [adapter],
                           f"{source}: helm install prometheus-adapter prometheus-community/prometheus-adapter "
                           "-f prometheus-adapter-values.yaml (set prometheus.url)"))
    paths.append(_dump(out / "inferenceservice.yaml", [isvc], f"{source}: KServe; set spec.predictor.model.storageUri"))
    return paths


# --- CLI -----------------------------------------------------------------------------------------

def add_deploy(sub) -> None:
    p = sub.add_parser("deploy", help="render the Helm chart and the KServe InferenceService for a model "
                                      "repository and validate them offline (docs/deploy.md)")
    p.add_argument("--repo", type=Path, required=True, help="a repository from `crema triton-repo`")
    p.add_argument("--out", type=Path, required=True, help="folder for values.yaml and the rendered manifests")
    p.add_argument("--gpu", action="store_true", help="the GPU image (NVIDIA's Triton; native-flavour repository) "
                                                      "and nvidia.com/gpu per pod")
    p.add_argument("--chart", type=Path, default=CHART, help="the crema Helm chart (default: deploy/helm/crema)")
    p.set_defaults(func=cmd_deploy)


def cmd_deploy(args) -> None:
    paths = render(args.repo, args.out, args.gpu, chart=args.chart)
    print(f"wrote {', '.join(str(p) for p in paths)}; validated against Kubernetes {K8S_VERSION} and KServe's "
          "InferenceService schema")
