"""export/optimize.py: every ViT / Q-Former / T5-encoder attention block becomes one com.microsoft
MultiHeadAttention node, and the fused graphs stay within DESIGN §5 of the reference (per stage, and
identical tokens end to end); graphs it does not handle are left as they were."""
import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import make_model
from export.onnx_export import export_artifacts, export_stage
from export.optimize import fuse_attention, optimize_attention
from export.parity import DEEP_BOUND, STAGE_BOUND, compare, parity_report
from export.stages import stage_module
from runtime.artifacts import MANIFEST, hash_files
from runtime.specs import stage_specs

STAGES = ("vision", "mmqa_rgb", "fuse_encode", "decoder_first", "decoder_step")
# Sizes of the symbolic axes at run time, all different from the export's trace sizes.
RUN_DIMS = {"images": 3, "rows": 3, "batch": 3, "text": 5, "enc_len": 11, "past": 4, "past_rows": 3, "clips": 2}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """The tiny rgb model, its unfused graphs and their fused copies (with the fusion counts)."""
    model = make_model(("rgb",))
    specs = stage_specs(model.cfg.to_dict())
    folder = tmp_path_factory.mktemp("attention")
    counts = {}
    for name in STAGES:
        export_stage(model, specs[name], folder / f"{name}.onnx")
        counts[name] = optimize_attention(folder / f"{name}.onnx", folder / f"{name}.fused.onnx")
    return model, specs, folder, counts


def _inputs(spec, cfg, seed=5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in spec.inputs:
        shape = tuple(RUN_DIMS[d] if isinstance(d, str) else d for d in t.dims)
        if t.name.endswith("_mask"):
            x = torch.ones(shape, dtype=torch.long)
            x[-1, -3:] = 0  # a padded request
        elif t.name.endswith("_ids"):
            x = torch.randint(2, cfg.t5.vocab_size, shape, generator=g)
        elif t.name == "beam_index":
            x = torch.randint(0, RUN_DIMS["past_rows"], shape, generator=g)
        else:
            x = torch.randn(shape, generator=g)
        out.append(x)
    return out


def _run(path, spec, inputs):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)})


def _ops(path):
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_every_encoder_attention_is_fused(graphs):
    model, _, folder, counts = graphs
    cfg = model.cfg
    cross = len(range(0, cfg.qformer.num_layers, cfg.qformer.cross_attention_freq))
    expected = {"vision": (cfg.vision.num_layers, cfg.vision.num_heads, "packed"),
                "mmqa_rgb": (cfg.qformer.num_layers + cross, cfg.qformer.num_heads, "separate"),
                "fuse_encode": (cfg.t5.num_layers, cfg.t5.num_heads, "separate")}
    for name, (blocks, heads, kind) in expected.items():
        assert counts[name] == {"softmax": blocks, "fused": blocks, "unmatched": 0, "kinds": {kind: blocks}}, name
        fused = onnx.load(str(folder / f"{name}.fused.onnx"))
        mha = [n for n in fused.graph.node if n.op_type == "MultiHeadAttention"]
        assert len(mha) == blocks and all(n.domain == "com.microsoft" for n in mha)
        assert {a.i for n in mha for a in n.attribute if a.name == "num_heads"} == {heads}
        assert "Softmax" not in _ops(folder / f"{name}.fused.onnx")
    scales = {a.f for n in onnx.load(str(folder / "fuse_encode.fused.onnx")).graph.node
              for a in n.attribute if a.name == "scale"}
    assert scales == {1.0}  # T5 does not scale q k^T


def test_decoder_graphs_are_left_as_exported(graphs):
    """The decoder's KV-cache attention (query rows grouped per request) is not a pattern it handles."""
    model, _, folder, counts = graphs
    layers = model.cfg.t5.num_decoder_layers
    for name in ("decoder_first", "decoder_step"):
        assert counts[name] == {"softmax": 2 * layers, "fused": 0, "unmatched": 2 * layers, "kinds": {}}
        assert _ops(folder / f"{name}.fused.onnx") == _ops(folder / f"{name}.onnx")


