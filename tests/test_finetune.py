"""python -m gptkernels finetune (gptkernels/finetune.py, classify.py, classify_data.py) on CPU: tiny runs of a few
steps, the metrics against hand-computed values, bad inputs, and the parity of the classifier with Hugging Face's
GPT2ForSequenceClassification."""

import json
import os

import numpy as np
import pytest
import torch

from gptkernels import classify_data as cdata
from gptkernels import data as gkdata
from gptkernels.classify import GPTClassifier, last_non_pad
from gptkernels.cli import main as cli_main
from gptkernels.finetune import finetune
from gptkernels.train import TrainConfigError, load_checkpoint, read_log, train

TINY = dict(model="tiny", block_size=32, batch_size=4, steps=6, warmup=2, log_every=1, eval_every=3, eval_steps=2,
            ckpt_every=0, no_progress=True, device="cpu", backend="cpu")

WORDS = {"fruit": ["apple", "pear", "plum", "fig"], "tool": ["hammer", "saw", "drill", "wrench"],
         "color": ["red", "blue", "green", "teal"]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def task_rows(n, seed):
    rng = np.random.default_rng(seed)
    labels = list(WORDS)
    rows = []
    for _ in range(n):
        label = labels[rng.integers(len(labels))]
        words = rng.choice(WORDS[label], size=rng.integers(2, 9))
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture
def jsonl(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", task_rows(60, 0)), write_jsonl(tmp_path / "val.jsonl",
                                                                                task_rows(20, 1))


def train_losses(log):
    return {r["step"]: r["loss"] for r in read_log(log) if r["kind"] == "train"}


# ------------------------------------------------------------------------------------------------- end to end
def test_classify_runs_logs_and_checkpoints(tmp_path, jsonl):
    m = finetune(TINY, data=jsonl[0], val=jsonl[1], out_dir=str(tmp_path / "run"))
    assert m["steps"] == 6 and m["classes"] == ["color", "fruit", "tool"]
    evals = [r for r in read_log(m["log"]) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6]
    for r in evals:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1 and np.isfinite(r["val_loss"])
    ckpt = load_checkpoint(m["checkpoint"])
    assert ckpt["task"]["kind"] == "classify" and ckpt["task"]["classes"] == m["classes"]
    assert "score.weight" in ckpt["model"] and "gpt.transformer.wte.weight" in ckpt["model"]
    # --eval-only on that checkpoint reproduces the last evaluation.
    e = finetune(eval_only=True, init_from=m["out_dir"], device="cpu", backend="cpu")
    assert e["accuracy"] == pytest.approx(m["eval"]["accuracy"]) and e["confusion"].sum() == 20


def test_lm_task_continues_a_train_checkpoint(tmp_path, text_corpus):
    base = train(TINY, data=text_corpus, out_dir=str(tmp_path / "base"))
    m = finetune(TINY, task="lm", init_from=base["out_dir"], data=text_corpus, model=None, out_dir=str(tmp_path / "lm"))
    rows = read_log(m["log"])
    # Started from the trained weights: the first val loss is the base run's last one (same val batches).
    first_val = next(r["val_loss"] for r in rows if r["kind"] == "eval")
    assert first_val == pytest.approx(base["val_loss"], rel=1e-5)
    ckpt = load_checkpoint(m["checkpoint"])
    assert ckpt["task"]["kind"] == "lm" and "transformer.wte.weight" in ckpt["model"]


@pytest.fixture
def text_corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    import gptkernels

    pkg = os.path.dirname(gptkernels.__file__)
    path.write_bytes(b"".join(open(os.path.join(pkg, n), "rb").read() for n in ("finetune.py", "classify_data.py")))
    return str(path)


def test_resume_is_exact(tmp_path, jsonl):
    opts = dict(TINY, data=jsonl[0], val=jsonl[1], steps=8, dropout=0.1)
    full = finetune(opts, out_dir=str(tmp_path / "full"))
    finetune(opts, out_dir=str(tmp_path / "part"), stop_at=4)
    resumed = finetune(resume=str(tmp_path / "part"), device="cpu", backend="cpu", no_progress=True)
    assert resumed["steps"] == 8
    assert train_losses(resumed["log"]) == train_losses(full["log"])  # bit for bit, fp32 on CPU


@pytest.mark.parametrize("what", ["embeddings", "1"])
def test_freeze_really_freezes(tmp_path, jsonl, what):
    base = train(TINY, steps=2, data=jsonl[0], out_dir=str(tmp_path / "base"))
    m = finetune(TINY, data=jsonl[0], val=jsonl[1], init_from=base["checkpoint"], model=None, freeze=what,
                 out_dir=str(tmp_path / "ft"))
    before = load_checkpoint(base["checkpoint"])["model"]
    after = {k[4:]: v for k, v in load_checkpoint(m["checkpoint"])["model"].items() if k.startswith("gpt.")}
    frozen = ("transformer.wte", "transformer.wpe") if what == "embeddings" else ("transformer.h.0.",)
    for k, v in before.items():
        if k.startswith(frozen):
            assert torch.equal(after[k], v), k
    assert not torch.equal(after["transformer.h.1.mlp.c_fc.weight"], before["transformer.h.1.mlp.c_fc.weight"])
    opt = load_checkpoint(m["checkpoint"])["optimizer"]
    n_trainable = sum(len(g["params"]) for g in opt["param_groups"])
    assert n_trainable < len([k for k in after if k != "lm_head.weight"])


# ----------------------------------------------------------------------------------------------------- metrics
def test_metrics_by_hand():
    target = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    m = cdata.metrics(pred, target, 4)  # class 3: neither true nor predicted: no F1
    # F1 = 2 tp / (2 tp + fp + fn). class 0: tp 2, fp 0, fn 1 -> 4/5; class 1: tp 1, fp 1, fn 1 -> 2/4;
    # class 2: tp 1, fp 1, fn 0 -> 2/3
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
    cm = cdata.confusion_matrix(pred, target, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    b = cdata.majority_baseline(np.array([1, 1, 1, 0, 2]), target, 4)  # always class 1: 2 of 6 right
    # class 1: F1 = 2 tp / (2 tp + fp + fn) = 4 / (4 + 4 + 0); classes 0 and 2: F1 0
    assert b["class"] == 1 and b["accuracy"] == pytest.approx(2 / 6)
    assert b["macro_f1"] == pytest.approx((0 + 4 / 8 + 0) / 3)


def test_batches_pad_truncate_and_mark_the_last_token():
    b = cdata.collate([np.arange(1, 4), np.arange(1, 40)], [0, 1], block_size=8, pad_id=0)
    assert b.x.tolist() == [[1, 2, 3, 0, 0, 0, 0, 0], list(range(1, 9))]
    assert b.last.tolist() == [2, 7] and b.tokens == 3 + 8
    assert b.lm_targets[0].tolist() == [2, 3, -1, -1, -1, -1, -1, -1]  # no target past the last real token


# ------------------------------------------------------------------------------------------------ default task
def test_stdlib_task_splits_by_file_like_the_corpus():
    task = cdata.stdlib_task(per_class={"train": 5, "val": 5})
    train, val = set(task.files["train"]), set(task.files["val"])
    assert train and val and not train & val
    root = gkdata.stdlib_root()
    for rel in val:  # the pre-training corpus's rule: exactly these files are its val files
        assert gkdata.file_split(os.path.join(root, rel), root) == "val"
    for rel in train:
        assert gkdata.file_split(os.path.join(root, rel), root) == "train"
    assert set(task.val.labels.tolist()) == set(range(len(cdata.STDLIB_PACKAGES)))  # every class has val snippets


# -------------------------------------------------------------------------------------------------- bad input
def test_jsonl_errors_name_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    with pytest.raises(gkdata.DataError, match=r"bad.jsonl, line 2: missing field 'label'"):
        cdata.jsonl_task(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(gkdata.DataError, match=r"empty.jsonl: empty"):
        cdata.jsonl_task(str(empty))
    tr = write_jsonl(tmp_path / "tr.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    va = write_jsonl(tmp_path / "va.jsonl", [{"text": "a", "label": "x"}, {"text": "c", "label": "z"}])
    with pytest.raises(gkdata.DataError, match=r"--val .*va.jsonl, line 2: unknown label 'z'"):
        cdata.jsonl_task(tr, va)


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys, jsonl):
    def err(*argv):
        rc = cli_main(["finetune", "--threads", "1", *argv])
        e = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(e) == 1 and "Traceback" not in e[0], e
        return e[0]

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": "x"}, {"label": "y"}])
    assert "bad.jsonl, line 2: missing field 'text'" in err("--model", "tiny", "--data", bad)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    line = err("--hf", str(bert))
    assert "'bert'" in line and "gpt2" in line and "openai-gpt" in line and "gpt_neo" in line
    base = train(TINY, steps=1, data=jsonl[0], out_dir=str(tmp_path / "base"))
    line = err("--init-from", base["out_dir"], "--model", "mini", "--data", jsonl[0])
    assert "--model mini" in line and "tiny" in line and "ckpt.pt" in line
    line = err("--eval-only", "--init-from", base["out_dir"])
    assert "not a finetune classify checkpoint" in line


def test_init_from_checkpoint_model_mismatch_is_named(tmp_path, jsonl):
    base = train(TINY, steps=1, data=jsonl[0], out_dir=str(tmp_path / "base"))
    with pytest.raises(TrainConfigError, match="--model gpt2 .* does not match the checkpoint"):
        finetune(TINY, model="gpt2", init_from=base["out_dir"], data=jsonl[0])


# --------------------------------------------------------------------------------------------- Hugging Face
def test_hf_sequence_classification_parity():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, num_labels=5,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=1)
    hf = transformers.GPT2ForSequenceClassification(cfg).eval()
    ours = GPTClassifier.from_hf(hf, backend="cpu").eval()
    x = torch.randint(1, 97, (4, 20))
    x[0, 15:] = 0  # right padding; row 3 has none
    x[1, 7:] = 0
    x[2, 1:] = 0
    with torch.no_grad():
        ref = hf(input_ids=x).logits
        got, _ = ours(x, last_non_pad(x, cfg.pad_token_id))
    assert last_non_pad(x, 0).tolist() == [14, 6, 0, 19]
    assert (got - ref).abs().max().item() <= 1e-4


def test_hf_start_tokenizes_with_the_folders_tokenizer(tmp_path, jsonl):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([" ".join(w for ws in WORDS.values() for w in ws)] * 20, trainer)
    folder = str(tmp_path / "hf")
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(folder)
    cfg = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    m = finetune(TINY, model=None, block_size=None, hf=folder, data=jsonl[0], val=jsonl[1], out_dir=str(tmp_path / "r"))
    assert m["config"]["vocab_size"] == 300 and m["eval"]["accuracy"] >= 0
    e = finetune(eval_only=True, init_from=m["out_dir"], device="cpu", backend="cpu")  # the tokenizer from --hf again
    assert e["accuracy"] == pytest.approx(m["eval"]["accuracy"])


def test_default_start_is_the_newest_default_train_run(tmp_path, monkeypatch):
    from gptkernels.finetune import default_checkpoint

    monkeypatch.chdir(tmp_path)
    assert default_checkpoint() is None
    tiny = dict(TINY, steps=1, eval_steps=1, corpus_bytes=300_000)
    train(tiny, model="mini", block_size=32, out_dir="runs/a")
    train(tiny, out_dir="runs/b")  # newer, but the tiny preset: not the default run
    assert default_checkpoint() == os.path.join("runs", "a", "ckpt.pt")


def test_eval_only_with_an_unknown_label_names_file_and_line(tmp_path, capsys, jsonl):
    m = finetune(TINY, steps=1, data=jsonl[0], val=jsonl[1], out_dir=str(tmp_path / "run"))
    bad = write_jsonl(tmp_path / "new.jsonl", [{"text": "apple fig", "label": "fruit"}, {"text": "x", "label": "car"}])
    rc = cli_main(["finetune", "--threads", "1", "--eval-only", "--init-from", m["out_dir"], "--val", bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "new.jsonl, line 2: unknown label 'car'; the checkpoint's: color, fruit, tool" in err[0]
