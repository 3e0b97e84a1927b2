"""CREMA's checkpoints as CREMA loads them, its task names, and its inference precision.

Facts from Yui010206/CREMA at HEAD:
  * lavis/models/crema_models/crema.py:853-854 `model.load_checkpoint_from_config(cfg)` (the yaml's
    `model.finetuned`, e.g. crema_pretrained.pth) then `model.load_mmqa(mmqa_ckpt)` (the fine-tuned file),
    each `load_state_dict(state_dict, strict=False)` (base_model.py:51, blip2.py:428): later files win.
  * lavis/runners/runner_base.py:576-581 deletes "parameters that do not require gradient" before
    `torch.save({"model": state_dict, "optimizer": ..., "config": ..., "scaler": ..., "epoch": ...})`:
    a fine-tuned file holds the trainable tensors (and buffers) only.
  * crema.py:114 `param.data = param.data.bfloat16()` (T5), l.435/448 encoders under
    `torch.cuda.amp.autocast(enabled=...)` (fp16), l.700 `torch.cuda.amp.autocast(dtype=torch.bfloat16)` (T5).
"""
import copy

import pytest
import torch
from test_weights import _crema_options, _write_blip2_dir

from conftest import make_inputs, make_model, tiny
from reference import weights
from reference.config import ConfigError
from reference.model import crema_precision
from reference.weights import CheckpointError

MODALITIES = ("rgb", "depth", "audio", "pc")


@pytest.fixture(scope="module")
def model():
    return make_model(MODALITIES, task="espresso_concat", seed=3)


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("crema_ckpts")
    _write_blip2_dir(model, root / "blip2")
    beats = {k[len("audio_encoder.model."):]: v for k, v in model.state_dict().items()
             if k.startswith("audio_encoder.")}
    torch.save({"cfg": {"encoder_layers": model.cfg.audio.encoder_layers}, "model": beats}, root / "beats.pt")
    pretrained, finetuned = weights.write_crema_checkpoint_pair(model, root)
    return {"root": root, "blip2": root / "blip2", "beats": root / "beats.pt", "pre": pretrained, "ft": finetuned}


def _load(model, files, ckpts, **kw):
    return weights.load_pretrained(files["blip2"], ckpts, files["beats"], **_crema_options(model.cfg), **kw)


def _differing(a, b) -> set[str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return {k for k in sa if not torch.equal(sa[k], sb[k])}


def test_pair_is_lavis_format_and_weights_only(model, files):
    for path in (files["pre"], files["ft"]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code needed
        assert isinstance(ckpt["model"], dict)
    pre = torch.load(files["pre"], weights_only=True)["model"]
    ft = torch.load(files["ft"], weights_only=True)
    assert {"optimizer", "config", "scaler", "epoch"} <= ft.keys()  # runner_base.py:582-588
    # official LAVIS names (blip2.py:163-164 LoRA surgery; crema.py:139-196)
    assert "Qformer.bert.encoder.layer.0.attention.self.query.w_a_rgb.weight" in ft["model"]
    assert "Qformer.bert.encoder.layer.0.attention.self.query.w.weight" in pre
    assert {"query_tokens_pc", "t5_proj_audio.weight", "ln_depth.bias", "projection_audio.weight",
            "fusion.0.weight"} <= ft["model"].keys()
    assert {"ln_vision.weight", "t5_proj.weight", "query_tokens", "ln_pc.weight", "rgb_gradsel_embed"} <= pre.keys()
    # the fine-tuned file holds CREMA's trainable tensors only (+ what the model ignores)
    frozen = [k for k in weights.lavis_to_ours(ft["model"])
              if not weights.is_crema_trainable(k) and weights._unused_reason(k) is None]
    assert frozen == []
    assert not any(k.startswith(("Qformer.bert.encoder.layer.0.attention.self.query.w.", "t5_model.",
                                 "visual_encoder.")) for k in ft["model"])


def test_overlay_loads_the_source_model_exactly(model, files):
    loaded, report = _load(model, files, [files["pre"], files["ft"]])
    assert _differing(loaded, model) == set()
    inputs = make_inputs(model.cfg)
    dec = torch.tensor([[0, 4, 7]] * len(inputs.questions))
    assert torch.equal(loaded(inputs, dec), model(inputs, dec))

    # leftovers CREMA's files carry: ignored, each with its reason
    for key, word in [("ln_vision.weight", "ln_vision"), ("ln_vision.bias", "ln_vision"),
                      ("t5_proj.weight", "t5_proj_{modality}"), ("t5_proj.bias", "t5_proj_{modality}"),
                      ("query_tokens", "query_tokens_{modality}"), ("rgb_gradsel_embed", "gradient-selection"),
                      ("ln_pc.weight", "ln_pc"), ("Qformer.bert.embeddings.position_ids", "Q-Former text"),
                      ("vision_model.post_layernorm.weight", "ln_vision")]:
        assert word in report.ignored[key], key
    # every tensor is accounted to the source it came from; the fine-tuned file supplies all trainables
    trainable = [k for k in model.state_dict() if weights.is_crema_trainable(k)]
    assert report.sources[str(files["ft"])] == len(trainable)
    assert report.sources[str(files["pre"])] == sum(1 for k in model.state_dict() if k.startswith("qformer.")
                                                    and not weights.is_crema_trainable(k))
    assert set(report.sources) == {str(files[k]) for k in ("blip2", "beats", "pre", "ft")}
    assert sum(report.sources.values()) == report.loaded
    assert str(files["ft"]) in report.summary() and "ignored" in report.summary()


def test_overlay_order_matters(model, files):
    reverse, _ = _load(model, files, [files["ft"], files["pre"]])
    pre_only, _ = _load(model, files, files["pre"])  # a single path, as before
    trainable = {k for k in model.state_dict() if weights.is_crema_trainable(k)}
    # the pretrained (perturbed) trainables win when loaded last; the Q-Former base is the same in both
    assert _differing(reverse, model) == trainable
    assert _differing(pre_only, model) == trainable
    assert _differing(reverse, pre_only) == set()


def test_finetuned_alone_takes_frozen_weights_from_blip2_dir(model, files, tmp_path):
    loaded, report = _load(model, files, files["ft"])
    assert _differing(loaded, model) == set()
    assert str(files["pre"]) not in report.sources
    # strict after merging: what no source gives is still refused
    ft = torch.load(files["ft"], weights_only=True)
    partial = {k: v for k, v in ft["model"].items() if not k.startswith("fusion.")}
    torch.save({"model": partial}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"2 model weights missing.*fusion\.0\.bias, fusion\.0\.weight"):
        _load(model, files, tmp_path / "partial.pth")
    # ... but an earlier file may supply it
    loaded, _ = _load(model, files, [files["pre"], tmp_path / "partial.pth"])
    assert {k for k in _differing(loaded, model)} == {"fusion.0.weight", "fusion.0.bias"}


def test_shape_disagreements_name_tensor_shapes_and_file(model, files, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"t5_proj_rgb.weight": torch.zeros(3, 3)}}, bad)
    with pytest.raises(CheckpointError) as e:  # two files disagree
        _load(model, files, [files["pre"], bad])
    msg = str(e.value)
    assert msg.startswith("t5_proj_rgb.weight: shape (64, 32) in ") and str(files["pre"]) in msg
    assert f"(3, 3) in {bad}" in msg and "model: (64, 32)" in msg

    lora = "Qformer.bert.encoder.layer.1.attention.self.value.w_b_depth.weight"
    torch.save({"model": {lora: torch.zeros(32, 5)}}, bad)
    with pytest.raises(CheckpointError) as e:  # a file disagrees with the model
        _load(model, files, bad)
    msg = str(e.value)
    assert "qformer.encoder.layer.1.attention.attention.value.w_b_depth.weight: checkpoint (32, 5), model (32, 4)" in msg
    assert f"in {bad}, LAVIS key '{lora}'" in msg

    # a key the model ignores may differ between files (gradsel width follows the training LoRA rank)
    torch.save({"model": {"rgb_gradsel_embed": torch.zeros(1, 3)}}, bad)
    loaded, report = _load(model, files, [files["pre"], bad, files["ft"]])
    assert "rgb_gradsel_embed" in report.ignored and _differing(loaded, model) == set()


