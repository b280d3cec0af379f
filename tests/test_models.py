"""tokenize, pretrain, instruct: tokenizer, packing, exact resume after SIGKILL, reproducibility,
offline loading, response-only loss, and generation."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST_TRAINING, run_chain, run_direct
from jielong.flows.stages import STAGES
from jielong.models.data import PackedBatches
from jielong.models.generate import generate, resolve_model
from jielong.models.tokenizer import CHAT_TEMPLATE, render_turn
from jielong.models.train import lr_factor
from jielong.tasks import instruct, pretrain
from jielong.tasks.config import LoraSettings, UserError, load_config
from jielong.tasks.instruct import alpaca_conversations, chat_conversations, encode, file_conversations, summary

ROOT = Path(__file__).resolve().parent.parent


def config(workspace: Path, *extra: str):
    return load_config("tiny", [f"workspace={workspace}", "ingest.sources=[{kind: builtin, limit: 25}]",
                                *FAST_TRAINING, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """ingest -> ... -> instruct once for the module, with the fast settings."""
    workspace = tmp_path_factory.mktemp("models") / "ws"
    cfg = config(workspace, "instruct.steps=30", "instruct.batch_size=8", "instruct.lr=3e-3")
    return cfg, run_chain(cfg, "instruct")


def test_tokenizer_and_packing(trained):
    cfg, artifacts = trained
    tokenized = artifacts["tokenize"]
    details = tokenized.manifest["details"]
    assert tokenized.manifest["metrics"]["vocab_size"] == 512
    splits = details["splits"]
    assert splits["train"]["tokens"] > 1000 and splits["test"]["documents"] > 0
    tokens = np.fromfile(tokenized.path / "tokens" / "train.bin", dtype=details["dtype"])
    assert len(tokens) == splits["train"]["tokens"]
    assert (tokens == details["eos_token_id"]).sum() == splits["train"]["documents"]
    from jielong.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenized.path / "tokenizer")
    text = "def f(x):\n    return x >= 2  # café"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: lossless
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_packed_batches_are_a_function_of_the_step():
    tokens = np.arange(1000, dtype=np.uint16)
    a = PackedBatches(tokens, tokens, 16, 4, 2, seed=7, eval_batches=1)
    b = PackedBatches(tokens, tokens, 16, 4, 2, seed=7, eval_batches=1)
    for step, micro in [(0, 0), (3, 1), (40, 0)]:  # step 40 is a later epoch
        assert torch.equal(a.get(step, micro)["input_ids"], b.get(step, micro)["input_ids"])
    batch = a.get(0, 0)
    assert torch.equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])
    assert not torch.equal(a.get(0, 0)["input_ids"], a.get(0, 1)["input_ids"])


def test_lr_schedule_warms_up_then_decays():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_model_loads_offline_with_auto_classes_and_generates(trained, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, artifacts = trained
    for stage in ("pretrain", "instruct"):
        path = artifacts[stage].path / "model"
        assert {p.name for p in path.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"}
        assert not [p for p in path.rglob("*") if p.suffix in {".bin", ".pt", ".pkl", ".pth"}], "no pickles"
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        assert model.config.architectures == ["LlamaForCausalLM"] and tokenizer.eos_token == "<|endoftext|>"
    model_dir = resolve_model(str(artifacts["instruct"].path / "model"))
    greedy = generate(model_dir, "What does json.dumps do?", max_new_tokens=6, chat=True)
    assert greedy == generate(model_dir, "What does json.dumps do?", max_new_tokens=6, chat=True)
    assert isinstance(generate(model_dir, "The", max_new_tokens=6, temperature=0.8, top_k=20, top_p=0.9), str)
    assert isinstance(generate(model_dir, "The", max_new_tokens=6, beams=3), str)
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        resolve_model(str(artifacts["tokenize"].path))


def test_beam_search_options_and_a_chat_over_a_pipe(trained):
    from jielong.models.generate import Decoding, Generator, chat_loop

    _, artifacts = trained
    model_dir = artifacts["instruct"].path / "model"
    generator = Generator(model_dir, "cpu")
    beams = generator.continue_text("The", 24, Decoding(beams=3, no_repeat_ngram_size=2))
    ids = generator.tokenizer(beams, add_special_tokens=False)["input_ids"]
    pairs = list(zip(ids, ids[1:]))
    assert len(pairs) == len(set(pairs)), "no 2-gram twice"
    said, noticed = [], []
    lines = iter(["What does json.dumps do?", "", "And json.loads?", "/reset", "Hi", "/quit", "never read"])
    conversation = chat_loop(generator, lambda: next(lines, None), said.append, max_new_tokens=8, notice=noticed.append)
    assert len(said) == 3 and noticed == ["(new conversation)"], "replies only; the loop's own words are notices"
    assert [m["role"] for m in conversation] == ["user", "assistant"]  # after /reset: one exchange
    # the second question was answered with the first exchange in its prompt
    history = [{"role": "user", "content": "What does json.dumps do?"}, {"role": "assistant", "content": said[0]},
               {"role": "user", "content": "And json.loads?"}]
    assert said[1] == generator.reply(history, 8)
    run = subprocess.run([sys.executable, "-m", "jielong.flows.cli", "chat", "--model", str(model_dir), "--max-new-tokens", "6"],
                         input="What does json.dumps do?\nAnd json.loads?\n", capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    replies = run.stdout.splitlines()
    assert len(replies) == 2
    assert replies[0] == generator.reply([{"role": "user", "content": "What does json.dumps do?"}], 6).replace("\n", " ")


def test_instruction_tuning_lowers_heldout_response_loss(trained):
    _, artifacts = trained
    metrics = artifacts["instruct"].manifest["metrics"]
    assert metrics["heldout_response_loss_after"] < metrics["heldout_response_loss_before"]
    rows = json.loads((artifacts["instruct"].path / "generations.json").read_text())
    assert len(rows) == 2 and set(rows[0]) == {"prompt", "reference", "before", "after"}
    counts = artifacts["instruct"].manifest["counts"]
    assert counts["documents_in"] == counts["documents_out"] + counts["documents_rejected"]


def test_instruct_keeps_per_pair_heldout_items_that_pool_to_its_metrics(trained):
    """items.json holds each held-out pair's reply loss (sum, tokens) and choice, before and after; pooled
    they give the stage's metrics, and a study reads them as resamplable items (tasks/lib/study/items.py)."""
    from jielong.tasks.lib.study.items import item_stat

    _, artifacts = trained
    artifact = artifacts["instruct"]
    metrics = artifact.manifest["metrics"]
    found = json.loads((artifact.path / "items.json").read_text())["instruct"]
    for when in ("before", "after"):
        rows = found["heldout_loss"][when]
        assert len(rows) == len(found["heldout_loss"]["ids"]) > 1
        pooled = sum(s for s, _ in rows) / sum(n for _, n in rows)
        assert pooled == pytest.approx(metrics[f"heldout_response_loss_{when}"], rel=1e-4)
        stat = item_stat(str(artifact.path), f"heldout_response_loss_{when}")
        assert stat.full() == pytest.approx(pooled, rel=1e-12)
        flags = found["choice"][when]
        assert sum(flags) / len(flags) == pytest.approx(metrics[f"heldout_choice_accuracy_{when}"], abs=1e-12)
        stat = item_stat(str(artifact.path), f"heldout_choice_accuracy_{when}")
        assert stat.full() == pytest.approx(metrics[f"heldout_choice_accuracy_{when}"], abs=1e-12)
        assert stat.fn({next(iter(stat.units)): np.zeros(len(flags), dtype=int)}) in (0.0, 1.0)  # one pair drawn every time


