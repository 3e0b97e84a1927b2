"""Reference CREMA on the tiny preset: every modality combination, fusion variant and task."""
import pytest
import torch

from conftest import QUESTIONS, make_inputs, make_model, tiny
from reference.config import ConfigError
from reference.model import CremaInputs, InputError

COMBOS = [
    ("rgb",),
    ("rgb", "depth", "flow", "norm"),
    ("rgb", "audio"),
    ("rgb", "pc"),
    ("audio",),
    ("pc",),
    ("rgb", "depth-skip", "flow"),
]


@pytest.mark.parametrize("modalities", COMBOS, ids="_".join)
@pytest.mark.parametrize("downstream", ["oeqa", "mcqa"])
def test_forward_and_generate(modalities, downstream):
    model = make_model(modalities, downstream_task=downstream)
    inputs = make_inputs(model.cfg)
    embeds, mask = model.encode_inputs(inputs)
    q_len = model.tokenizer.encode(inputs.questions, model.cfg.max_txt_len)[0].shape[1]
    assert embeds.shape == (2, model.multimodal_token_count() + q_len, model.cfg.t5.d_model)
    assert torch.isfinite(embeds).all()
    dec = torch.zeros(2, 3, dtype=torch.long)
    assert model(inputs, dec).shape == (2, 3, model.cfg.t5.vocab_size)
    answers = model.generate(inputs)
    assert len(answers) == 2
    for a in answers:
        assert a.text and 1 <= len(a.token_ids) <= model.cfg.generation.max_new_tokens
        if downstream == "mcqa":
            assert a.text in "ABCDE" and len(a.option_scores) == 5
            assert a.text == "ABCDE"[max(range(5), key=a.option_scores.__getitem__)]
        else:
            assert a.option_scores is None


@pytest.mark.parametrize("task", ["espresso", "espresso_concat"])
@pytest.mark.parametrize("modalities", [("rgb", "depth", "flow"), ("rgb", "audio"), ("rgb", "pc"),
                                        ("rgb", "audio", "pc")], ids="_".join)
def test_espresso_fusion(task, modalities):
    model = make_model(modalities, task=task)
    cfg = model.cfg
    inputs = make_inputs(cfg)
    tokens = model.modality_tokens(inputs)
    ids, mask = (torch.from_numpy(a) for a in model.tokenizer.encode(inputs.questions, cfg.max_txt_len))
    embeds, att = model.assemble(tokens, ids, mask)
    # by hand: fuse the non-rgb tokens per frame, gate with x*sigmoid(x)
    fused = []
    for m in cfg.modality_names[1:]:
        x = tokens[m]
        if m == "audio":
            x = x.mean(1, keepdim=True)
        if m == "pc":
            x = x.unsqueeze(1)
        fused.append(x.expand(-1, cfg.frame_num, -1, -1))
    extra = model.fusion(torch.cat(fused, -1))
    extra = extra * torch.sigmoid(extra)
    p = model._prefixes["frame"][0].shape[1]
    nq = cfg.num_query_token
    per_frame = p + nq
    for t in range(cfg.frame_num):
        rgb_rows = slice(t * per_frame + p, (t + 1) * per_frame)
        if task == "espresso":
            want = tokens["rgb"][:, t] + extra[:, t]
        else:  # rgb unchanged in the first block; the fused tokens in the second
            want = tokens["rgb"][:, t]
            second = cfg.frame_num * per_frame + cfg.frame_num * p
            torch.testing.assert_close(embeds[:, second + t * nq: second + (t + 1) * nq], extra[:, t])
        torch.testing.assert_close(embeds[:, rgb_rows], want)
    assert embeds.shape[1] == model.multimodal_token_count() + ids.shape[1]
    assert att.shape == embeds.shape[:2]


def test_concat_order_prefix_rgb_then_other_modalities():
    model = make_model(("rgb", "depth", "norm"))
    cfg = model.cfg
    inputs = make_inputs(cfg, batch=1)
    tokens = model.modality_tokens(inputs)
    embeds, _ = model.encode_inputs(inputs)
    prefix_ids, _ = model._prefixes["frame"]
    p, nq = prefix_ids.shape[1], cfg.num_query_token
    step = p + 3 * nq
    for t in range(cfg.frame_num):
        base = t * step
        torch.testing.assert_close(embeds[0, base:base + p], model.embed(prefix_ids[t]))
        for j, m in enumerate(("rgb", "depth", "norm")):
            torch.testing.assert_close(embeds[0, base + p + j * nq: base + p + (j + 1) * nq], tokens[m][0, t])
    words = [model.tokenizer.decode(r) for r in prefix_ids]
    assert words == ["Frame 1:", "Frame 2:"]


def test_single_frame_prefix_and_audio_only_prefix():
    one = make_model(frame_num=1)
    assert one.tokenizer.decode(one._prefixes["frame"][0][0]) == "Frame:"
    audio = make_model(("audio",))
    embeds, _ = audio.encode_inputs(make_inputs(audio.cfg, batch=1))
    ids = audio._prefixes["audio"][0][0]
    torch.testing.assert_close(embeds[0, :len(ids)], audio.embed(ids))


