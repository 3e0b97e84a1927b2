"""Parity of an artifact directory against the PyTorch reference it came from (DESIGN §5).

Per stage: the ORT graph and the reference module run on the same inputs (the reference's own
intermediate tensors); error = max |ort - ref| / max |ref|, and cosine similarity. The decoder
graphs are checked against HF T5's full forward, not against the export wrapper. End to end: the
generated token ids of the ORT pipeline and of `Crema.generate`, greedy and beam, batch 1 and a
batch of 3 ragged questions. An exported depth estimator is checked against the transformers model
reloaded from its source directory (in eval mode) on random normalised pixels.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from reference.model import Crema, CremaInputs
from reference.weights import load_checkpoint, load_pretrained, preset_model
from reference.config import CremaConfig
from runtime.pipeline import Pipeline, Request

QUESTIONS = ["What color is the ball?", "Where does the red ball move in the video?", "Is it near?"]
STAGE_BOUND, DEEP_BOUND = 1e-4, 1e-3  # DESIGN §5: deep T5 stacks get the looser bound
DEEP_STAGES = ("fuse_encode", "decoder_first", "decoder_step", "decoder_step_beams")


def random_inputs(cfg: CremaConfig, batch: int = 2, seed: int = 1, clips: int = 2, points: int = 12,
                  questions: list[str] | None = None) -> CremaInputs:
    """Seeded inputs of the configured modalities (normal pixels/features, valid voxel coordinates)."""
    g = torch.Generator().manual_seed(seed)
    qs = list(questions or (QUESTIONS * batch)[:batch])
    inputs = CremaInputs(questions=qs)
    v = cfg.vision
    for m in cfg.visual_modalities:
        inputs.frames[m] = torch.randn(batch, cfg.frame_num, 3, v.image_size, v.image_size, generator=g)
    if "audio" in cfg.modality_names:
        inputs.audio = torch.randn(batch, clips, cfg.audio.clip_frames, cfg.audio.num_mel_bins, generator=g)
    if "pc" in cfg.modality_names:
        inputs.pc_feat = torch.randn(batch, points, cfg.feature_dim, generator=g)
        inputs.pc_coords = torch.randint(0, cfg.pc_grid, (batch, points, 3), generator=g)
    return inputs


def to_requests(inputs: CremaInputs) -> list[Request]:
    def row(x, i):
        return None if x is None else x[i].numpy()
    return [Request(q, frames={m: x[i].numpy() for m, x in inputs.frames.items()}, audio=row(inputs.audio, i),
                    pc_feat=row(inputs.pc_feat, i), pc_coords=row(inputs.pc_coords, i))
            for i, q in enumerate(inputs.questions)]


def reference_for(pipeline: Pipeline) -> Crema:
    """Rebuild the reference model recorded in the manifest's `source`."""
    source = pipeline.artifacts.manifest["source"]
    cfg = CremaConfig.from_dict(pipeline.config)
    if "preset" in source:
        return preset_model(cfg, seed=source.get("seed", 0))
    if "checkpoint" in source:
        return load_checkpoint(source["checkpoint"], modalities=cfg.modalities, task=cfg.task,
                               downstream_task=cfg.downstream_task, frame_num=cfg.frame_num)
    if "blip2_dir" in source:
        options = {k: getattr(cfg, k) for k in ("modalities", "task", "downstream_task", "frame_num", "lora_rank",
                                                "answer_num", "max_txt_len", "generation")}
        return load_pretrained(source["blip2_dir"], source.get("crema_ckpt"), source.get("beats_ckpt"), **options)[0]
    raise ValueError(f"manifest source {source}: cannot rebuild the reference (export from a preset or checkpoint)")


def compare(ort_out: np.ndarray, ref: torch.Tensor) -> dict:
    r = ref.detach().float().numpy().astype(np.float64)
    o = np.asarray(ort_out, dtype=np.float64)
    err = float(np.abs(o - r).max() / max(np.abs(r).max(), 1e-12))
    cos = float((o * r).sum() / max(np.linalg.norm(o) * np.linalg.norm(r), 1e-30))
    return {"max_rel_err": err, "cosine": cos}


