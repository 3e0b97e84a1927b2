"""transformers' Blip2/T5 modules as the reference wires them == CREMA's math written out directly."""
import torch

import crema_math
from conftest import make_inputs, make_model


def assert_close_rel(a, b, rtol=1e-5):
    err = (a - b).abs().max() / b.abs().max()
    assert err < rtol, f"max error {err:.2e} relative to max {b.abs().max():.3g}"


def test_vision_encoder_is_eva_vit():
    model = make_model(("rgb", "depth"))
    pixels = make_inputs(model.cfg).frames["rgb"].flatten(0, 1)
    assert_close_rel(model.vision_features(pixels), crema_math.vit(model.state_dict(), model.cfg, pixels))


def test_qformer_with_lora_per_modality_and_skip():
    model = make_model(("rgb", "depth-skip", "pc"))
    sd, cfg = model.state_dict(), model.cfg
    feats = torch.randn(3, cfg.vision.num_tokens, cfg.feature_dim)
    outs = {}
    for m, skip in (("rgb", False), ("depth", True), ("pc", False)):
        outs[m] = model.mmqa(m, feats)
        assert_close_rel(outs[m], crema_math.qformer(sd, cfg, m, feats, skip=skip))
    # the adapter is live: the same features through rgb's LoRA and without it differ
    assert (crema_math.qformer(sd, cfg, "rgb", feats, skip=True) - outs["rgb"]).abs().max() > 1e-3


def test_t5_is_flan_t5_with_exact_gelu():
    model = make_model()
    cfg = model.cfg
    embeds, mask = model.encode_inputs(make_inputs(cfg, batch=3))
    assert mask.min() == 0, "ragged questions must produce padding"
    dec = torch.tensor([[0, 5, 9, 17], [0, 3, 3, 8], [0, 40, 2, 1]])
    logits = model.language_model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec).logits
    assert_close_rel(logits, crema_math.t5_logits(model.state_dict(), cfg, embeds, mask, dec))
    assert model.language_model.config.dense_act_fn == "gelu"


def test_beats_alpha_trick_equals_plain_softmax():
    model = make_model(("audio",))
    fbank = torch.randn(2, model.cfg.audio.clip_frames, model.cfg.audio.num_mel_bins)
    assert_close_rel(model.audio_encoder(fbank), crema_math.beats(model.state_dict(), model.cfg, fbank))
