"""``python -m conflayers`` drafting from the corpus: rows copy from the rows of their dataset that
finished before them, ``--corpus-index`` starts from the saved index and adds the run to it (the job's
files: the same name, format and key), and output equals plain decoding. A tiny model, in process."""

from __future__ import annotations

import json
import logging

import pytest

from conflayers.cli import main
from conflayers.drafts.corpus import index_key, index_name, pack, unpack
from conflayers.models import load_model
from conflayers.search.registry import model_identity
from pipeline.config import PipelineConfig
from pipeline.corpus import load_index, save_pooled
from tests.pipeline_helpers import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("cli-corpus") / "model", tied=False)


@pytest.fixture(scope="module")
def key(tiny_dir):
    model, tok = load_model(tiny_dir)
    return index_key(model_identity(model), tok)


def run(capsys, tiny_dir, prompts_file, *args) -> tuple[dict[int, dict], dict]:
    """(rows by index, the summary) of one ``--json`` run."""
    code = main(["--model", tiny_dir, "--dtype", "float64", "--prompts-file", str(prompts_file), "--batch-size", "1",
                 "--max-new-tokens", "12", "--json", *args])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = [json.loads(line) for line in out.splitlines()]
    assert "summary" in lines[-1]  # the last line
    return {r["index"]: r for r in lines if "index" in r}, lines[-1]["summary"]


def write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def job_cfg(directory) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.corpus_index.path = str(directory)
    return cfg


def test_rows_copy_earlier_rows_and_a_second_run_starts_from_the_saved_index(tmp_path, capsys, tiny_dir, key):
    prompts = write(tmp_path / "shop.jsonl", [{"prompt": f"Describe product {c}."} for c in "ABCABC"])
    idx = tmp_path / "idx"
    plain, _ = run(capsys, tiny_dir, prompts, "--drafter", "none")
    cold, summary = run(capsys, tiny_dir, prompts, "--drafter", "corpus", "--corpus-index", str(idx))
    assert [cold[i]["output"] for i in range(6)] == [plain[i]["output"] for i in range(6)]
    assert cold[0]["drafter_steps"].get("corpus", 0) == 0  # nothing had finished before it
    assert all(cold[i]["drafter_steps"].get("corpus", 0) > 0 for i in (3, 4, 5))  # the same prompt finished before
    shares = summary["step_shares"]
    assert set(shares) == {"plain", "ngram", "corpus", "layerskip"} and shares["corpus"] > 0
    assert abs(sum(shares.values()) - 1) < 1e-3
    path = str(idx / index_name("shop", key))  # the dataset is the file's stem
    assert summary["corpus_index"] == {"shop": {"outputs_loaded": 0, "outputs_indexed": 6, "saved": path}}
    # the job reads the command line's file as its own: the same name, format and key
    _, tok = load_model(tiny_dir)
    saved = load_index(job_cfg(idx), "shop", key)
    assert [tok.decode(o, skip_special_tokens=True) for o in saved.outputs] == [cold[i]["output"] for i in range(6)]

    warm, summary = run(capsys, tiny_dir, prompts, "--drafter", "corpus", "--corpus-index", str(idx))
    assert [warm[i]["output"] for i in range(6)] == [plain[i]["output"] for i in range(6)]
    assert warm[0]["drafter_steps"].get("corpus", 0) > 0  # the first row copies the last run's
    assert summary["corpus_index"]["shop"]["outputs_loaded"] == 6
    assert len(unpack(open(path, "rb").read(), key=key)[2]) == 12


def test_each_dataset_has_its_index_and_the_job_saved_one_is_read(tmp_path, capsys, tiny_dir, key):
    idx = tmp_path / "idx"
    save_pooled(job_cfg(idx), {"alpha": (key, [[5, 6, 7, 8]])})  # what a job run left there
    prompts = write(tmp_path / "mixed.jsonl", [{"prompt": "Say one.", "dataset": "alpha"},
                                               {"prompt": "Say two.", "dataset": "beta"}, {"prompt": "Say three."}])
    rows, summary = run(capsys, tiny_dir, prompts, "--drafter", "corpus", "--corpus-index", str(idx),
                        "--dataset", "rest")
    assert len(rows) == 3
    got = summary["corpus_index"]
    assert {d: (c["outputs_loaded"], c["outputs_indexed"]) for d, c in got.items()} == {
        "alpha": (1, 2), "beta": (0, 1), "rest": (0, 1)}
    assert sorted(p.name for p in idx.iterdir()) == sorted(index_name(d, key) for d in ("alpha", "beta", "rest"))
    assert [list(o) for o in load_index(job_cfg(idx), "alpha", key).outputs][0] == [5, 6, 7, 8]


