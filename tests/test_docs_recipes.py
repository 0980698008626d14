"""docs/loader.md's recipes, run verbatim: the code blocks are read from the page at test time.

Each block runs with the names the page says it expects (``model`` as ``from_config`` leaves it, with
``use_cache=True``; ``tokenizer``; ``tokens``, ``mask``, ``langs``; ``optimizer``) in a fresh folder, against
the real HF Trainer, TRL's SFTTrainer, and two processes under torchrun (gloo).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlmix  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import test_hf  # noqa: E402  (its tiny models, tokenizer and examples)

pytestmark = [pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning"),
              # the Trainer's default dataloader_pin_memory=True on a machine without a GPU (CI's)
              pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator:UserWarning")]


def _block(marker: str) -> str:
    with open(os.path.join(ROOT, "docs", "loader.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"docs/loader.md: {len(found)} python blocks contain {marker!r}"
    return found[0]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tokens, mask = test_hf._examples(60)
    langs = ["en", "de", "sw"] * 20
    model = test_hf._model()
    return {"tokens": tokens, "mask": mask, "langs": langs, "model": model, "tokenizer": test_hf._tokenizer(),
            "optimizer": torch.optim.SGD(model.parameters(), lr=1e-2)}


def test_the_training_loop_runs_as_written(workdir):
    ns = dict(workdir)
    before = [p.detach().clone() for p in ns["model"].parameters()]
    exec(_block("for step, batch in enumerate(loader):"), ns)
    assert os.path.isfile("ckpt.pt") and mlmix.open("sft.store").num_examples == 60
    assert np.isfinite(ns["loss"].detach().item())
    assert any(not torch.equal(a, b) for a, b in zip(before, ns["model"].parameters()))
    assert set(ns["batch"]) >= {"input_ids", "labels", "position_ids", "use_cache"} and "lang_ids" not in ns["batch"]


def test_the_hf_trainer_recipe_runs_as_written(workdir):
    mlmix.write_store("sft.store", workdir["tokens"], seq_len=48, loss_mask=workdir["mask"])
    ns = dict(workdir)
    exec(_block("transformers.Trainer("), ns)
    rows = ns["rows"]
    assert ns["trainer"].state.global_step == 3 * -(-len(rows) // 8)  # the Trainer's default 3 epochs


# TRL's SFTConfig sets a deprecated transformers alias itself (not something a user controls)
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_the_sft_trainer_recipe_runs_as_written(workdir):
    pytest.importorskip("trl")
    mlmix.write_store("sft.store", workdir["tokens"], seq_len=48, loss_mask=workdir["mask"])
    ns = dict(workdir)
    exec(_block("SFTTrainer("), ns)
    trainer = ns["trainer"]
    assert trainer.state.global_step == 3 * -(-len(ns["rows"]) // 8)
    assert any("mean_token_accuracy" in h for h in trainer.state.log_history)


_SCRIPT = '''
import json, os, sys
sys.path.insert(0, {tests!r})
import test_hf
model = test_hf._model()
seen = []
model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].reshape(-1).tolist()), with_kwargs=True)
{extra}
{block}
rank = int(os.environ["RANK"])
with open(f"rank{{rank}}.json", "w") as f:
    json.dump({{"seen": seen, "world": trainer.args.world_size, "step": trainer.state.global_step}}, f)
# as a training script ends (accelerate's end_training): a gloo group left to the interpreter's exit can abort
# there ("terminate called without an active exception"), after the work is done. Even destroyed, the group's
# teardown aborted rank 0 twice in ~20 full test runs (torch 2.13, gloo, after both ranks had written their
# results): the ranks now meet before it, and the interpreter's own teardown is skipped once the files are out
import torch.distributed as dist
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
'''


def _torchrun(script: str, cwd) -> list[dict]:
    path = os.path.join(cwd, "train.py")
    with open(path, "w") as f:
        f.write(script)
    # CPU processes: what `accelerate launch --cpu` sets, and docs/loader.md tells CPU users to set
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", path],
                          cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = []
    for r in range(2):
        with open(os.path.join(cwd, f"rank{r}.json")) as f:
            out.append(json.load(f))
    return out


def test_the_hf_trainer_recipe_on_two_processes(tmp_path):
    """The recipe verbatim under torchrun: each row is trained once per epoch, by one of the processes."""
    tokens, mask = test_hf._examples(60)
    mlmix.write_store(str(tmp_path / "sft.store"), tokens, seq_len=48, loss_mask=mask)
    block = _block("transformers.Trainer(")
    ranks = _torchrun(_SCRIPT.format(tests=HERE, extra="", block=block), tmp_path)
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["step"] == ranks[1]["step"]
    store = mlmix.open(str(tmp_path / "sft.store"))
    steps_per_epoch = ranks[0]["step"] // 3
    # the first epoch's batches of both ranks hold every row's tokens once (the last batch may repeat a
    # few rows to even the ranks out, as accelerate does)
    trained = sum(len(b) for r in ranks for b in r["seen"][:steps_per_epoch])
    assert store.num_tokens <= trained <= store.num_tokens + 2 * 8 * 48
    rows = [store.batch(np.array([i]))["input_ids"][0, :int(store.batch(np.array([i]))["num_tokens"][0])].tolist()
            for i in range(len(store))]
    flat = [tok for r in ranks for b in r["seen"][:steps_per_epoch] for tok in b]
    text = ",".join(map(str, flat))
    assert all(",".join(map(str, row)) in text for row in rows)


_RESUME = '''
import transformers
from mlmix.hf import PackedRows

rows = PackedRows("sft.store")
args = transformers.TrainingArguments(output_dir={out!r}, max_steps={steps}, per_device_train_batch_size=4,
                                      save_steps=1, report_to=[], dataloader_num_workers={workers})
trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=rows.collator())
trainer.train(resume_from_checkpoint={resume!r})
'''


def test_trainer_resume_on_two_processes_is_exact(tmp_path):
    """Two processes (gloo), the Trainer's own resume_from_checkpoint, a stop inside epoch 1."""
    tokens, mask = test_hf._examples(60)
    mlmix.write_store(str(tmp_path / "sft.store"), tokens, seq_len=48, loss_mask=mask)
    n_rows = len(mlmix.open(str(tmp_path / "sft.store")))
    per_epoch = -(-n_rows // 8)
    total, stop = 2 * per_epoch + 1, per_epoch + 2

    def run(out, steps, resume=None, workers=0):
        code = _RESUME.format(out=out, steps=steps, resume=resume, workers=workers)
        return [r["seen"] for r in _torchrun(_SCRIPT.format(tests=HERE, extra="", block=code), tmp_path)]

    full = run("full", total)
    assert run("part", stop) == [r[:stop] for r in full]
    resumed = run("part", total, resume=f"part/checkpoint-{stop}", workers=2)
    assert resumed == [r[stop:] for r in full]
