"""Checkpoint formats: LAVIS key round trip, HF BLIP-2 dir + CREMA .pth, BEATs, strictness, safety."""
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_inputs, make_model
from reference import weights
from reference.weights import CheckpointError

MODALITIES = ("rgb", "depth", "audio")


@pytest.fixture(scope="module")
def model():
    return make_model(MODALITIES, task="espresso", seed=3)


def _answers(model, inputs):
    return [a.token_ids for a in model.generate(inputs)]


def _logits(model, inputs):
    return model(inputs, torch.tensor([[0, 4, 7]] * len(inputs.questions)))


def test_lavis_keys_round_trip(model, tmp_path):
    lavis = weights.ours_to_lavis(model.state_dict())
    assert "Qformer.bert.encoder.layer.0.attention.self.query.w_a_rgb.weight" in lavis
    assert "Qformer.bert.encoder.layer.0.attention.self.query.w.weight" in lavis
    assert "visual_encoder.blocks.0.attn.q_bias" in lavis and "t5_model.lm_head.weight" in lavis
    assert "query_tokens_depth" in lavis and "fusion.0.weight" in lavis
    lavis["rgb_gradsel_embed"] = torch.zeros(1, 10)  # a key CREMA saves but does not use
    path = tmp_path / "crema.pth"
    torch.save({"model": lavis}, path)

    fresh = make_model(MODALITIES, task="espresso", seed=99)
    inputs = make_inputs(model.cfg)
    assert not torch.equal(_logits(fresh, inputs), _logits(model, inputs))
    report = weights.load_state(fresh, weights.lavis_to_ours(weights.read_lavis_checkpoint(path)))
    assert "rgb_gradsel_embed" in report.ignored
    assert torch.equal(_logits(fresh, inputs), _logits(model, inputs))
    assert _answers(fresh, inputs) == _answers(model, inputs)


def _write_blip2_dir(model, directory):
    """What a HF BLIP-2 FlanT5 directory holds: frozen parts under HF names, config, tokenizer."""
    cfg = model.cfg
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if k.startswith(("vision_model.", "qformer.", "language_model."))
             and ".w_a_" not in k and ".w_b_" not in k and "embed_tokens" not in k}
    state["vision_model.post_layernorm.weight"] = torch.ones(cfg.feature_dim)
    state["query_tokens"] = torch.zeros(1, cfg.num_query_token, cfg.qformer.hidden_size)
    state["language_projection.weight"] = torch.zeros(cfg.t5.d_model, cfg.qformer.hidden_size)
    directory.mkdir()
    save_file(state, str(directory / "model.safetensors"))
    v, q, t = cfg.vision, cfg.qformer, cfg.t5
    (directory / "config.json").write_text(json.dumps({
        "num_query_tokens": cfg.num_query_token,
        "vision_config": {"hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers,
                          "num_attention_heads": v.num_heads, "intermediate_size": v.mlp_dim,
                          "image_size": v.image_size, "patch_size": v.patch_size},
        "qformer_config": {"hidden_size": q.hidden_size, "num_hidden_layers": q.num_layers,
                           "num_attention_heads": q.num_heads, "intermediate_size": q.intermediate_size},
        "text_config": {"d_model": t.d_model, "d_kv": t.d_kv, "d_ff": t.d_ff, "num_layers": t.num_layers,
                        "num_heads": t.num_heads, "vocab_size": t.vocab_size,
                        "relative_attention_num_buckets": t.relative_attention_num_buckets,
                        "relative_attention_max_distance": t.relative_attention_max_distance}}))
    model.tokenizer.save(directory)


def _crema_options(cfg):
    return dict(modalities=cfg.modalities, task=cfg.task, frame_num=cfg.frame_num, lora_rank=cfg.lora_rank,
                audio=cfg.audio, generation=cfg.generation, max_txt_len=cfg.max_txt_len, pc_grid=cfg.pc_grid)


def test_blip2_dir_plus_crema_and_beats_checkpoints(model, tmp_path):
    _write_blip2_dir(model, tmp_path / "blip2")
    sd = model.state_dict()
    trainable = {k: v for k, v in sd.items()
                 if not k.startswith(("vision_model.", "qformer.", "language_model.", "audio_encoder."))
                 or ".w_a_" in k or ".w_b_" in k}
    torch.save({"model": weights.ours_to_lavis(trainable)}, tmp_path / "crema.pth")
    beats = {k[len("audio_encoder.model."):]: v for k, v in sd.items() if k.startswith("audio_encoder.")}
    torch.save({"cfg": {"encoder_layers": model.cfg.audio.encoder_layers, "deep_norm": True}, "model": beats},
               tmp_path / "beats.pt")

    loaded, report = weights.load_pretrained(tmp_path / "blip2", tmp_path / "crema.pth", tmp_path / "beats.pt",
                                             **_crema_options(model.cfg))
    reasons = set(report.ignored.values())
    assert any("ln_vision" in r for r in reasons) and any("query_tokens_" in r for r in reasons)
    inputs = make_inputs(model.cfg)
    assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))

    with pytest.raises(CheckpointError, match="BEATs checkpoint"):
        weights.load_pretrained(tmp_path / "blip2", tmp_path / "crema.pth", **_crema_options(model.cfg))
    wrong = {"cfg": {"encoder_layers": 7}, "model": beats}
    torch.save(wrong, tmp_path / "beats7.pt")
    with pytest.raises(CheckpointError, match="encoder_layers: checkpoint 7"):
        weights.load_pretrained(tmp_path / "blip2", tmp_path / "crema.pth", tmp_path / "beats7.pt",
                                **_crema_options(model.cfg))


def test_strict_load_refuses_partial_and_mismatched(model):
    state = dict(model.state_dict())
    fresh = make_model(MODALITIES, task="espresso", seed=5)
    missing = {k: v for k, v in state.items() if "lm_head" not in k}
    with pytest.raises(CheckpointError, match=r"1 model weights missing.*language_model.lm_head.weight"):
        weights.load_state(fresh, missing)
    with pytest.raises(CheckpointError, match="checkpoint keys the model does not have: bogus.weight"):
        weights.load_state(fresh, {**state, "bogus.weight": torch.zeros(1)})
    bad = {**state, "t5_proj_rgb.weight": torch.zeros(3, 3)}
    with pytest.raises(CheckpointError, match=r"t5_proj_rgb.weight: checkpoint \(3, 3\)"):
        weights.load_state(fresh, bad)
    # a modality present in the checkpoint but not configured is ignored, and reported
    rgb_only = make_model(("rgb",), seed=5)
    subset = {k: v for k, v in state.items() if "audio" not in k and "depth" not in k and not k.startswith("fusion")}
    subset["t5_proj_flow.weight"] = torch.zeros(1)
    report = weights.load_state(rgb_only, subset)
    assert "modality 'flow'" in report.ignored["t5_proj_flow.weight"]


def test_checkpoint_directory_round_trip(model, tmp_path):
    weights.save_checkpoint(model, tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"model.safetensors", "config.json", "tokenizer.json"}
    loaded = weights.load_checkpoint(tmp_path / "ckpt")
    inputs = make_inputs(model.cfg)
    assert _answers(loaded, inputs) == _answers(model, inputs)
    with pytest.raises(CheckpointError, match="missing config.json"):
        weights.load_checkpoint(tmp_path)


class _Exploit:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_not_executed(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Exploit()}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        weights.read_lavis_checkpoint(path)
    assert "pickled code ran" not in capsys.readouterr().out
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError):
        weights.read_lavis_checkpoint(tmp_path / "empty.pth")