def test_lora_trains_only_adapters_and_saves_a_plain_merged_model(trained):
    """instruct.lora: the same stage with peft adapters; the saved model has the base architecture's
    weights only (adapters merged), differs from the pretrained one, and its response loss fell."""
    from safetensors.torch import load_file

    cfg, artifacts = trained
    lora_cfg = cfg.model_copy(update={"instruct": cfg.instruct.model_copy(update={"lora": LoraSettings(r=4, alpha=8.0), "lr": 1e-2})})
    tuned, _ = run_direct(instruct.STAGE, lora_cfg, {"pretrain": artifacts["pretrain"], "dedup": artifacts["dedup"]})
    assert tuned.key != artifacts["instruct"].key
    metrics = tuned.manifest["metrics"]
    assert 0 < metrics["trainable_parameters"] < metrics["parameters"] / 5
    assert metrics["heldout_response_loss_after"] < metrics["heldout_response_loss_before"]
    merged = load_file(str(tuned.path / "model" / "model.safetensors"))
    base = load_file(str(artifacts["pretrain"].path / "model" / "model.safetensors"))
    assert set(merged) == set(base) and not any("lora" in name for name in merged)
    assert any(not torch.equal(merged[name], base[name]) for name in base)


def test_response_only_loss_and_template(trained):
    cfg, artifacts = trained
    from jielong.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(artifacts["pretrain"].path / "model")
    conversation = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert rendered == render_turn("user", "What is 2+2?") + render_turn("assistant", "Four.")
    ids, targets = encode(conversation, tokenizer, max_length=64)
    trained_tokens = [t for t in targets if t != -100]
    assert tokenizer.decode(trained_tokens) == "Four.<|endoftext|>"
    assert len(ids) == len(targets)


CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
          "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_model_s_own_chat_template_decides_what_is_trained(trained):
    from jielong.models.tokenizer import load_tokenizer
    from jielong.tasks.config import UserError

    cfg, artifacts = trained
    tokenizer = load_tokenizer(artifacts["pretrain"].path / "model")
    tokenizer.chat_template = CHATML  # as SmolLM2 ships it: a default system prompt, ChatML turns
    conversation = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."},
                    {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "Six."}]
    pieces = instruct.chat_pieces(conversation, tokenizer)
    assert "".join(text for text, _ in pieces) == tokenizer.apply_chat_template(conversation, tokenize=False)
    assert [text for text, loss in pieces if loss] == ["Four.<|im_end|>\n", "Six.<|im_end|>\n"]
    ids, targets = encode(conversation, tokenizer, max_length=256)
    trained_text = tokenizer.decode([t for t in targets if t != -100])
    assert trained_text == "Four.<|im_end|>\nSix.<|im_end|>\n"
    tokenizer.chat_template = "{{ messages | length }}: {% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(UserError, match="turn by turn"):
        instruct.chat_pieces(conversation, tokenizer)


def test_pairs_whose_reply_does_not_fit_are_counted_not_trained(trained):
    from collections import Counter

    from jielong.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(trained[1]["pretrain"].path / "model")
    short = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."}]
    long = [{"role": "user", "content": "why " * 200}, {"role": "assistant", "content": "Because."}]
    count = instruct.SourceCount("f.jsonl", "chat", records=2, pairs=2)
    kept, encoded = instruct.encode_trainable([(count, "f#1", short), (count, "f#2", long)], tokenizer, 64)
    assert kept == [short] and len(encoded) == 1
    assert count.pairs == 1 and count.dropped == Counter({"too_long": 1}) and count.example == {"too_long": "f#2"}