def test_a_damaged_or_foreign_index_is_a_warning_and_a_cold_start(tmp_path, capsys, caplog, tiny_dir, key):
    prompts = write(tmp_path / "d.jsonl", [{"prompt": "Hello."}])
    idx = tmp_path / "idx"
    idx.mkdir()
    path = idx / index_name("d", key)
    for bad, why in ((b"not an index", "bad magic"), (pack([[1, 2]], key="another-model"), "refusing it")):
        path.write_bytes(bad)
        with caplog.at_level(logging.WARNING):
            _, summary = run(capsys, tiny_dir, prompts, "--drafter", "corpus", "--corpus-index", str(idx))
        assert why in caplog.text and "starts with an empty index" in caplog.text
        assert summary["corpus_index"]["d"]["outputs_loaded"] == 0
        assert len(unpack(path.read_bytes(), key=key)[2]) == 1  # replaced by a good file
        assert [p.name for p in idx.iterdir()] == [path.name]  # no temporary file left
        caplog.clear()


def test_auto_drafts_from_the_corpus(tmp_path, capsys, tiny_dir):
    prompts = write(tmp_path / "p.jsonl", [{"prompt": f"Name item {c}."} for c in "ABAB"])
    plain, _ = run(capsys, tiny_dir, prompts, "--drafter", "none")
    code = main(["--model", tiny_dir, "--dtype", "float64", "--prompts-file", prompts, "--batch-size", "1",
                 "--max-new-tokens", "12", "--json", "--costs", str(tmp_path / "costs.json")])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    rows = {r["index"]: r for r in lines if "index" in r}
    assert [rows[i]["output"] for i in range(4)] == [plain[i]["output"] for i in range(4)]
    state = next(line["drafter_state"] for line in lines if "drafter_state" in line)
    assert state["corpus_acceptance"]  # corpus drafts were among auto's choices
    assert lines[-1]["summary"]["corpus_index"]["p"]["outputs_indexed"] == 4


@pytest.mark.parametrize("args, message", [
    (["--corpus-index", "FILE"], "--corpus-index takes a directory, and"),
    (["--corpus-index", "DIR", "--drafter", "none"], "--corpus-index keeps corpus drafts; --drafter none makes none"),
    (["--corpus-index", "FILE/sub"], "--corpus-index: cannot make the directory"),
])
def test_bad_corpus_index_arguments_exit_2_before_loading_a_model(tmp_path, capsys, args, message):
    (tmp_path / "FILE").write_text("x")
    args = [a.replace("FILE", str(tmp_path / "FILE")).replace("DIR", str(tmp_path / "d")) for a in args]
    assert main(["hello", "--model", str(tmp_path / "no-model"), *args]) == 2
    assert message in capsys.readouterr().err


def test_the_table_is_followed_by_the_step_shares_and_the_corpus_index(tmp_path, capsys, tiny_dir):
    prompts = write(tmp_path / "notes.jsonl", [{"prompt": "Hi."}, {"prompt": "Hi."}])
    assert main(["--model", tiny_dir, "--prompts-file", prompts, "--batch-size", "1", "--max-new-tokens", "8",
                 "--drafter", "corpus", "--corpus-index", str(tmp_path / "idx")]) == 0
    out = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(out) if line.split()[:3] == ["#", "new", "steps"])
    assert out[at + 3].startswith("steps: plain ") and "/ corpus " in out[at + 3] and "verify steps" in out[at + 3]
    assert out[at + 4].startswith("corpus index 'notes': empty at the start, 2 outputs after the run, saved to ")