@pytest.mark.parametrize("name", ["vision", "mmqa_rgb", "fuse_encode"])
def test_fused_stage_matches_reference(graphs, name):
    """Per stage: fused graph vs the PyTorch module within DESIGN §5, and vs the unfused graph."""
    model, specs, folder, _ = graphs
    spec = specs[name]
    inputs = _inputs(spec, model.cfg)
    with torch.no_grad():
        ref = stage_module(model, name).eval()(*inputs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    fused = _run(folder / f"{name}.fused.onnx", spec, inputs)
    unfused = _run(folder / f"{name}.onnx", spec, inputs)
    bound = DEEP_BOUND if name == "fuse_encode" else STAGE_BOUND
    for got, plain, want in zip(fused, unfused, ref):
        if not want.is_floating_point():
            assert np.array_equal(got, want.numpy())
            continue
        assert compare(got, want)["max_rel_err"] <= bound
        assert compare(got, torch.from_numpy(plain))["max_rel_err"] <= 1e-5


def test_graph_with_external_weights(graphs, tmp_path):
    """Weights in a .data file: fused in place beside it; writing it elsewhere is refused."""
    model, specs, folder, _ = graphs
    graph = onnx.load(str(folder / "vision.onnx"))
    onnx.save(graph, str(tmp_path / "vision.onnx"), save_as_external_data=True, location="vision.onnx.data",
              size_threshold=0)
    other = tmp_path / "elsewhere"
    other.mkdir()
    with pytest.raises(ValueError, match="external file"):
        optimize_attention(tmp_path / "vision.onnx", other / "vision.onnx")
    assert optimize_attention(tmp_path / "vision.onnx")["fused"] == model.cfg.vision.num_layers
    inputs = _inputs(specs["vision"], model.cfg)
    got = _run(tmp_path / "vision.onnx", specs["vision"], inputs)[0]
    want = _run(folder / "vision.onnx", specs["vision"], inputs)[0]
    assert compare(got, torch.from_numpy(want))["max_rel_err"] <= 1e-5


def test_fuse_attention_in_memory_leaves_unmatched_graph_alone():
    """A Softmax outside an attention block is not touched (and no com.microsoft import is added)."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    model = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Softmax", ["x"], ["y"])], "g", [x], [y]))
    assert fuse_attention(model) == {"softmax": 1, "fused": 0, "unmatched": 1, "kinds": {}}
    assert [n.op_type for n in model.graph.node] == ["Softmax"]
    assert all(o.domain != "com.microsoft" for o in model.opset_import)


@pytest.mark.parametrize("modalities, task, downstream", [
    (("rgb",), "concat", "oeqa"),
    (("rgb", "depth", "audio"), "espresso_concat", "mcqa"),
])
def test_fused_artifacts_keep_parity_end_to_end(tmp_path, modalities, task, downstream):
    """An artifact directory whose encoder graphs are fused: every stage within DESIGN §5 and the
    same tokens as the reference, greedy and beam (the manifest is rehashed after the rewrite)."""
    model = make_model(modalities, task=task, downstream_task=downstream)
    out = export_artifacts(model, tmp_path / "a", {"preset": "tiny", "seed": 0}, progress=False)
    fused = {}
    for spec in stage_specs(model.cfg.to_dict()).values():
        if spec.name == "vision" or spec.name.startswith("mmqa_") or spec.name == "fuse_encode":
            fused[spec.name] = optimize_attention(out / spec.file)["fused"]
    assert all(fused.values()), fused
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"] = hash_files(out)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    report = parity_report(out)
    for name, row in report["stages"].items():
        assert row["ok"], f"{name}: {row}"
    assert all(r["identical"] for r in report["end_to_end"]), report["end_to_end"]
    assert report["ok"]