@pytest.mark.parametrize("name, task", [
    ("espresso-concat-seq", "espresso_concat"),             # run_scripts/crema/finetune/*.sh
    ("espresso-concat-seq-gradsel-es", "espresso_concat"),  # run_scripts/crema/finetune/*.sh (early exit)
    ("espresso-concat-seq-gradsel-pred-es", "espresso_concat"),  # base_task.py:345
    ("espresso-concat", "espresso_concat"), ("espresso-seq", "espresso"), ("espresso", "espresso"),
    ("train", "concat"), ("train_discriminator", "concat"), ("concate", "concat"),  # yamls, crema.py:57/823
    ("concat", "concat"), ("espresso_concat", "espresso_concat"),  # ours
])
def test_task_aliases(name, task):
    assert weights.task_options(name) == {"task": task}
    assert tiny(("rgb", "depth"), **weights.task_options(name)).task == task


@pytest.mark.parametrize("name", ["espreso", "concat-espresso", "espresso-es-seq", ""])
def test_unknown_task_lists_known_names(name):
    with pytest.raises(ConfigError, match=r"unknown task .*espresso_concat.*train_discriminator.*espresso-concat-seq"):
        weights.task_options(name)


def test_crema_precision_on_cpu_is_close_to_fp32_but_not_equal():
    """Measured on the tiny preset (rgb+audio, seeds 0-3): encoders rel. error 0.5-0.9 %,
    cosine >= 0.99998; logits max |diff| 4-10 % of max |logit|, cosine >= 0.9986 (bf16 T5)."""
    ref = make_model(("rgb", "audio"), seed=0)
    model = crema_precision(copy.deepcopy(ref), "cpu")
    assert {p.dtype for p in model.language_model.parameters()} == {torch.bfloat16}  # crema.py:114
    assert {p.dtype for n, p in model.named_parameters() if not n.startswith("language_model.")} == {torch.float32}
    inputs = make_inputs(ref.cfg, seed=1)
    cos = torch.nn.functional.cosine_similarity

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    pixels = inputs.frames["rgb"].flatten(0, 1)
    with torch.no_grad():
        for name, x in (("vision_features", pixels), ("audio_features", inputs.audio.flatten(0, 1))):
            want, got = getattr(ref, name)(x), getattr(model, name)(x)
            assert got.dtype == torch.float32, name  # leaves autocast in fp32, as CREMA's LayerNorm output
            assert 1e-4 < rel(got, want) < 0.03, name  # autocast ran (differs), and stayed close
            assert cos(got.flatten(), want.flatten(), dim=0) > 0.9995, name
        feats = ref.vision_features(pixels)
        assert torch.equal(model.mmqa("rgb", feats), ref.mmqa("rgb", feats))  # Q-Former: fp32, no autocast

    dec = torch.tensor([[0, 4, 7, 9]] * len(inputs.questions))
    want, got = ref(inputs, dec), model(inputs, dec).float()
    assert 1e-3 < rel(got, want) < 0.25
    assert cos(got.flatten(), want.flatten(), dim=0) > 0.995
    answers = model.generate(inputs)  # beam search runs in bf16 too
    assert len(answers) == len(inputs.questions) and all(a.token_ids for a in answers)