def test_builtin_pairs_and_file_sources(tmp_path: Path):
    assert summary('The "with" statement\n********************\n\nThe "with" statement is used to wrap blocks.').startswith(
        'The "with" statement is used')
    assert instruct.question_for("stdlib:json:dumps", "") == "What does json.dumps do?"
    assert instruct.question_for("stdlib:json:JSONDecoder", "") == "What is json.JSONDecoder?"
    assert instruct.question_for("stdlib:textwrap", "") == "What is the textwrap module for?"
    assert alpaca_conversations({"instruction": "Add", "input": "2 and 2", "output": "4"})[0][0]["content"] == "Add\n\n2 and 2"
    assert alpaca_conversations({"instruction": "Add"}) == ["missing_field"]
    assert alpaca_conversations({"instruction": "Add", "output": "  "}) == ["empty"]
    assert alpaca_conversations(["Add"]) == ["malformed"]
    assert chat_conversations({"messages": [{"role": "user", "content": "hi"}]}) == ["missing_field"]
    assert chat_conversations({"messages": [{"role": "robot", "content": "hi"}]}) == ["malformed"]
    path = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}]}
    path.write_text("\n".join([json.dumps(good)] * 3 + ["{broken", json.dumps({"messages": []})]) + "\n")
    source = load_config("tiny", [f"instruct.sources=[{{kind: chat, path: '{path}'}}]"]).instruct.sources[0]
    train, held, count = file_conversations(source, 0.0)
    assert len(train) == 3 and not held and count.dropped == {"malformed": 1, "empty": 1}
    assert count.example == {"malformed": "chat.jsonl#4", "empty": "chat.jsonl#5"} and count.records == 5


def self_instruct_records() -> list[dict]:
    """The shape of self-instruct's seed tasks: an instruction and a list of instances."""
    return [
        {"id": "seed_task_0", "name": "breakfast", "instruction": "Suggest a breakfast.", "is_classification": False,
         "instances": [{"input": "", "output": "Oatmeal with fruit."}, {"input": "No dairy.", "output": "Toast and jam."}]},
        {"id": "seed_task_1", "name": "sum", "instruction": "Add the numbers.", "is_classification": False,
         "instances": [{"input": "2 and 3", "output": "5"}, {"input": "1 and 1", "output": ""}]},
        {"id": "seed_task_2", "name": "broken", "instances": [{"input": "x", "output": "y"}]},
    ]


def test_self_instruct_records_give_one_pair_per_instance(tmp_path: Path):
    path = tmp_path / "seed_tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in self_instruct_records()))
    source = load_config("tiny", [f"instruct.sources=[{{kind: alpaca, path: '{path}'}}]"]).instruct.sources[0]
    train, held, count = file_conversations(source, 0.0)
    assert [c[0]["content"] for _, c in train] == ["Suggest a breakfast.", "Suggest a breakfast.\n\nNo dairy.",
                                                    "Add the numbers.\n\n2 and 3"]
    assert count.records == 3 and count.pairs == 3
    assert count.dropped == {"empty": 1, "missing_field": 1}
    assert count.example == {"empty": "seed_task_1/instances[1]", "missing_field": "seed_task_2"}
    assert count.line() == (f"instruct source alpaca {path}: 3 records read, 3 pairs; dropped empty 1 (e.g. "
                            "seed_task_1/instances[1]), missing_field 1 (e.g. seed_task_2)")


def test_no_pairs_error_names_the_source_its_fields_and_the_expected_ones(tmp_path: Path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps({"id": f"t{i}", "prompt": "Q", "completion": "A"}) + "\n" for i in range(4)))
    source = load_config("tiny", [f"instruct.sources=[{{kind: alpaca, path: '{path}'}}]"]).instruct.sources[0]
    _, _, count = file_conversations(source, 0.0)
    message = instruct.no_pairs_message([count])
    assert f"instruct source alpaca {path}: 4 records read, 0 pairs; dropped missing_field 4 (e.g. t0)" in message
    assert "Fields found: id, prompt, completion; expected: instruction and output" in message


def _weights(artifact):
    return load_file(str(artifact.path / "model" / "model.safetensors"))