@torch.no_grad()
def stage_parity(model: Crema, pipeline: Pipeline, inputs: CremaInputs) -> dict[str, dict]:
    """Each stage's graph against its reference module on the reference's own intermediate tensors."""
    cfg, st, out = model.cfg, pipeline.stages, {}
    b, t = len(inputs.questions), cfg.frame_num
    tokens = {}
    if cfg.visual_modalities:
        pixels = torch.cat([inputs.frames[m].flatten(0, 1) for m in cfg.visual_modalities])
        feats = model.vision_features(pixels)
        out["vision"] = compare(st["vision"](pixel_values=pixels.numpy())["features"], feats)
        for m, f in zip(cfg.visual_modalities, feats.split(b * t)):
            ref = model.mmqa(m, f)
            out[f"mmqa_{m}"] = compare(st[f"mmqa_{m}"](features=f.numpy())["tokens"], ref)
            tokens[m] = ref.unflatten(0, (b, t))
    if "audio" in cfg.modality_names:
        fbank = inputs.audio.flatten(0, 1)
        feats = model.audio_features(fbank)
        out["audio_encoder"] = compare(st["audio_encoder"](fbank=fbank.numpy())["features"], feats)
        ref = model.mmqa("audio", feats)
        out["mmqa_audio"] = compare(st["mmqa_audio"](features=feats.numpy())["tokens"], ref)
        tokens["audio"] = ref.unflatten(0, (b, inputs.audio.shape[1]))
    if "pc" in cfg.modality_names:
        ref = model.mmqa("pc", model.pc_features(inputs.pc_feat, inputs.pc_coords))
        got = st["mmqa_pc"](pc_feat=inputs.pc_feat.numpy(), pc_coords=inputs.pc_coords.numpy())["tokens"]
        out["mmqa_pc"] = compare(got, ref)
        tokens["pc"] = ref
    ids, mask = (torch.from_numpy(a) for a in model.tokenizer.encode(inputs.questions, cfg.max_txt_len))
    embeds, enc_mask = model.assemble(tokens, ids, mask)
    lm = model.language_model
    hidden = lm.encoder(inputs_embeds=embeds, attention_mask=enc_mask).last_hidden_state
    got = st["fuse_encode"](**{f"{m}_tokens": tokens[m].numpy() for m in cfg.modality_names},
                            question_ids=ids.numpy(), question_mask=mask.numpy())
    out["fuse_encode"] = compare(got["encoder_hidden"], hidden)
    if not np.array_equal(got["encoder_mask"], enc_mask.numpy()):
        out["fuse_encode"]["max_rel_err"] = float("inf")  # a wrong mask is a failure whatever the values
    out.update(decoder_parity(lm, pipeline, hidden, enc_mask))
    for name, row in out.items():
        row["bound"] = DEEP_BOUND if name in DEEP_STAGES else STAGE_BOUND
        row["ok"] = row["max_rel_err"] <= row["bound"]
    return out


