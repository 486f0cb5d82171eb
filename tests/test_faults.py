"""Fault injection: each fault below ends in a clear error or an exact resume, never in lost work.

* `kill -9` while a checkpoint is being written: the restart resumes from the last complete
  checkpoint and ends bit-identical to a run that was never interrupted.
* Corrupted or truncated checkpoint files: the newest checkpoint that restores is used (with a
  warning naming the bad step); if none restores, an error naming the steps tried.
* A full disk or an unwritable checkpoint directory at save time: an error naming the step and
  the directory; the previous checkpoint stays intact and the restart resumes from it.
* Bad configurations: an error naming the field, raised before anything is compiled.
* Data with malformed lines, non-UTF-8 bytes, or an empty split: counted, or a clear error.
* NaN/Inf in the loss: the run stops naming the step; the last good checkpoint restores.
* SIGTERM / SIGINT (preemption, Ctrl-C): the step finishes, a checkpoint is saved (further
  signals during the save change nothing), the process exits with code 75 and says how to
  resume; the resumed run ends bit-identical to one never interrupted.
* A second trainer on a busy workdir: an error naming the PID and host holding it; the lock of
  a `kill -9`ed trainer never blocks a restart.
* Damaged inputs (truncated or corrupted gzip, JSON-lines, safetensors, tokenizer): one error
  naming the file and the problem; no half-made dataset is left behind.
"""

import errno
import glob
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train import tiny_config

from train import c4_builder, checkpoint, checkpoint_io, data, dirlock, preemption, trainer

# orbax leaves coroutines of a failed restore unawaited; they only warn when collected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
REPO = Path(__file__).resolve().parent.parent
TMP = ".orbax-checkpoint-tmp"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("c4")
  data.ensure_bundled_prepared(out)
  return str(out)


def _like(config):
  return trainer.init_state(trainer.build(config), config.train.seed)


def _final(config, workdir):
  """(state, data_state) of the newest checkpoint in `workdir`."""
  return checkpoint.Checkpointer(Path(workdir) / "checkpoints").restore_latest(_like(config))


def _assert_same_state(a, b):
  (s1, d1), (s2, d2) = a, b
  assert int(s1.step) == int(s2.step)
  assert d1 == d2  # the data iterator's position
  for x, y in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _losses(workdir, key="loss"):
  """{step: value} of the last record of each step (a resumed run rewrites its steps)."""
  return {r["step"]: r[key] for r in trainer.load_metrics(workdir) if key in r}


def _steps(directory):
  return sorted(os.listdir(directory))


# ------------------------------------------------------------------------------------------
# 1. kill -9 while writing a checkpoint.

KILL_RUN = dict(num_steps=8, checkpoint_every=2, eval_every=4)
KILL_STEP = 6  # killed while saving step 6: steps 2 and 4 are complete, 6 is not

CHILD = """
import sys, time
from pathlib import Path
sys.path[:0] = [{repo!r}, {tests!r}]
import orbax.checkpoint as ocp
from test_train import tiny_config
from train import trainer

Atomic = ocp.path.atomicity.AtomicRenameTemporaryPath
finalize = Atomic.finalize


async def finalize_then_hang(self):
  # Step {step}'s arrays are on disk in its tmp folder; its `state` item is about to be renamed
  # into place, and the step folder after it. Announce that, then wait for SIGKILL.
  tmp = Path(str(self.get()))
  if tmp.parent.name.startswith("{step}{tmp}") and tmp.name.startswith("state"):
    Path({marker!r}).write_text(str(tmp))
    time.sleep(600)
  return await finalize(self)


Atomic.finalize = finalize_then_hang
trainer.train_and_evaluate(tiny_config({data_dir!r}, **{run!r}), {workdir!r})
"""


def test_kill_during_checkpoint_write_resumes_bit_identical(data_dir, tmp_path, capsys):
  workdir, marker = tmp_path / "killed", tmp_path / "mid_save"
  script = tmp_path / "child.py"
  script.write_text(
    CHILD.format(
      repo=str(REPO),
      tests=str(REPO / "tests"),
      step=KILL_STEP,
      tmp=TMP,
      marker=str(marker),
      data_dir=data_dir,
      run=KILL_RUN,
      workdir=str(workdir),
    )
  )
  log = tmp_path / "child.log"
  with open(log, "w") as out:
    child = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=out, stderr=out)
    deadline = time.time() + 300
    while not marker.exists():
      assert child.poll() is None, f"child exited before the save hook:\n{log.read_text()}"
      if time.time() > deadline:
        child.kill()
        pytest.fail(f"the save hook never ran:\n{log.read_text()}")
      time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
  assert child.returncode == -signal.SIGKILL

  ckpts = workdir / "checkpoints"
  (leftover,) = ckpts.glob(f"{KILL_STEP}{TMP}*")  # the half-written step ...
  assert [p for p in leftover.rglob("*") if p.is_file() and p.stat().st_size]  # ... has files
  assert {"2", "4"} <= set(_steps(ckpts))
  # orbax does not list the unfinished step: the newest complete checkpoint is step 4.
  assert checkpoint.Checkpointer(ckpts).latest_step() == 4

  config = tiny_config(data_dir, **KILL_RUN)
  trainer.train_and_evaluate(config, workdir)  # the restart, same workdir and config
  out = capsys.readouterr().out
  assert f"Removing unfinished checkpoint {leftover}" in out
  assert f"Resumed from step 4 in {ckpts}" in out
  assert _steps(ckpts) == ["6", "8"]  # the leftover is gone, step 6 rewritten

  straight = tmp_path / "straight"
  trainer.train_and_evaluate(config, straight)
  _assert_same_state(_final(config, workdir), _final(config, straight))
  assert _losses(workdir) == _losses(straight)  # steps 5-8 retrained, logged identically
  assert _losses(workdir, "eval_loss") == _losses(straight, "eval_loss")


