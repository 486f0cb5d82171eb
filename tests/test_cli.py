"""The command line (`python -m train.main`, `train/cli.py`), run as a user runs it: a subprocess.

A mistake the user can fix is one line on stderr, `error: ...`, and a non-zero exit, with no
traceback; `--verbose` / GALORE_JAX_TRACEBACK=1 bring the traceback back.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import default
from train import cli

REPO = Path(__file__).resolve().parent.parent
# A tiny run (a few seconds): 2 layers of width 32, 2 steps of 2 x 32 tokens.
TINY = [
  "--config.model.hidden_dim=32",
  "--config.model.mlp_dim=64",
  "--config.model.num_heads=2",
  "--config.model.num_layers=2",
  "--config.data.seq_len=32",
  "--config.data.eval_max_documents=8",
  "--config.optimizer.rank=8",
  "--config.train.num_steps=2",
  "--config.train.batch_size=2",
  "--config.train.eval_every=2",
  "--config.train.checkpoint_every=2",
  "--config.train.eval_batch_size=8",
  "--config.train.progress_bar=false",
]


def _run(*args, env=None):
  base = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
  env = {**base, "PYTHONPATH": str(REPO), **(env or {})}
  return subprocess.run(
    [sys.executable, "-m", "train.main", "--config=configs/default.py", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def _error_line(proc) -> str:
  """The one `error:` line of a failed run; no traceback anywhere in its output."""
  assert proc.returncode != 0, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, proc.stderr
  return lines[0]


def test_unknown_field_names_the_nearest_valid_one():
  proc = _run("--config.optimizer.nmae=x", "--workdir=/nonexistent")
  line = _error_line(proc)
  assert proc.returncode == 2
  assert "--config.optimizer.nmae=x" in line and "did you mean 'name'?" in line


def test_unknown_section_and_field_without_a_near_name():
  assert "did you mean 'optimizer'?" in _error_line(_run("--config.optimzer.rank=3"))
  line = _error_line(_run("--config.train.use_ema=1"))
  assert "config.train has no field 'use_ema'" in line and "num_steps" in line  # lists fields


def test_value_of_the_wrong_type():
  line = _error_line(_run("--config.optimizer.rank=abc"))
  assert "--config.optimizer.rank=abc" in line and "is an int (now 32)" in line


def test_missing_config_file():
  line = _error_line(_run("--config=configs/nope.py"))
  assert "--config=configs/nope.py could not be loaded: no such file" in line


def test_value_the_trainer_rejects():
  proc = _run("--config.optimizer.name=adamx", "--workdir=/nonexistent")
  assert proc.returncode == 2
  assert _error_line(proc).startswith("error: config.optimizer.name='adamx' is not one of")


def test_missing_data_dir(tmp_path):
  proc = _run("--config.data.data_dir=/nonexistent/c4", f"--workdir={tmp_path}", *TINY)
  assert "config.data.data_dir='/nonexistent/c4' does not exist" in _error_line(proc)


def test_bad_tokenizer(data_dir, tmp_path):
  proc = _run(
    f"--config.data.data_dir={data_dir}",
    "--config.data.vocab_path=README.md",
    f"--workdir={tmp_path}",
    *TINY,
  )
  assert "config.data.vocab_path='README.md' is not a usable SentencePiece model" in (
    _error_line(proc)
  )


def test_checkpoint_of_another_config_is_one_line_and_verbose_shows_the_traceback(
  data_dir, tmp_path
):
  run = [f"--config.data.data_dir={data_dir}", f"--workdir={tmp_path}", *TINY]
  first = _run(*run)
  assert first.returncode == 0, first.stderr
  wider = [*run, "--config.model.hidden_dim=64"]  # a later override wins
  line = _error_line(_run(*wider))
  assert line.startswith("error: CheckpointError: no checkpoint in")
  assert "written by a different model/optimizer config" in line
  for proc in (_run(*wider, "--verbose"), _run(*wider, env={cli.TRACEBACK_ENV: "1"})):
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "CheckpointError" in proc.stderr


def test_verbose_shows_the_traceback_of_a_flag_error():
  proc = _run("--config.optimizer.nmae=x", "--verbose")
  assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_print_config_lists_every_field_with_its_value_and_comment():
  proc = _run("--print_config", "--config.optimizer.rank=7")
  assert proc.returncode == 0, proc.stderr
  lines = {line.split(" = ")[0]: line for line in proc.stdout.splitlines()[1:]}
  fields = []
  for section, value in default.get_config().items():
    keys = value.keys() if hasattr(value, "keys") else [None]
    fields += [f"{section}.{k}" if k else section for k in keys]
  assert sorted(lines) == sorted(fields)
  assert lines["optimizer.rank"].startswith("optimizer.rank = 7 ")
  assert "# GaLore rank r" in lines["optimizer.rank"]
  # Every field of the default config carries a comment (STYLE.md); the block above a field
  # counts when the line itself has none.
  assert all("  # " in line for line in lines.values()), proc.stdout
  assert "galore_adamw | adamw | galore" in lines["optimizer.name"]


def test_print_config_of_a_variant_takes_comments_from_the_configs_it_imports():
  comments = cli.field_comments(REPO / "configs" / "c4_llama_60m.py")
  assert comments["model.dtype"] == "the paper's pure-bf16 training"  # configs/paper.py
  assert comments["optimizer.rank"].startswith("GaLore rank r")  # configs/default.py


@pytest.mark.parametrize(
  "args, expected",
  [
    (["--verbose"], True),
    (["--verbose=false"], False),
    (["--noverbose"], False),
    (["--workdir=verbose"], False),
  ],
)
def test_wants_traceback(args, expected, monkeypatch):
  monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
  assert cli.wants_traceback(args) is expected
  monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
  assert cli.wants_traceback(args) is True
