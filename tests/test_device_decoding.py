"""Device-resident decoding: the KV cache stays where the decoder graphs run, only logits come back.

Real ONNX Runtime sessions throughout; spies call through to ORT and only record what was bound or
copied to the host. On a machine with onnxruntime-gpu the same tests run on the CUDA provider.
"""
import numpy as np
import onnxruntime as ort
import pytest

from calibration.data import Recorder
from conftest import make_model
from export.onnx_export import export_artifacts
from export.parity import random_inputs, to_requests
from runtime import decoding
from runtime.pipeline import CachedDecoder, HostCachedDecoder, Pipeline, cached_decoder, decode_answers

PROVIDERS = ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in ort.get_available_providers() else [])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = make_model(("rgb",), seed=3)
    out = tmp_path_factory.mktemp("dev") / "a"
    export_artifacts(model, out, {"preset": "tiny", "seed": 3}, progress=False)
    return model, out


def encoded(pipeline: Pipeline, model, batch: int):
    return pipeline.encode(to_requests(random_inputs(model.cfg, batch=batch, seed=5)))


def recorders(pipeline: Pipeline) -> dict:
    """The decoder stages behind something that is not an ORT session here (as Triton BLS calls are)."""
    return {n: Recorder(s) for n, s in pipeline.stages.items()}


@pytest.fixture
def spies(monkeypatch):
    """Record every host array bound as an input, every ORT value bound (name, pointer, device) and
    every ORT value copied to numpy."""
    seen = {"host": [], "bound": [], "to_host": []}
    io = ort.IOBinding
    bind_cpu, bind_value, to_numpy = io.bind_cpu_input, io.bind_ortvalue_input, ort.OrtValue.numpy

    def host(self, name, array):
        seen["host"].append(name)
        return bind_cpu(self, name, array)

    def bound(self, name, value):
        seen["bound"].append((name, value.data_ptr(), value.device_name()))
        return bind_value(self, name, value)

    def copied(self):
        array = to_numpy(self)
        seen["to_host"].append(array.shape)
        return array

    monkeypatch.setattr(io, "bind_cpu_input", host)
    monkeypatch.setattr(io, "bind_ortvalue_input", bound)
    monkeypatch.setattr(ort.OrtValue, "numpy", copied)
    return seen


def forbid_run(monkeypatch, *stages) -> None:
    """Make the stages' `session.run` (which copies every output to the host) fail."""
    def forbidden(*args, **kwargs):
        raise AssertionError("session.run copies every output to the host")
    for stage in stages:
        monkeypatch.setattr(stage.session, "run", forbidden)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_cache_stays_on_the_device_and_only_logits_come_back(exported, provider, spies, monkeypatch):
    model, art = exported
    pipeline = Pipeline(art, providers=[provider])
    hidden, mask = encoded(pipeline, model, batch=3)
    forbid_run(monkeypatch, pipeline.stages["decoder_first"], pipeline.stages["decoder_step"])
    vocab = model.cfg.t5.vocab_size
    decoder = pipeline.step_model(hidden, mask)
    assert type(decoder) is CachedDecoder
    decoder.first()
    cross = [(v.data_ptr(), v.shape()) for v in decoder.cross]
    assert all(shape[0] == 3 for _, shape in cross)
    decoder.expand(2)
    rng = np.random.default_rng(0)
    for reorder in (None, np.arange(6) ^ 1, np.array([0, 0, 3, 2, 5, 5])):
        past = [v.data_ptr() for v in decoder.past]
        spies["bound"].clear()
        logits = decoder.step(rng.integers(2, vocab, 6), reorder)
        assert logits.shape == (6, vocab)
        bound = {name: (ptr, device) for name, ptr, device in spies["bound"]}
        assert [bound[n][0] for n in decoder.past_names] == past, "present must be bound as past, uncopied"
        assert [(bound[n][0], v.shape()) for n, v in zip(decoder.cross_names, decoder.cross)] == cross
        assert {device for _, device in bound.values()} == {provider}
        assert {v.device_name() for v in decoder.past} == {provider}
        assert all(v.shape()[0] == 6 for v in decoder.past)
    assert set(spies["host"]) == {"decoder_input_ids", "encoder_hidden", "beam_index"}
    assert spies["host"].count("encoder_hidden") == 1
    assert spies["to_host"] == [(3, vocab)] + [(6, vocab)] * 3, "only logits may come to the host"