@pytest.mark.slow
def test_reproducible_and_exact_resume_after_sigkill(tmp_path: Path):
    workspace = tmp_path / "ws"
    overrides = [f"workspace={workspace}", "ingest.sources=[{kind: builtin, limit: 25}]", *FAST_TRAINING,
                 "pretrain.steps=40", "pretrain.checkpoint_every=5", "pretrain.eval_every=10"]
    cfg = load_config("tiny", overrides)
    artifacts = run_chain(cfg, "tokenize")
    stage = next(s for s in STAGES if s.name == "pretrain")

    first, _ = run_direct(stage, cfg, {"tokenize": artifacts["tokenize"]})
    reference = _weights(first)
    metrics = first.manifest["metrics"]
    shutil.rmtree(first.path)
    second, _ = run_direct(stage, cfg, {"tokenize": artifacts["tokenize"]})
    again = _weights(second)
    assert all(torch.equal(reference[k], again[k]) for k in reference), "two runs, same weights"
    for name in ("final_train_loss", "final_val_loss"):
        assert second.manifest["metrics"][name] == metrics[name]
    shutil.rmtree(second.path)

    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    worker = subprocess.Popen([sys.executable, str(ROOT / "tests" / "train_worker.py"), *overrides], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = workspace / "pretrain" / f".work-{first.key}" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and worker.poll() is None:
        latest = checkpoints / "latest"
        if latest.exists() and int(latest.read_text().split("-")[1]) >= 15:
            break
        time.sleep(0.05)
    assert worker.poll() is None, "the worker finished before it could be interrupted"
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert not (workspace / "pretrain" / first.key / "manifest.json").exists()

    subprocess.run([sys.executable, str(ROOT / "tests" / "train_worker.py"), *overrides], env=env, check=True,
                   capture_output=True, timeout=300)
    resumed = json.loads((workspace / "pretrain" / first.key / "manifest.json").read_text())
    assert 15 <= resumed["metrics"]["resumed_from_step"] < 40
    weights = load_file(str(workspace / "pretrain" / first.key / "model" / "model.safetensors"))
    assert all(torch.equal(reference[k], weights[k]) for k in reference), "resumed weights differ"
    assert not checkpoints.parent.exists(), "checkpoints removed once the artifact is published"


def test_a_self_instruct_file_trains_and_its_source_is_accounted(trained, tmp_path: Path):
    """The stage on a self-instruct-shaped file: trained on one pair per instance; what the source gave is
    in the manifest and sources.json; a file of another shape stops the stage naming fields found and expected."""
    from jielong.flows.stages import STAGES

    cfg, artifacts = trained
    path = tmp_path / "seed_tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in self_instruct_records() * 4))
    stage = next(s for s in STAGES if s.name == "instruct")
    inputs = {"pretrain": artifacts["pretrain"], "dedup": artifacts["dedup"]}
    ok = config(cfg.workspace, f"instruct.sources=[{{kind: alpaca, path: '{path}'}}]", "instruct.heldout_fraction=0.3")
    artifact, _ = run_direct(stage, ok, inputs)
    manifest = artifact.manifest
    [source] = manifest["details"]["sources"]
    assert source["records_read"] == 12 and source["pairs"] == manifest["counts"]["documents_out"]
    assert manifest["counts"]["documents_rejected"] == 8 and manifest["counts"]["rejected_by_reason"] == {"empty": 4, "missing_field": 4}
    assert source["dropped"]["missing_field"] == {"count": 4, "example_id": "seed_task_2"}
    assert json.loads((artifact.path / "sources.json").read_text()) == [source]
    assert manifest["metrics"]["train_pairs"] > 0

    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "q1", "question": "Why?", "answer": "Because."}) + "\n")
    bad = config(cfg.workspace, f"instruct.sources=[{{kind: alpaca, path: '{other}'}}]")
    with pytest.raises(UserError, match=r"(?s)no training pairs.*1 records read, 0 pairs; dropped missing_field 1 \(e.g. q1\)"
                                        r".*Fields found: id, question, answer; expected: instruction and output"):
        run_direct(stage, bad, inputs)