def test_skip_runs_the_base_qformer():
    skip = make_model(("rgb", "depth-skip"))
    inputs = make_inputs(skip.cfg)
    with_lora = make_model(("rgb", "depth"))  # same seed: identical weights
    a = skip.modality_tokens(inputs)["depth"]
    b = with_lora.modality_tokens(inputs)["depth"]
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(skip.modality_tokens(inputs)["rgb"], with_lora.modality_tokens(inputs)["rgb"])


def test_deterministic_and_batch_independent(rgb_model):
    cfg = rgb_model.cfg
    batch = make_inputs(cfg, batch=3)
    first = rgb_model.generate(batch)
    assert [a.token_ids for a in first] == [a.token_ids for a in rgb_model.generate(batch)]
    for i in range(3):  # ragged questions in a batch give the batch-of-one answers
        single = make_inputs(cfg, batch=3)
        single.questions = [QUESTIONS[i]]
        single.frames = {m: x[i:i + 1] for m, x in single.frames.items()}
        assert rgb_model.generate(single)[0].token_ids == first[i].token_ids
    assert len({tuple(a.token_ids) for a in first}) > 1, "answers should depend on the input"


def test_generation_overrides(rgb_model):
    inputs = make_inputs(rgb_model.cfg, batch=1)
    greedy = rgb_model.generate(inputs, num_beams=1, max_new_tokens=3)[0]
    assert len(greedy.token_ids) <= 3
    long = rgb_model.generate(inputs, min_length=6, max_new_tokens=6)[0]
    assert len(long.token_ids) == 6 and 1 not in long.token_ids[:4]


@pytest.mark.parametrize("mutate, message", [
    (lambda i: setattr(i, "questions", ["  "]), "empty question"),
    (lambda i: setattr(i, "questions", []), "empty batch"),
    (lambda i: i.frames.pop("rgb"), "frames['rgb']: missing"),
    (lambda i: i.frames.update(rgb=i.frames["rgb"][:, :1]), "expected (1, 2, 3, 56, 56)"),
    (lambda i: i.frames.update(rgb=i.frames["rgb"].transpose(1, 2)), "shape (1, 3, 2, 56, 56)"),
    (lambda i: i.frames.update(depth=i.frames["rgb"]), "modality not configured"),
    (lambda i: i.frames.update(sound=i.frames["rgb"]), "unknown visual modality"),
    (lambda i: setattr(i, "audio", torch.zeros(1, 2, 64, 128)), "'audio' not configured"),
    (lambda i: i.frames["rgb"].__setitem__((0, 0, 0, 0, 0), float("nan")), "NaN"),
])
def test_bad_input_names_the_problem(rgb_model, mutate, message):
    inputs = make_inputs(rgb_model.cfg, batch=1)
    mutate(inputs)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        rgb_model.generate(inputs)


def test_bad_3d_and_audio_inputs():
    model = make_model(("rgb", "audio", "pc"), task="espresso")
    inputs = make_inputs(model.cfg, batch=1)
    inputs.pc_coords = inputs.pc_coords + model.cfg.pc_grid
    with pytest.raises(InputError, match="pc_coords: voxel coordinates must lie in"):
        model.generate(inputs)
    inputs = make_inputs(model.cfg, batch=1)
    inputs.audio = inputs.audio[:, :, :10]
    with pytest.raises(InputError, match="audio: shape"):
        model.generate(inputs)


@pytest.mark.parametrize("changes, message", [
    (dict(modalities=("rgb", "video")), "unknown modality 'video'"),
    (dict(modalities=("rgb", "rgb")), "listed twice"),
    (dict(modalities=("depth", "flow"), task="espresso"), "needs rgb"),
    (dict(modalities=("rgb", "audio", "pc")), "drops the pc tokens"),
    (dict(task="fusion"), "unknown task"),
    (dict(downstream_task="caption"), "unknown downstream"),
    (dict(answer_num=6), "answer_num"),
])
def test_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**changes)


@pytest.mark.parametrize("modalities,task", [(("rgb", "depth", "audio", "pc"), "espresso"),
                                             (("rgb", "depth", "audio", "pc"), "espresso_concat"),
                                             (("rgb", "audio"), "concat"), (("rgb", "pc"), "concat")])
def test_the_reference_computes_where_its_weights_are(modalities, task):
    """No tensor is made on the CPU behind the weights' back (prefixes, masks): on the meta device
    (no data, any mixing of devices fails) the encoder inputs come out on the weights' device, as on
    CUDA they must for the GPU benchmark's PyTorch side to be the real reference."""
    model = make_model(modalities, task=task)
    inputs = make_inputs(model.cfg, batch=2)
    ids, mask = model.tokenizer.encode(inputs.questions, max_len=model.cfg.max_txt_len)
    model = model.to("meta")
    meta = lambda x: None if x is None else x.to("meta")  # noqa: E731
    inputs = CremaInputs(inputs.questions, {m: meta(x) for m, x in inputs.frames.items()}, meta(inputs.audio),
                         meta(inputs.pc_feat), meta(inputs.pc_coords))
    embeds, attention = model.assemble(model.modality_tokens(inputs), torch.from_numpy(ids).to("meta"),
                                       torch.from_numpy(mask).to("meta"))
    assert embeds.device.type == attention.device.type == "meta"