# ------------------------------------------------------------------------------------------
# 2. Corrupted or truncated checkpoints.

REF_RUN = dict(num_steps=4, checkpoint_every=2, eval_every=100)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """A 4-step run with checkpoints at steps 2 and 4 (never modified: tests copy it)."""
  workdir = tmp_path_factory.mktemp("reference")
  config = tiny_config(data_dir, **REF_RUN)
  trainer.train_and_evaluate(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints")
  like = _like(config)
  return dict(
    config=config, workdir=workdir, step2=ckpt.restore(2, like), step4=ckpt.restore(4, like)
  )


def _array_files(step_dir):
  return sorted(glob.glob(f"{step_dir}/state/**/d/*", recursive=True), key=os.path.getsize)


def _flip_bytes(step_dir):
  """64 bytes in the middle of the largest array file inverted (no size change)."""
  path = _array_files(step_dir)[-1]
  raw = bytearray(Path(path).read_bytes())
  middle = len(raw) // 2
  raw[middle : middle + 64] = bytes(b ^ 0xFF for b in raw[middle : middle + 64])
  Path(path).write_bytes(bytes(raw))
  return path


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  return path


CORRUPTIONS = {
  # orbax alone restores this one silently (garbage values); the saved checksums catch it.
  # Which arrays the largest data file holds depends on OCDBT's layout: any one may be named.
  "flipped_array_bytes": (_flip_bytes, r"do not match the checksums .*: \.(params|opt_state)"),
  "truncated_array_file": (lambda d: _truncate(_array_files(d)[-1]), r"reading array"),
  "deleted_array_file": (lambda d: os.remove(_array_files(d)[-1]), r"reading array"),
  "truncated_array_metadata": (lambda d: _truncate(f"{d}/state/_METADATA"), r"JSON|string"),
  "truncated_data_json": (lambda d: _truncate(f"{d}/data/metadata"), r"JSON|string"),
  "deleted_state_folder": (lambda d: shutil.rmtree(f"{d}/state"), r'"state" was not found'),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupted_newest_checkpoint_falls_back_to_the_previous(reference, tmp_path, capsys, name):
  ckpts = tmp_path / "checkpoints"
  shutil.copytree(reference["workdir"] / "checkpoints", ckpts)
  corrupt, error = CORRUPTIONS[name]
  corrupt(ckpts / "4")
  state, data_state = checkpoint.Checkpointer(ckpts).restore_latest(_like(reference["config"]))
  _assert_same_state((state, data_state), reference["step2"])
  err = capsys.readouterr().err
  assert re.search(rf"checkpoint step 4 in {ckpts} cannot be restored: .*{error}", err), err
  assert f"resuming from step 2, the newest checkpoint in {ckpts}" in err
  assert _steps(ckpts) == ["2", "4"]  # a plain restore renames and deletes nothing


def test_trainer_resumes_past_a_corrupted_checkpoint_bit_identical(reference, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(reference["workdir"], workdir)
  _flip_bytes(workdir / "checkpoints" / "4")
  trainer.train_and_evaluate(reference["config"], workdir)
  out, err = capsys.readouterr()
  assert "Resumed from step 2" in out and "moved unrestorable checkpoint step 4" in err
  # The bad step is kept aside for inspection; steps 3-4 were retrained exactly.
  assert _steps(workdir / "checkpoints") == ["2", "4", f"4{checkpoint.UNRESTORABLE_SUFFIX}"]
  _assert_same_state(_final(reference["config"], workdir), reference["step4"])


def test_no_restorable_checkpoint_is_an_error_naming_the_steps(reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference["workdir"], workdir)
  ckpts = workdir / "checkpoints"
  _flip_bytes(ckpts / "4")
  _truncate(ckpts / "2" / "data" / "metadata")
  pattern = rf"no checkpoint in {ckpts} can be restored \(tried steps \[4, 2\]\): step 4: .*step 2"
  with pytest.raises(checkpoint.CheckpointError, match=pattern):
    checkpoint.Checkpointer(ckpts).restore_latest(_like(reference["config"]))
  # The trainer does not start from scratch over them, and renames or deletes nothing.
  with pytest.raises(checkpoint.CheckpointError, match=pattern):
    trainer.train_and_evaluate(reference["config"], workdir)
  assert _steps(ckpts) == ["2", "4"]


# ------------------------------------------------------------------------------------------
# 3. Full disk / unwritable checkpoint directory at save time.


def _no_space(monkeypatch):
  """Writing any checkpoint's JSON items (data position, checksums) fails with ENOSPC."""

  async def full(self, x, directory):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))

  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", full)


def _mkdir_fails(code):
  """Creating any folder inside the checkpoint directory fails with `code` (EACCES is what a
  read-only directory gives, ENOSPC a full disk)."""

  def inject(monkeypatch, ckpts):
    mkdir = os.mkdir

    def failing(path, *args, **kwargs):
      if Path(path).parent == ckpts:
        raise OSError(code, os.strerror(code), str(path))
      return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", failing)

  return inject


def _unwritable_by_chmod(monkeypatch, ckpts):
  os.chmod(ckpts, 0o555)


SAVE_FAULTS = {  # fault: (injection, the error named in the message)
  "disk_full_writing": (lambda mp, ckpts: _no_space(mp), r"OSError: \[Errno 28\] No space left"),
  "disk_full_mkdir": (_mkdir_fails(errno.ENOSPC), r"OSError: \[Errno 28\] No space left"),
  "unwritable_patched": (_mkdir_fails(errno.EACCES), r"PermissionError: \[Errno 13\]"),
  "unwritable_chmod": (_unwritable_by_chmod, r"PermissionError: \[Errno 13\]"),
}


@pytest.mark.parametrize("fault", SAVE_FAULTS)
def test_failed_save_is_an_error_and_the_previous_checkpoint_survives(
  reference, tmp_path, monkeypatch, fault
):
  if fault == "unwritable_chmod" and os.geteuid() == 0:
    pytest.skip("running as root: chmod does not stop root's writes (unwritable_patched covers it)")
  workdir = tmp_path / "run"
  shutil.copytree(reference["workdir"], workdir)
  ckpts = workdir / "checkpoints"
  shutil.rmtree(ckpts / "4")  # as if the run had stopped after step 2
  inject, error = SAVE_FAULTS[fault]
  with monkeypatch.context() as patch:
    inject(patch, ckpts)
    pattern = rf"saving checkpoint step 4 to {ckpts / '4'} failed: {error}.*previous checkpoint "
    with pytest.raises(checkpoint.CheckpointError, match=pattern + r"\(step 2\)"):
      trainer.train_and_evaluate(reference["config"], workdir)
  os.chmod(ckpts, 0o755)
  assert "2" in _steps(ckpts) and "4" not in _steps(ckpts)
  _assert_same_state(_final(reference["config"], workdir), reference["step2"])
  trainer.train_and_evaluate(reference["config"], workdir)  # space freed: resume from step 2
  _assert_same_state(_final(reference["config"], workdir), reference["step4"])


# ------------------------------------------------------------------------------------------
# 4. Bad configurations: a named error before any compilation.

BAD_CONFIGS = [  # (field, value, what the message says after `config.<field>=<value>`)
  ("optimizer.name", "sgdw", "is not one of"),
  # GaLore's own options: galore_jax's check, with the config field named first.
  ("optimizer.proj_type", "diagonal", "is refused by galore_jax: proj_type must be one of"),
  ("optimizer.subspace_method", "qr", "subspace_method must be one of"),
  ("optimizer.on_refresh", "forget", "on_refresh must be one of"),
  ("optimizer.rank", 0, "`rank` must be a Python int >= 1"),
  ("optimizer.update_proj_gap", 0, "`update_proj_gap` must be a Python int >= 1"),
  ("optimizer.power_iters", 0, "must be an int >= 1", {"optimizer.subspace_method": "randomized"}),
  (
    "optimizer.oversample",
    -1,
    "must be a Python int >= 0",
    {"optimizer.subspace_method": "randomized"},
  ),  # fmt: skip
  ("optimizer.learning_rate", -1e-3, r"must be a number in \(0, inf\)"),
  ("optimizer.warmup_fraction", 1.5, r"must be a number in \[0, 1\]"),
  ("optimizer.min_lr_ratio", -0.1, r"must be a number in \[0, 1\]"),
  ("optimizer.b1", 1.0, r"must be a number in \[0, 1\)"),
  ("optimizer.b2", -0.5, r"must be a number in \[0, 1\)"),
  ("optimizer.eps", 0.0, r"must be a number in \(0, inf\)"),
  ("optimizer.weight_decay", -0.1, r"must be a number in \[0, inf\)"),
  ("optimizer.grad_clip_norm", -1.0, r"must be a number in \[0, inf\)"),
  ("optimizer.scale", 0.0, "must be a number > 0"),
  ("optimizer.projector_dtype", "float8", "is not one of"),
  ("optimizer.inner", "sgdw", "is not one of", {"optimizer.name": "galore"}),
  ("model.size", "13m", "is not one of"),
  ("model.dtype", "float17", "is not one of"),
  ("model.param_dtype", "int8", "is not one of"),
  ("model.remat_policy", "sometimes", "is not one of"),
  ("model.attention_chunk_size", -64, "must be an int >= 0"),
  ("model.num_heads", 3, "must split config.model.hidden_dim=32 into heads of even size"),
  ("train.num_steps", 0, "must be an int >= 1"),
  ("train.log_every", 0, "must be an int >= 1"),
  ("train.keep_checkpoints", 0, "must be an int >= 1"),
  (
    "train.batch_size",
    4,
    "is not divisible by config.train.grad_accum_steps=3",
    {"train.grad_accum_steps": 3},
  ),  # fmt: skip
  (
    "train.fused_update",
    True,
    "needs config.model.scan_layers=True",
    {"model.scan_layers": False},
  ),  # fmt: skip
  ("data.mode", "stream", "is not one of"),
  ("data.seq_len", 1, "must be an int >= 2"),
  ("data.eval_max_documents", -1, "must be an int >= 0"),
  ("mesh.fsdp", 0, r"must be an int >= 1, or -1"),
  ("data.data_dir", "{tmp}/nowhere", "does not exist"),
  ("data.data_dir", "{tmp}", "has no prepared C4"),
  ("data.vocab_path", "{tmp}/vocab.txt", "is not a usable SentencePiece model"),
  ("data.vocab_path", "{tmp}/missing.model", "is not a file"),
  ("data.train_split", "test", "cannot be read from"),
  ("data.eval_split", "validation[:0]", "has no documents in"),  # an empty split
]


def _never(*args, **kwargs):
  raise AssertionError("reached state init or compilation with a bad config")


def _set(config, field, value):
  section, key = field.split(".")
  config[section][key] = value


@pytest.mark.parametrize("row", BAD_CONFIGS, ids=lambda r: f"{r[0]}={r[1]}")
def test_bad_config_is_a_named_error_before_compiling(data_dir, tmp_path, monkeypatch, row):
  field, value, why, *others = row
  (tmp_path / "vocab.txt").write_text("hello\nworld\n")  # a vocabulary that is not a model
  if isinstance(value, str):
    value = value.format(tmp=tmp_path)
  config = tiny_config(data_dir)
  for other, v in (others[0] if others else {}).items():
    _set(config, other, v)
  _set(config, field, value)

  monkeypatch.setattr(jax.stages.Lowered, "compile", _never)
  monkeypatch.setattr(trainer, "init_state", _never)
  with pytest.raises(ValueError) as e:
    trainer.train_and_evaluate(config, tmp_path / "run")
  message = str(e.value)
  assert message.startswith(f"config.{field}={value!r} "), message
  assert re.search(why, message), message
  assert not (tmp_path / "run").exists()  # nothing written either


def test_batch_not_divisible_by_the_data_axis_before_compiling(data_dir, tmp_path, monkeypatch):
  """Counts as one more bad configuration: 6 rows over a 4-device data axis."""
  config = tiny_config(data_dir, batch_size=6, eval_batch_size=8)
  monkeypatch.setattr(jax, "device_count", lambda: 4)
  monkeypatch.setattr(jax.stages.Lowered, "compile", _never)
  monkeypatch.setattr(trainer, "init_state", _never)
  with pytest.raises(ValueError, match=r"^config\.train\.batch_size=6 .* not divisible by the 4 "):
    trainer.train_and_evaluate(config, tmp_path / "run")


# ------------------------------------------------------------------------------------------
# 5. Malformed data and empty splits.


def _jsonl(path, lines):
  path.write_bytes(b"".join(line + b"\n" for line in lines))
  return str(path)


def _doc(i):
  return json.dumps({"text": f"Document {i}: " + "some words of C4-like text. " * 30}).encode()


@pytest.mark.parametrize("split", ["train", "validation"])
def test_split_with_only_bad_records_is_a_clear_error(data_dir, tmp_path, split):
  good = _jsonl(tmp_path / "good.jsonl", [_doc(i) for i in range(8)])
  bad = _jsonl(tmp_path / "bad.jsonl", [b"not json", b'{"url": "x"}', b"", b'{"text": "  "}'])
  out = tmp_path / "tfds"
  train, validation = (bad, good) if split == "train" else (good, bad)
  pattern = rf"C4 split '{split}' would have no documents in {out}: .*malformed=3, empty=1"
  with pytest.raises(ValueError, match=pattern):
    c4_builder.prepare(out, train_patterns=[train], validation_patterns=[validation])
  assert not out.exists()  # nothing half-made: the folder prepare created is gone too
  config = tiny_config(str(out))
  with pytest.raises(ValueError, match=r"^config\.data\.data_dir=.* does not exist; prepare C4"):
    trainer.train_and_evaluate(config, tmp_path / "run")


def test_messy_data_is_counted_and_trains(tmp_path):
  docs = [_doc(i) for i in range(12)]
  latin1 = b'{"text": "caf\xe9 ' + b"au lait, " * 40 + b'"}'  # not UTF-8: kept with U+FFFD
  train = docs[:6] + [b"{broken", latin1, b'{"text": ""}'] + docs[6:]
  summary = c4_builder.prepare(
    tmp_path / "tfds",
    train_patterns=[_jsonl(tmp_path / "train.jsonl", train)],
    validation_patterns=[_jsonl(tmp_path / "val.jsonl", docs[:4] + [b"[1, 2]"])],
  )
  totals = summary.totals()
  assert (totals.malformed, totals.empty, totals.non_utf8) == (2, 1, 1)
  assert summary.documents == {"train": 13, "validation": 4}
  assert "Skipped 2 malformed lines and 1 empty documents; 1 lines had invalid UTF-8" in str(
    summary
  )
  config = tiny_config(str(tmp_path / "tfds"), num_steps=2, eval_every=2, checkpoint_every=2)
  final = trainer.train_and_evaluate(config, tmp_path / "run")
  assert final["eval_tokens"] > 0 and math.isfinite(final["eval_loss"])


# ------------------------------------------------------------------------------------------
# 6. NaN/Inf in the loss.


def test_non_finite_loss_names_the_step_and_the_last_good_checkpoint_restores(data_dir, tmp_path):
  # lr(0) = 0, then 1e30 / 6 per step of warmup: step 2's update overflows, step 3's loss is NaN.
  config = tiny_config(data_dir, num_steps=12, checkpoint_every=2, eval_every=100)
  config.optimizer.update(name="adamw", learning_rate=1e30, warmup_fraction=0.5)
  with pytest.raises(trainer.TrainingDiverged) as e:
    trainer.train_and_evaluate(config, tmp_path)
  named = r"non-finite [^:.]* at step (\d+).*last good checkpoint \(step (\d+)\)"
  m = re.search(named, str(e.value))
  assert m, str(e.value)
  bad, good = int(m[1]), int(m[2])
  assert 0 < good <= bad
  state, _ = checkpoint.Checkpointer(tmp_path / "checkpoints").restore_latest(_like(config))
  assert int(state.step) == good
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    assert np.isfinite(np.asarray(leaf, np.float64)).all()
  losses = _losses(tmp_path)
  assert all(math.isfinite(losses[s]) for s in range(1, good + 1))


def test_non_finite_parameters_are_never_checkpointed(data_dir, tmp_path):
  """Step 1's loss is finite, but its update (lr = inf in float32) makes the parameters NaN:
  the loss check alone would save them as step 1, the "last good checkpoint"."""
  config = tiny_config(data_dir, num_steps=4, checkpoint_every=1, eval_every=100)
  config.optimizer.update(name="adamw", learning_rate=1e39, warmup_fraction=0.0)
  named = r"non-finite parameters/optimizer state at step 1 .*last good checkpoint \(none\)"
  with pytest.raises(trainer.TrainingDiverged, match=named):
    trainer.train_and_evaluate(config, tmp_path)
  assert math.isfinite(_losses(tmp_path)[1])
  assert checkpoint.Checkpointer(tmp_path / "checkpoints").latest_step() is None


# ------------------------------------------------------------------------------------------
# 7. SIGTERM / SIGINT: finish the step, save, exit 75, resume bit-identical.

SIGNAL_RUN = dict(num_steps=8, checkpoint_every=100, eval_every=4)  # only the signal saves

MAIN_CHILD = """
import runpy, sys, time
from pathlib import Path
sys.path[:0] = [{repo!r}]
import orbax.checkpoint as ocp
from train import trainer

# Timing hooks only; the run itself is `python -m train.main` unchanged. When step {pause_at}'s
# metrics are logged (while step {pause_at} + 1 runs), announce it and pause, so that the test's
# signal arrives inside the training loop.
log_step = trainer._StepLog.__call__


def log_then_pause(self, step_done, out):
  values = log_step(self, step_done, out)
  if step_done == {pause_at}:
    Path({marker!r}).write_text("in the loop")
    time.sleep({pause_s})
  return values


trainer._StepLog.__call__ = log_then_pause
Atomic = ocp.path.atomicity.AtomicRenameTemporaryPath
finalize = Atomic.finalize


async def announce_then_finalize(self):
  # The save's arrays are written; pause before they are renamed into place, so that the
  # test's next signals arrive during the save.
  if {save_marker!r} and Path(str(self.get())).name.startswith("state"):
    Path({save_marker!r}).write_text("saving")
    time.sleep(2)
  return await finalize(self)


Atomic.finalize = announce_then_finalize
sys.argv = ["train/main.py", *{argv!r}]
runpy.run_module("train.main", run_name="__main__")
"""

CONFIG_FILE = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from test_train import tiny_config


def get_config():
  return tiny_config({data_dir!r}, **{run!r})
"""


def _start_main(tmp_path, data_dir, workdir, *, pause_at, pause_s, save_marker="", run=None):
  """`python -m train.main` on a tiny config file, paused at `pause_at` (see MAIN_CHILD)."""
  config_file = tmp_path / "tiny_config.py"
  config_file.write_text(
    CONFIG_FILE.format(
      repo=str(REPO), tests=str(REPO / "tests"), data_dir=data_dir, run=run or SIGNAL_RUN
    )
  )
  argv = [f"--config={config_file}", f"--workdir={workdir}"]
  marker = tmp_path / "in_loop"
  script = tmp_path / "main_child.py"
  script.write_text(
    MAIN_CHILD.format(
      repo=str(REPO),
      pause_at=pause_at,
      pause_s=pause_s,
      marker=str(marker),
      save_marker=str(save_marker),
      argv=argv,
    )
  )
  log = tmp_path / "child.log"
  with open(log, "w") as out:
    child = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=out, stderr=out)
  _wait_for(marker, child, log)
  return child, log, argv


def _wait_for(marker, child, log, seconds=300):
  deadline = time.time() + seconds
  while not marker.exists():
    if child.poll() is not None:
      pytest.fail(f"the child exited ({child.returncode}) before {marker.name}:\n{log.read_text()}")
    if time.time() > deadline:
      child.kill()
      pytest.fail(f"no {marker.name} after {seconds} s:\n{log.read_text()}")
    time.sleep(0.05)


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
  """SIGNAL_RUN trained without interruption."""
  workdir = tmp_path_factory.mktemp("straight")
  trainer.train_and_evaluate(tiny_config(data_dir, **SIGNAL_RUN), workdir)
  return workdir


SIGNAL_CASES = {  # name: (first signal, signals sent during the save, step logged at the pause)
  # Paused while step 4 runs: step 4 is saved, then its scheduled eval runs.
  "sigterm": (signal.SIGTERM, (), 3),
  # Paused while step 3 runs; SIGTERM and SIGINT again while step 3 is being saved.
  "sigint_then_more_during_the_save": (signal.SIGINT, (signal.SIGTERM, signal.SIGINT), 2),
}


@pytest.mark.parametrize("name", SIGNAL_CASES)
def test_signal_saves_the_step_exits_75_and_resumes_bit_identical(
  data_dir, tmp_path, straight, capsys, name
):
  first, during_save, pause_at = SIGNAL_CASES[name]
  stop_step = pause_at + 1
  workdir, save_marker = tmp_path / "run", tmp_path / "saving"
  child, log, argv = _start_main(
    tmp_path,
    data_dir,
    workdir,
    pause_at=pause_at,
    pause_s=2,
    save_marker=save_marker if during_save else "",
  )
  child.send_signal(first)
  if during_save:
    _wait_for(save_marker, child, log)
    for sig in during_save:
      child.send_signal(sig)
      time.sleep(0.2)
  assert child.wait(timeout=300) == preemption.EXIT_CODE, log.read_text()
  text = log.read_text()
  name_of = lambda sig: signal.Signals(sig).name  # noqa: E731
  ckpts = workdir / "checkpoints"
  assert f"Stopped by {name_of(first)} after step {stop_step}; its checkpoint is saved in" in text
  resume = f"To resume, run the same command: python -m train.main {' '.join(argv)}"
  assert resume in text.splitlines(), text
  for sig in during_save:
    assert f"Received {name_of(sig)} again: stopping as soon as the checkpoint is on disk" in text
  assert _steps(ckpts) == [str(stop_step)]  # complete (renamed into place), nothing else
  assert "Traceback" not in text
  records = trainer.load_metrics(workdir)  # flushed before the exit
  assert max(r["step"] for r in records if "loss" in r) == stop_step
  assert any("checkpoint_seconds" in r for r in records)

  config = tiny_config(data_dir, **SIGNAL_RUN)
  trainer.train_and_evaluate(config, workdir)  # the same command, run again
  assert f"Resumed from step {stop_step} in {ckpts}" in capsys.readouterr().out
  _assert_same_state(_final(config, workdir), _final(config, straight))
  assert _losses(workdir) == _losses(straight)
  assert _losses(workdir, "eval_loss") == _losses(straight, "eval_loss")


def test_signal_handlers_are_restored_after_a_run(data_dir, tmp_path, monkeypatch):
  """In-process (a library user's view): the previous handlers come back, preempted or not."""
  config = tiny_config(data_dir, num_steps=4, checkpoint_every=100, eval_every=100)
  before = {sig: signal.getsignal(sig) for sig in preemption.SIGNALS}
  trainer.train_and_evaluate(config, tmp_path / "done")
  assert {sig: signal.getsignal(sig) for sig in preemption.SIGNALS} == before

  log_step = trainer._StepLog.__call__

  def log_then_interrupt(self, step_done, out):
    if step_done == 1:
      signal.raise_signal(signal.SIGINT)  # Ctrl-C: no KeyboardInterrupt inside the loop
    return log_step(self, step_done, out)

  monkeypatch.setattr(trainer._StepLog, "__call__", log_then_interrupt)
  with pytest.raises(preemption.Preempted, match="Stopped by SIGINT after step 2") as e:
    trainer.train_and_evaluate(config, tmp_path / "stopped")
  assert e.value.step == 2
  assert {sig: signal.getsignal(sig) for sig in preemption.SIGNALS} == before
  assert _steps(tmp_path / "stopped" / "checkpoints") == ["2"]
  assert not dirlock.is_locked(tmp_path / "stopped")  # released on the way out


# ------------------------------------------------------------------------------------------
# 8. The workdir lock.


def test_second_trainer_stops_at_once_and_a_killed_holder_never_blocks(
  data_dir, tmp_path, monkeypatch, capsys
):
  workdir = tmp_path / "run"
  run = dict(num_steps=8, checkpoint_every=2, eval_every=100)
  child, log, argv = _start_main(tmp_path, data_dir, workdir, pause_at=3, pause_s=600, run=run)
  try:
    _wait_for(workdir / "checkpoints" / "2", child, log)  # its save is complete on disk
    listing = sorted(str(p) for p in workdir.rglob("*"))
    holder = rf"PID {child.pid} on host {re.escape(socket.gethostname())} \(started "
    config = tiny_config(data_dir, **run)
    with monkeypatch.context() as patch:
      patch.setattr(jax.stages.Lowered, "compile", _never)
      with pytest.raises(dirlock.DirectoryInUse, match=rf"workdir {workdir} is in use: {holder}"):
        trainer.train_and_evaluate(config, workdir)
    assert sorted(str(p) for p in workdir.rglob("*")) == listing  # nothing written or removed
    # The command line: one line on stderr, exit code 1, no traceback.
    second = subprocess.run(
      [sys.executable, "-m", "train.main", *argv], cwd=REPO, capture_output=True, text=True
    )
    assert second.returncode == 1
    assert re.fullmatch(rf"train\.main: error: workdir .* is in use: {holder}.*\n", second.stderr)
  finally:
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
  # The lock file still names the dead trainer, but its flock died with it: a restart runs.
  assert f'"pid": {child.pid}' in (workdir / dirlock.LOCK_FILE).read_text()
  trainer.train_and_evaluate(config, workdir)
  assert f"Resumed from step 2 in {workdir / 'checkpoints'}" in capsys.readouterr().out
  assert f'"pid": {os.getpid()}' in (workdir / dirlock.LOCK_FILE).read_text()


# ------------------------------------------------------------------------------------------
# 9. Damaged inputs outside the checkpoint folder.


def _gz_sample():
  return (REPO / "data" / "c4-sample.00000-of-00001.json.gz").read_bytes()


def _flip_middle(raw):
  middle = len(raw) // 2
  return raw[:middle] + bytes(b ^ 0xFF for b in raw[middle : middle + 64]) + raw[middle + 64 :]


DAMAGED_INPUTS = {  # name: (file name, its bytes, what the error says)
  "truncated_gzip": ("c4.json.gz", lambda: _gz_sample()[:200_000], r"gzip stream is truncated"),
  "corrupted_gzip": ("c4.json.gz", lambda: _flip_middle(_gz_sample()), r"stream is corrupted"),
  "truncated_jsonl": (
    "c4.jsonl",
    lambda: b"".join(_doc(i) + b"\n" for i in range(8)) + _doc(8)[:40],
    r":9: the file ends inside a record .* truncated",
  ),
  "zeroed_block_jsonl": (
    "c4.jsonl",
    lambda: b"".join(_doc(i) + b"\n" for i in range(4)) + bytes(4096) + b"\n" + _doc(5) + b"\n",
    r":5: NUL bytes; the file is corrupted",
  ),
}


@pytest.mark.parametrize("name", DAMAGED_INPUTS)
def test_damaged_data_file_is_one_error_and_leaves_nothing(data_dir, tmp_path, name):
  file_name, content, problem = DAMAGED_INPUTS[name]
  damaged = tmp_path / file_name
  damaged.write_bytes(content())
  validation = _jsonl(tmp_path / "val.jsonl", [_doc(i) for i in range(4)])
  out = tmp_path / "tfds"
  with pytest.raises(c4_builder.DamagedFileError, match=rf"^{damaged}.*{problem}.* again"):
    c4_builder.prepare(out, train_patterns=[str(damaged)], validation_patterns=[validation])
  assert not out.exists()  # not even an empty c4/en folder
  # --overwrite over a prepared dataset: the old one stays until a new one is complete.
  shutil.copytree(data_dir, out)
  with pytest.raises(c4_builder.DamagedFileError):
    c4_builder.prepare(
      out, train_patterns=[str(damaged)], validation_patterns=[validation], overwrite=True
    )
  assert sorted(os.listdir(out)) == sorted(os.listdir(data_dir))
  assert data.num_documents(out, "train") == 2000


def test_prepare_data_command_prints_one_line_for_a_damaged_file(tmp_path):
  damaged = tmp_path / "c4-train.json.gz"
  damaged.write_bytes(_gz_sample()[:200_000])
  validation = _jsonl(tmp_path / "val.jsonl", [_doc(i) for i in range(4)])
  out = tmp_path / "tfds"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "train.prepare_data",
      f"--output_dir={out}",
      f"--train={damaged}",
      f"--validation={validation}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]  # (tqdm's bar comes before it)
  assert last.startswith(f"prepare_data: error: {damaged}: the gzip stream is truncated")
  assert "Traceback" not in result.stderr and not out.exists()


def test_a_killed_prepare_leaves_a_build_the_next_one_removes(tmp_path, capsys):
  out = tmp_path / "tfds"
  abandoned = out / ".c4-building-killed"
  (abandoned / "c4" / "en").mkdir(parents=True)
  (abandoned / dirlock.LOCK_FILE).write_text('{"pid": 1}')  # its flock died with it
  files = [_jsonl(tmp_path / f"{s}.jsonl", [_doc(i) for i in range(6)]) for s in ("t", "v")]
  c4_builder.prepare(out, train_patterns=[files[0]], validation_patterns=[files[1]])
  assert f"Removing {abandoned}, an unfinished dataset" in capsys.readouterr().out
  assert sorted(os.listdir(out)) == ["c4"] and c4_builder.is_prepared(out)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny Hugging Face checkpoint (config.json, model.safetensors, tokenizer.model)."""
  from flax import nnx  # noqa: PLC0415

  from train.model import Llama, llama_config  # noqa: PLC0415

  config = llama_config("9m", hidden_dim=32, mlp_dim=64, num_heads=2, num_layers=2)
  path = tmp_path_factory.mktemp("hf") / "ckpt"
  return checkpoint_io.save_hf_pretrained(
    config, Llama(config, rngs=nnx.Rngs(0)), path, tokenizer_path=data.BUNDLED_VOCAB
  )


def _damage(path, how):
  raw = path.read_bytes()
  damaged = {
    "truncated": raw[: len(raw) // 2],
    "cut_by_one_byte": raw[:-1],
    "corrupted_header": raw[:8] + b"#" * 32 + raw[40:],
    "empty": b"",
  }[how]
  path.write_bytes(damaged)


@pytest.mark.parametrize("how", ["truncated", "cut_by_one_byte", "corrupted_header", "empty"])
def test_damaged_init_from_weights_are_one_error_naming_the_file(
  data_dir, hf_dir, tmp_path, monkeypatch, how
):
  ckpt = shutil.copytree(hf_dir, tmp_path / "ckpt")
  _damage(ckpt / "model.safetensors", how)
  config = tiny_config(data_dir)
  config.init_from = str(ckpt)
  config.model.update(hidden_dim=0, mlp_dim=0, num_heads=0, num_layers=0)  # from config.json
  monkeypatch.setattr(jax.stages.Lowered, "compile", _never)
  pattern = (
    rf"^config\.init_from='{ckpt}' cannot be loaded: {ckpt / 'model.safetensors'} cannot be "
    r"read \(.*\): the file is truncated or corrupted .*get it again\.$"
  )
  with pytest.raises(ValueError, match=pattern):
    trainer.train_and_evaluate(config, tmp_path / "run")


TOKENIZER_DAMAGE = ["truncated", "corrupted", "empty"]


def _damage_tokenizer(path, how):
  raw = path.read_bytes()
  path.write_bytes(
    {"truncated": raw[: len(raw) // 2], "corrupted": _flip_middle(raw), "empty": b""}[how]
  )


@pytest.mark.parametrize("source", ["vocab_path", "init_from"])
@pytest.mark.parametrize("how", TOKENIZER_DAMAGE)
def test_damaged_tokenizer_is_one_error_naming_the_file(
  data_dir, hf_dir, tmp_path, monkeypatch, source, how
):
  config = tiny_config(data_dir)
  if source == "vocab_path":
    tokenizer = shutil.copy(data.BUNDLED_VOCAB, tmp_path / "spiece.model")
    config.data.vocab_path = str(tokenizer)
    field = rf"config\.data\.vocab_path='{tokenizer}' is not a usable SentencePiece model: "
    fix = "Point it at a valid .model file."
  else:
    ckpt = shutil.copytree(hf_dir, tmp_path / "ckpt")
    tokenizer = ckpt / checkpoint_io.TOKENIZER_FILE
    config.init_from = str(ckpt)
    config.model.update(hidden_dim=0, mlp_dim=0, num_heads=0, num_layers=0)
    field = rf"config\.init_from='{ckpt}' has a tokenizer that does not load: "
    fix = "Copy it from the model's source again, or set config.data.vocab_path."
  _damage_tokenizer(Path(tokenizer), how)
  monkeypatch.setattr(jax.stages.Lowered, "compile", _never)
  monkeypatch.setattr(trainer, "init_state", _never)
  pattern = (
    rf"^{field}{tokenizer} cannot be read as a SentencePiece model \(.*\): it is truncated, "
    rf"corrupted or another format\. {re.escape(fix)}$"
  )
  with pytest.raises(ValueError, match=pattern):
    trainer.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()
