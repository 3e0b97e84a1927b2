"""ONNX export + ORT pipeline against the reference: every stage within DESIGN §5, same tokens."""
import pytest
import torch

from conftest import make_model
from export.onnx_export import export_artifacts
from export.parity import end_to_end, parity_report, random_inputs
from runtime.pipeline import Pipeline

CASES = [
    (("rgb",), "concat", "oeqa"),
    (("rgb", "depth", "flow", "norm"), "concat", "mcqa"),
    (("rgb", "depth-skip", "norm"), "espresso", "oeqa"),
    (("rgb", "audio"), "concat", "oeqa"),
    (("rgb", "audio"), "espresso_concat", "mcqa"),
    (("rgb", "pc"), "concat", "oeqa"),
    (("rgb", "audio", "pc"), "espresso", "oeqa"),
    (("audio",), "concat", "oeqa"),
    (("pc",), "concat", "mcqa"),
]


@pytest.mark.parametrize("modalities, task, downstream", CASES,
                         ids=["_".join(c[0]) + f"-{c[1]}-{c[2]}" for c in CASES])
def test_parity(tmp_path, modalities, task, downstream):
    model = make_model(modalities, task=task, downstream_task=downstream)
    export_artifacts(model, tmp_path / "a", {"preset": "tiny", "seed": 0}, progress=False)
    report = parity_report(tmp_path / "a")
    for name, row in report["stages"].items():
        assert row["ok"], f"{name}: {row}"
    assert {r["batch"] for r in report["end_to_end"]} == {1, 3}
    if downstream == "oeqa":
        assert {r["generation"]["num_beams"] for r in report["end_to_end"]} == {1, 3}
    for r in report["end_to_end"]:
        assert r["identical"], r
    assert report["ok"]


def test_batch_of_three_gives_the_single_answers(tmp_path):
    model = make_model(("rgb", "depth"))
    export_artifacts(model, tmp_path / "a", {}, progress=False)
    pipeline = Pipeline(tmp_path / "a")
    from export.parity import to_requests
    batch = to_requests(random_inputs(model.cfg, batch=3))
    together = [a.token_ids for a in pipeline.answer(batch)]
    alone = [pipeline.answer([r])[0].token_ids for r in batch]
    assert together == alone and len(set(map(tuple, together))) > 1


@pytest.fixture(scope="module")
def eos_prone(tmp_path_factory):
    """EOS made likely, so beams finish at different lengths and the finishing logic is exercised."""
    model = make_model(("rgb",), seed=7)
    with torch.no_grad():
        model.language_model.lm_head.weight[1] *= 6.0
    out = tmp_path_factory.mktemp("eos") / "a"
    export_artifacts(model, out, {}, progress=False)
    return model, Pipeline(out)


@pytest.mark.parametrize("generation", [
    dict(num_beams=4, length_penalty=1.0),
    dict(num_beams=4, length_penalty=-1.0),
    dict(num_beams=4, length_penalty=0.0, min_length=4),
    dict(num_beams=2, length_penalty=2.0, max_new_tokens=12),
    dict(num_beams=1, min_length=3),
], ids=str)
def test_decoding_matches_generate_when_beams_finish(eos_prone, generation):
    model, pipeline = eos_prone
    result = end_to_end(model, pipeline, random_inputs(model.cfg, batch=3, seed=11), **generation)
    assert result["identical"], result
    lengths = {len(ids) for ids in result["reference"]}
    ended = [ids[-1] == 1 for ids in result["reference"]]
    assert any(ended), "the test should produce finished hypotheses"
    assert "min_length" not in generation or min(lengths) >= generation["min_length"] - 1