@pytest.mark.parametrize("batch", [1, 3])
def test_device_and_host_caches_give_identical_logits_and_tokens(exported, batch):
    model, art = exported
    pipeline = Pipeline(art)
    hidden, mask = encoded(pipeline, model, batch)
    host_stages = recorders(pipeline)

    def both():
        return (CachedDecoder(pipeline.stages["decoder_first"], pipeline.stages["decoder_step"], hidden, mask),
                cached_decoder(host_stages["decoder_first"], host_stages["decoder_step"], hidden, mask))

    device, host = both()
    assert type(host) is HostCachedDecoder
    np.testing.assert_array_equal(device.first(), host.first())
    device.expand(3)
    host.expand(3)
    rows = np.arange(3 * batch)
    for tokens, reorder in ((rows + 4, None), (rows + 9, rows // 3 * 3 + (rows + 1) % 3)):  # beams rotate
        np.testing.assert_array_equal(device.step(tokens, reorder), host.step(tokens, reorder))
    d, h = both()
    assert decoding.beam_search(d, 3, 8) == decoding.beam_search(h, 3, 8)
    d, h = both()
    (dt, ds), (ht, hs) = decoding.greedy(d, 8), decoding.greedy(h, 8)
    assert dt == ht and all(np.array_equal(a, b) for a, b in zip(ds, hs))


@pytest.mark.parametrize("host", [False, True], ids=["device", "host"])
def test_a_reordered_beam_continues_the_row_it_was_given(exported, host):
    """Gathering the cache by reorder == having fed each row its source row's tokens directly."""
    model, art = exported
    pipeline = Pipeline(art)
    hidden, mask = encoded(pipeline, model, batch=2)
    stages = recorders(pipeline) if host else pipeline.stages
    first, second = np.array([4, 5, 6, 7, 8, 9]), np.array([10, 11, 12, 13, 14, 15])
    reorder = np.array([2, 2, 0, 4, 3, 3])  # beams move and duplicate within their request
    runs = []
    for tokens, index in ((first, reorder), (first[reorder], None)):
        decoder = cached_decoder(stages["decoder_first"], stages["decoder_step"], hidden, mask)
        decoder.first()
        decoder.expand(3)
        decoder.step(tokens, None)
        runs.append(decoder.step(second, index))
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-6, atol=1e-6)
    assert not np.allclose(runs[0], runs[0][[1, 0, 2, 3, 4, 5]]), "rows must differ for the test to mean anything"


def test_host_cache_feeds_are_numpy_with_cross_kv_once_per_request(exported):
    """What the BLS path and calibration send per step: numpy arrays, beam_index, cross K/V not repeated."""
    model, art = exported
    pipeline = Pipeline(art)
    hidden, mask = encoded(pipeline, model, batch=2)
    stages = recorders(pipeline)
    decoding.beam_search(cached_decoder(stages["decoder_first"], stages["decoder_step"], hidden, mask), 4, 5)
    feeds = stages["decoder_step"].feeds
    assert feeds and all(isinstance(x, np.ndarray) for f in feeds for x in f.values())
    assert [f["past.0.key"].shape[0] for f in feeds] == [2] + [8] * (len(feeds) - 1)  # expanded by the gather
    assert all(f["beam_index"].shape == (8,) and f["cross.0.key"].shape[0] == 2 for f in feeds)
    assert list(feeds[0]["beam_index"]) == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("batch", [1, 3])
def test_mcqa_scores_match_the_reference_on_both_paths(tmp_path, batch):
    model = make_model(("rgb",), downstream_task="mcqa")
    export_artifacts(model, tmp_path / "a", {}, progress=False)
    pipeline = Pipeline(tmp_path / "a")
    inputs = random_inputs(model.cfg, batch=batch, seed=2)
    reference = model.generate(inputs)
    hidden, mask = pipeline.encode(to_requests(inputs))
    g = pipeline.generation()
    for stages in (pipeline.stages, recorders(pipeline)):
        got = decode_answers(stages, hidden, mask, g, pipeline.tokenizer, pipeline.answer_ids)
        assert [a.token_ids for a in got] == [a.token_ids for a in reference]
        assert [a.text for a in got] == [a.text for a in reference]
        np.testing.assert_allclose([a.option_scores for a in got], [a.option_scores for a in reference],
                                   rtol=1e-4, atol=1e-4)


def test_decoder_step_graph_declares_the_spec_axes(exported):
    _, art = exported
    stage = Pipeline(art).stages["decoder_step"]
    declared = {t.name: list(t.dims) for t in stage.spec.inputs + stage.spec.outputs}
    assert {x.name: x.shape for x in stage.session.get_inputs() + stage.session.get_outputs()} == declared
    assert declared["beam_index"] == ["rows"] and declared["past.0.key"][0] == "past_rows"
