"""Compiled steps (conflayers.compiled): the same tokens as eager steps (float64, token for token, every
drafter, rows joining and leaving), one compile per variant for every layer and width, a failed compile
leaves the engine eager with a warning, and compile auto's decisions."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conflayers import Engine, GenerationConfig, Request, SamplingParams
from conflayers.compiled import NAME, CompiledSteps, CompileError
from conflayers.costs.compile import choose_compile, decide

from .conftest import RAGGED, tiny_model
from .test_static_steps import drafters

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled():
    """One tiny model (a larger init: each token depends on its context) and an engine with compiled steps
    on it; every test of the module shares the compile."""
    model = tiny_model("llama", std=0.2)
    engine = Engine(model, compile="on")
    assert engine.compiled is not None, engine.compile_error
    return model, engine


@pytest.mark.parametrize("drafter", ["none", "ngram", "layerskip", "corpus"])
@pytest.mark.parametrize("width", [1, 3, 8])
def test_compiled_steps_give_the_tokens_of_eager_steps(compiled, drafter, width):
    model, engine = compiled
    prompts = RAGGED * 3 + [[9, 8, 7, 6, 5, 4, 3, 2, 1] * 3]
    budgets = [12 + 5 * (i % 4) for i in range(len(prompts))]  # rows finish at different steps, others join
    reqs = [Request(p, max_new_tokens=b, group=str(i % 2)) for i, (p, b) in enumerate(zip(prompts, budgets))]
    cfg = GenerationConfig(max_new_tokens=24, stop_token_ids=())
    eager = Engine(model, compile="off").generate(reqs, cfg, drafters(model, drafter), max_batch=width)
    got = engine.generate(reqs, cfg, drafters(model, drafter), max_batch=width)
    assert [r.token_ids for r in got] == [r.token_ids for r in eager]
    assert [r.stats.steps for r in got] == [r.stats.steps for r in eager]
    if drafter != "none":
        assert sum(r.stats.accepted for r in got) > 0


def test_sampled_tokens_are_the_same_with_compiled_steps(compiled):
    model, engine = compiled
    cfg = GenerationConfig(max_new_tokens=20, stop_token_ids=(), seed=7,
                           sampling=SamplingParams(temperature=0.8, top_p=0.95))
    prompts = RAGGED * 2
    eager = Engine(model, compile="off").generate(prompts, cfg, drafters(model, "ngram"), max_batch=3)
    got = engine.generate(prompts, cfg, drafters(model, "ngram"), max_batch=3)
    assert [r.token_ids for r in got] == [r.token_ids for r in eager]
    assert len({tuple(r.token_ids) for r in eager}) > 1


def test_one_compile_serves_every_layer_width_and_length(compiled):
    """Four variants (rows 1 / several, q 1 / several) were compiled up front; streams of other widths,
    verify lengths and cache sizes reuse them: no recompile, no eager fallback."""
    from torch._dynamo.utils import counters

    model, engine = compiled
    before = counters["stats"]["unique_graphs"]
    cfg = GenerationConfig(max_new_tokens=30, stop_token_ids=())
    for width in (2, 5, 8):
        prompt = [1 + i % 90 for i in range(40 + 9 * width)]
        engine.generate([prompt] * 9, cfg, drafters(model, "ngram"), max_batch=width)
    assert counters["stats"]["unique_graphs"] == before
    assert not engine.compiled.failed
    assert model.config._attn_implementation == NAME


def test_a_second_start_reads_the_compiled_layers_back(compiled, monkeypatch, tmp_path):
    """Each compiled variant is saved beside inductor's cache; a second start on the machine reads them
    back (no torch.compile at all), checks them against eager as a compile would, and decodes the same
    tokens. A file that cannot be read back means a fresh compile, not a failure."""
    import os

    import conflayers.compiled as compiled_mod
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    model, engine = compiled
    saved = os.listdir(os.path.join(cache_dir(), "conflayers-steps"))
    assert len(saved) >= 4

    def no_compile(*a, **k):
        raise AssertionError("compiled again instead of reading the saved layers back")

    monkeypatch.setattr(compiled_mod.torch, "compile", no_compile)
    steps = CompiledSteps(model)
    steps.prepare(lambda w: engine.step_cache(w, columns=64, context=16)[0])
    reader = Engine(model, compile="off")
    reader.compiled = steps
    cfg = GenerationConfig(max_new_tokens=12, stop_token_ids=())
    want = Engine(model, compile="off").generate(RAGGED, cfg, max_batch=3)
    assert [r.token_ids for r in reader.generate(RAGGED, cfg, max_batch=3)] == [r.token_ids for r in want]
    assert not steps.failed
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a compiled layer")
    assert compiled_mod._load(str(bad), type(steps.layers[0]).forward) is None


def test_the_attention_is_untouched_outside_compiled_steps(compiled):
    """The model runs slot_attention from then on, a pass-through outside compiled steps: an eager forward
    gives what the model gave before the switch."""
    model, _ = compiled
    fresh = tiny_model("llama", std=0.2)
    ids = torch.tensor([RAGGED[0]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, fresh(input_ids=ids).logits, rtol=0, atol=1e-12)


def test_generate_on_the_same_model_is_unchanged_by_the_switch():
    """transformers' generate on a padded batch makes its own masks: under slot_attention they are the
    masks of the attention the model ran before (without them a padded row attends to padding)."""
    from conflayers.compiled import use_slot_attention

    model = tiny_model("llama", layers=2, std=0.2)
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [1, 2, 3, 4, 5, 6]])
    mask = (torch.arange(6)[None, :] >= torch.tensor([[3], [0]])).long()

    def run():
        return model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)

    want = run()
    use_slot_attention(model)
    assert torch.equal(run(), want)


def test_a_failed_compile_leaves_the_engine_eager_and_says_why(tmp_path):
    """No C++ compiler (inductor's CPU backend needs one): the engine decodes eagerly, with one warning
    naming the cause, and its tokens are the eager ones."""
    script = textwrap.dedent(f"""
        import logging, sys
        sys.path.insert(0, {str(ROOT)!r})
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        import torch._inductor.config as ic
        ic.cpp.cxx = ("/nonexistent/c++",)
        from tests.conftest import tiny_model, RAGGED
        from conflayers import Engine, GenerationConfig
        model = tiny_model("llama", layers=2, std=0.2)
        cfg = GenerationConfig(max_new_tokens=8, stop_token_ids=())
        want = [r.token_ids for r in Engine(model, compile="off").generate(RAGGED, cfg, max_batch=2)]
        engine = Engine(model, compile="on")
        got = [r.token_ids for r in engine.generate(RAGGED, cfg, max_batch=2)]
        print("RESULT", engine.compiled is None, got == want, flush=True)
    """)
    env = {**__import__("os").environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert "RESULT True True" in out.stdout, out.stdout + out.stderr[-3000:]
    warnings = [l for l in out.stderr.splitlines() if "compiled steps are off" in l]
    assert len(warnings) == 1 and "decoding eagerly" in warnings[0], out.stderr[-3000:]


def test_compile_auto_decides_from_the_measured_table():
    table = {"eager_ms": {"onednn": 40.0, "native": 35.0}, "compiled_ms": 25.0, "compile_seconds": 30.0}
    on, plan, why = decide(table, None, 1)
    assert on and plan == "native" and "1.40x" in why
    # a short run does not pay back the compile: 600 tokens save 6 s against 30 s of compiling
    on, plan, why = decide(table, 600, 1)
    assert not on and plan == "native" and "30 s of compiling" in why
    assert decide(table, 10_000, 1)[0]
    # no faster than eager: eager on the fastest kernel plan
    on, plan, why = decide({"eager_ms": {"onednn": 20.0, "native": 30.0}, "compiled_ms": 19.9}, None, 8)
    assert not on and plan == "onednn" and "not faster" in why
    on, _, why = decide({"eager_ms": {"native": 20.0}, "error": "no C++ compiler"}, None, 1)
    assert not on and why == "no C++ compiler"


def test_compile_auto_stays_eager_for_float64_and_short_runs(tmp_path):
    engine = Engine(tiny_model("llama", layers=2))
    choice = choose_compile(engine, 4, 10_000, cache=tmp_path / "c.json")
    assert not choice.compiled and "float64" in choice.reason and engine.compiled is None
    engine = Engine(tiny_model("llama", layers=2, dtype=torch.float32))
    choice = choose_compile(engine, 2, 64, cache=tmp_path / "c.json")
    assert not choice.compiled and choice.reason.startswith("not measured") and engine.compiled is None
    assert not (tmp_path / "c.json").exists()  # nothing was measured, nothing cached
    # a cached measurement decides without measuring (and says it came from the cache)
    from conflayers.costs.compile import compile_key

    table = {"eager_ms": {"native": 30.0}, "compiled_ms": 40.0, "compile_seconds": 5.0}
    (tmp_path / "c.json").write_text(json.dumps({compile_key(engine, 2): table}))
    choice = choose_compile(engine, 2, 10_000, cache=tmp_path / "c.json")
    assert choice.cached and not choice.compiled and "not faster" in choice.reason


def test_compiled_steps_run_on_the_prepacked_onednn_linears():
    """On the oneDNN plan the compiled layers call the packed kernels (``conflayers::packed_linear``):
    the same logits as the eager packed step; a weight without its packed copy fails the compiled step,
    which goes eager from then on and still gives the eager logits; going eager and back reuses the code."""
    from conflayers.kernels import _WEIGHT_PACKED

    model = tiny_model("llama", layers=2, dtype=torch.float32, std=0.2)
    engine = Engine(model, kernels="onednn", compile="on")
    assert engine.compiled is not None, engine.compile_error
    assert engine.kernel_plan.name == "onednn" and engine.compiled.kernels == "onednn"
    prompts = [RAGGED[0], RAGGED[1]]
    with torch.inference_mode():
        kv, _ = engine.prefill(prompts)
        tokens = torch.tensor([[5, 6, 7], [8, 9, 10]])
        got = engine.verify_step(kv)(tokens)
        kv.rollback()
        want = kv.forward(tokens)
        kv.rollback()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
        steps = engine.compiled
        engine.use_eager()
        assert engine.use_compiled() and engine.compiled is steps  # no second compile
        weight = model.model.layers[1].mlp.down_proj.weight
        packed = getattr(weight, _WEIGHT_PACKED)
        delattr(weight, _WEIGHT_PACKED)
        try:
            again = engine.verify_step(kv)(tokens)
        finally:
            setattr(weight, _WEIGHT_PACKED, packed)
        assert "no packed copy" in (steps.failed or "")
        assert torch.allclose(again, want, rtol=1e-5, atol=1e-5)


def test_layers_that_differ_are_not_compiled_as_one():
    model = tiny_model("llama", layers=3)
    model.model.layers[2].self_attn.scaling = 0.5
    with pytest.raises(CompileError, match="layer 2 differs from layer 0 in self_attn.scaling"):
        CompiledSteps(model)


def test_a_bad_compile_setting_is_refused():
    with pytest.raises(ValueError, match="compile must be one of"):
        Engine(tiny_model("llama", layers=2), compile="bogus")


def test_the_compile_switch_reads_on_and_off_from_yaml_and_the_command_line(tmp_path):
    """YAML reads a bare on / off as a boolean: the job configs and the benchmark still mean the switch."""
    from jobs.benchmark import load_config as bench_config
    from jobs.generate import load_config

    assert load_config(None, ["engine.compile=on"]).engine.compile == "on"
    assert load_config(None, ["engine.compile=off"]).engine.compile == "off"
    yaml = tmp_path / "job.yaml"
    yaml.write_text("engine:\n  compile: on\n")
    assert load_config(str(yaml), []).engine.compile == "on"
    with pytest.raises(ValueError, match="engine.compile: must be one of"):
        load_config(None, ["engine.compile=sometimes"])
    assert bench_config(["compile=on"]).compile == "on" and bench_config([]).compile == "off"


def test_compiled_steps_need_a_prefilled_cache_for_their_storage():
    """Before any prefill the storage is not allocated: the step runs eagerly (which allocates it)."""
    model = tiny_model("llama", layers=2)
    steps = CompiledSteps(model)
    from conflayers.kv import KVState

    kv = KVState(model, slots=1)
    kv.n = 1
    logits = steps.forward(kv, torch.ones(1, 1, dtype=torch.long))
    assert logits.shape == (1, 1, model.config.vocab_size) and kv.layers[0].is_initialized
