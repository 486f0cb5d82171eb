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
"""

import errno
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train import tiny_config

from train import c4_builder, checkpoint, data, trainer

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
  ("optimizer.proj_type", "diagonal", "is not one of"),
  ("optimizer.subspace_method", "qr", "is not one of"),
  ("optimizer.on_refresh", "forget", "is not one of"),
  ("optimizer.rank", 33, r"must be an int in \[1, 32\]"),  # tiny model: D = 32
  ("optimizer.rank", 0, r"must be an int in \[1, 32\]"),
  ("optimizer.update_proj_gap", 0, "must be an int >= 1"),
  ("optimizer.learning_rate", -1e-3, r"must be a number in \(0, inf\)"),
  ("optimizer.power_iters", -1, "must be an int >= 0"),
  ("optimizer.warmup_fraction", 1.5, r"must be a number in \[0, 1\]"),
  ("optimizer.min_lr_ratio", -0.1, r"must be a number in \[0, 1\]"),
  ("optimizer.b1", 1.0, r"must be a number in \[0, 1\)"),
  ("optimizer.b2", -0.5, r"must be a number in \[0, 1\)"),
  ("optimizer.eps", 0.0, r"must be a number in \(0, inf\)"),
  ("optimizer.weight_decay", -0.1, r"must be a number in \[0, inf\)"),
  ("optimizer.grad_clip_norm", -1.0, r"must be a number in \[0, inf\)"),
  ("optimizer.scale", 0.0, "must be a number > 0"),
  ("optimizer.oversample", -1, "must be an int >= 0"),
  ("optimizer.projector_dtype", "float8", "is not one of"),
  ("optimizer.inner", "sgd", "is not one of", {"optimizer.name": "galore"}),
  ("model.size", "13m", "is not one of"),
  ("model.dtype", "float17", "is not one of"),
  ("model.param_dtype", "int8", "is not one of"),
  ("model.remat_policy", "sometimes", "is not one of"),
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
  assert not c4_builder.is_prepared(out)
  config = tiny_config(str(out))
  with pytest.raises(ValueError, match=r"^config\.data\.data_dir=.* has no prepared C4"):
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