def decoder_parity(lm, pipeline: Pipeline, hidden: torch.Tensor, enc_mask: torch.Tensor) -> dict[str, dict]:
    """The decoder graphs (through the pipeline's cached decoder) against HF T5's full forward.

    decoder_first and decoder_step: two positions of every request. decoder_step_beams: two beams per
    request, a different token per beam, then beams swapped within each request (decoder_step
    gathers its past by beam_index; the cross K/V stay one per request) and a third position: row r
    must equal HF's forward over the sequence that row holds, [0, first[reorder[r]], second[r]]."""
    b = hidden.shape[0]
    dec_ids = torch.tensor([[0, 5]] * b)
    logits = lm(encoder_outputs=(hidden,), attention_mask=enc_mask, decoder_input_ids=dec_ids).logits
    decoder = pipeline.step_model(hidden.numpy(), enc_mask.numpy())
    out = {"decoder_first": compare(decoder.first(), logits[:, 0]),
           "decoder_step": compare(decoder.step(dec_ids[:, 1].numpy(), None), logits[:, 1])}
    first, second = np.arange(2 * b) + 5, np.arange(2 * b) + 7
    reorder = np.arange(2 * b) ^ 1  # swap the two beams of each request
    beams = pipeline.step_model(hidden.numpy(), enc_mask.numpy())
    beams.first()
    beams.expand(2)
    beams.step(first, None)
    got = beams.step(second, reorder)
    seqs = torch.from_numpy(np.stack([np.zeros(2 * b, np.int64), first[reorder], second], axis=1))
    ref = lm(encoder_outputs=(hidden.repeat_interleave(2, 0),), attention_mask=enc_mask.repeat_interleave(2, 0),
             decoder_input_ids=seqs).logits[:, 2]
    out["decoder_step_beams"] = compare(got, ref)
    return out


@torch.no_grad()
def depth_parity(pipeline: Pipeline, seed: int = 1, frames: int = 3) -> dict | None:
    """The depth_estimator graph against the transformers module it came from (None: not exported)."""
    section = pipeline.artifacts.depth
    if section is None:
        return None
    from .depth import load_depth_model, sample_pixels
    module, _ = load_depth_model(section["source"])
    x = sample_pixels(section, frames=frames, seed=seed)
    got = pipeline.depth_estimator.stage(pixel_values=x.numpy())["predicted_depth"]
    row = compare(got, module(x))
    row["bound"] = STAGE_BOUND
    row["ok"] = row["max_rel_err"] <= STAGE_BOUND
    return row


def end_to_end(model: Crema, pipeline: Pipeline, inputs: CremaInputs, **generation) -> dict:
    ref = [a.token_ids for a in model.generate(inputs, **generation)]
    got = [a.token_ids for a in pipeline.answer(to_requests(inputs), **generation)]
    return {"generation": generation, "batch": len(ref), "identical": ref == got, "reference": ref, "ort": got}


def parity_report(artifacts: str | Path, seed: int = 1) -> dict:
    pipeline = Pipeline(artifacts)
    model = reference_for(pipeline)
    cfg = model.cfg
    inputs = random_inputs(cfg, batch=3, seed=seed)
    report = {"artifacts": str(artifacts), "stages": stage_parity(model, pipeline, inputs), "end_to_end": []}
    depth = depth_parity(pipeline, seed=seed)
    if depth is not None:
        report["stages"]["depth_estimator"] = depth
    decodes = [{"num_beams": 1}] + ([{"num_beams": cfg.generation.num_beams}]
                                    if cfg.downstream_task == "oeqa" and cfg.generation.num_beams > 1 else [])
    for gen in decodes:
        for batch in (1, 3):
            sample = random_inputs(cfg, batch=batch, seed=seed)
            report["end_to_end"].append(end_to_end(model, pipeline, sample, **gen))
    report["ok"] = all(r["ok"] for r in report["stages"].values()) and all(r["identical"] for r in report["end_to_end"])
    return report


def format_report(report: dict) -> str:
    lines = [f"{'stage':<18} {'max rel err':>12} {'bound':>8} {'cosine':>12}  ok"]
    for name, r in report["stages"].items():
        lines.append(f"{name:<18} {r['max_rel_err']:>12.2e} {r['bound']:>8.0e} {r['cosine']:>12.9f}  "
                     f"{'yes' if r['ok'] else 'NO'}")
    for r in report["end_to_end"]:
        lines.append(f"end to end, {r['generation']}, batch {r['batch']}: tokens "
                     f"{'identical' if r['identical'] else 'DIFFER'}")
    lines.append("parity: " + ("PASS" if report["ok"] else "FAIL"))
    return "\n".join(lines)


def write_report(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2))
