"""Regenerate inferenceservice-v1beta1.json from KServe's CRD (README.md beside this file says which):

    python deploy/kserve/schema/trim_crd.py serving.kserve.io_inferenceservices.yaml

Keeps the v1beta1 openAPIV3Schema as KServe generated it, minus the subtrees our manifest never
uses (README.md lists them); every kept node is copied unchanged."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

DROP_SPEC = ("explainer", "transformer", "canary")
DROP_PREDICTOR = ("huggingface", "lightgbm", "onnx", "paddle", "pmml", "pytorch", "sklearn", "tensorflow", "xgboost",
                  "workerSpec")


def trim(crd: dict) -> dict:
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    schema = version["schema"]["openAPIV3Schema"]
    schema["properties"].pop("status")
    spec = schema["properties"]["spec"]["properties"]
    for name in DROP_SPEC:
        spec.pop(name)
    for name in DROP_PREDICTOR:
        spec["predictor"]["properties"].pop(name)
    return schema


if __name__ == "__main__":
    schema = trim(yaml.safe_load(Path(sys.argv[1]).read_text()))
    out = Path(__file__).with_name("inferenceservice-v1beta1.json")
    out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)")
