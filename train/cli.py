"""The command line around `train.main`: one-line errors and `--print_config`.

A mistake a user can fix (an unknown or mistyped config field, a value of the wrong type, a
config value the trainer rejects, a checkpoint written by another config, a missing data
directory or vocabulary) is printed as one line, `error: ...`, naming the field, the value and
the fix or the nearest valid name, and the program exits with status 2 (configuration) or 1
(run time) without a traceback. `--verbose` or `GALORE_JAX_TRACEBACK=1` shows the traceback
instead. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import ast
import difflib
import importlib.machinery
import importlib.util
import io
import logging
import os
import sys
import tokenize
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags

from train import checkpoint, trainer
from train.c4_builder import BadRecordError

TRACEBACK_ENV = "GALORE_JAX_TRACEBACK"
DEFAULT_CONFIG = "configs/default.py"
# Run-time errors whose message tells the user what to do (exit status 1).
RUNTIME_ERRORS = (
  checkpoint.CheckpointError,
  trainer.TrainingDiverged,
  BadRecordError,
  FileNotFoundError,
)
_TRUE = ("", "1", "true", "t", "yes", "y")


def wants_traceback(argv: Sequence[str]) -> bool:
  """True with `--verbose` (or `--verbose=true`) on the command line or GALORE_JAX_TRACEBACK set."""
  if os.environ.get(TRACEBACK_ENV, "0").lower() not in ("", "0", "false", "no"):
    return True
  for arg in argv:
    name, _, value = arg.lstrip("-").partition("=")
    if arg.startswith("-") and name == "verbose" and value.lower() in _TRUE:
      return True
  return False


def fail(message: str, status: int) -> None:
  """Prints `error: <message>` as one line on stderr and exits with `status`."""
  line = " ".join(message.split())
  print(f"error: {line}", file=sys.stderr, flush=True)
  sys.exit(status)


# ------------------------------------------------------------------------------------------
# Flag parsing: errors in --config and its overrides.


def parse_flags(argv: list[str]) -> list[str]:
  """`absl.app.run`'s `flags_parser`: parses the flags, or fails with one line saying why."""
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      flags.FLAGS["config"].value.keys()  # a config file that failed to load raises here
    return rest
  except Exception as e:  # noqa: BLE001 (ml_collections raises many types while parsing)
    if wants_traceback(argv):
      raise
    fail(describe_flag_error(argv[1:], e), 2)
    raise  # unreachable: fail exits


def config_file(args: Sequence[str]) -> str:
  """The `--config` file given on the command line (without a `:arg` suffix), or the default."""
  for i, arg in reversed(list(enumerate(args))):  # the last one counts
    if arg.startswith(("--config=", "-config=")):
      path = arg.split("=", 1)[1]
    elif arg in ("--config", "-config") and i + 1 < len(args):
      path = args[i + 1]
    else:
      continue
    if not Path(path).exists() and ":" in path:
      path = path.rsplit(":", 1)[0]
    return path
  return DEFAULT_CONFIG


def load_config(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, as `--config` loads it."""
  if not Path(path).is_file():
    raise FileNotFoundError("no such file")
  loader = importlib.machinery.SourceFileLoader("_galore_jax_config", path)
  spec = importlib.util.spec_from_loader(loader.name, loader)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def overrides(args: Sequence[str]) -> list[tuple[str, str | None]]:
  """(field path, value or None) of each `--config.<path>[=<value>]` argument."""
  out = []
  for i, arg in enumerate(args):
    if not arg.startswith(("--config.", "-config.")):
      continue
    name, eq, value = arg.lstrip("-").partition("=")
    if not eq:
      nxt = args[i + 1] if i + 1 < len(args) else None
      value = nxt if nxt is not None and not nxt.startswith("-") else None
    out.append((name.split(".", 1)[1], value))
  return out


def _nearest(key: str, names: Sequence[str]) -> str:
  match = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
  if match:
    return f"did you mean {match[0]!r}?"
  return f"its fields are {', '.join(names)}."


def _parse_as(value: str, like: Any) -> str | None:
  """None if `value` parses as the type of `like`, else the name of that type."""
  try:
    if isinstance(like, bool):
      if value.lower() not in ("true", "false", "1", "0", "t", "f", "yes", "no"):
        return "a bool (true/false)"
    elif isinstance(like, int):
      int(value)
    elif isinstance(like, float):
      float(value)
  except ValueError:
    return "an int" if isinstance(like, int) else "a float"
  return None


def check_override(config: ml_collections.ConfigDict, path: str, value: str | None) -> str | None:
  """What is wrong with `--config.<path>=<value>` (None if nothing is)."""
  node, parts = config, path.split(".")
  for depth, key in enumerate(parts):
    where = ".".join(["config", *parts[:depth]])
    if not isinstance(node, ml_collections.ConfigDict):
      return f"--config.{path}: {where} is a value, not a section; set --config.{where[7:]}."
    if key not in node:
      names = sorted(node.keys())
      return f"--config.{path}={value}: {where} has no field {key!r}; {_nearest(key, names)}"
    node = node[key]
  if isinstance(node, ml_collections.ConfigDict):
    return f"--config.{path}: a section; set one of its fields ({', '.join(sorted(node.keys()))})."
  if value is not None:
    expected = _parse_as(value, node)
    if expected:
      return f"--config.{path}={value}: config.{path} is {expected} (now {node!r})."
  return None


def describe_flag_error(args: Sequence[str], error: Exception) -> str:
  """One line on why the command line did not parse."""
  path = config_file(args)
  try:
    config = load_config(path)
  except Exception as e:  # noqa: BLE001 (a config file can raise anything)
    why = str(e) if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
    return f"--config={path} could not be loaded: {why}"
  for field, value in overrides(args):
    problem = check_override(config, field, value)
    if problem:
      return problem + f" (all fields: --config={path} --print_config)"
  return str(error).strip().splitlines()[0]


# ------------------------------------------------------------------------------------------
# Run-time errors.


def is_user_error(e: BaseException) -> tuple[bool, int]:
  """(whether `e` is an error the user can act on, its exit status)."""
  if isinstance(e, ValueError) and str(e).startswith("config."):
    return True, 2  # the trainer's config checks: `config.<field>=<value> ...`
  return isinstance(e, RUNTIME_ERRORS), 1


def guarded(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """`main`, with user errors printed as one line (see the module docstring)."""

  def wrapped(argv: list[str]) -> Any:
    try:
      return main(argv)
    except Exception as e:
      user, status = is_user_error(e)
      if not user or wants_traceback(sys.argv):
        raise
      # A failed restore leaves orbax's pending reads behind; at exit their coroutines are
      # collected and Python prints each one's traceback ("Exception ignored in ..."), which
      # would bury the one line; orbax's background threads may also log their own errors
      # while the process shuts down (seen: "cannot schedule new futures after shutdown", with
      # its traceback). --verbose keeps both.
      sys.unraisablehook = lambda _: None
      logging.disable(logging.CRITICAL)
      if status == 2:
        fail(str(e), status)
      fail(f"{type(e).__name__}: {e} (--verbose shows the traceback)", status)

  return wrapped


# ------------------------------------------------------------------------------------------
# --print_config.


def _comments(source: str) -> dict[str, str]:
  """{field path: comment} for `c.<path> = value` lines: the trailing comment, else the block of
  comment lines right above."""
  lines: dict[int, str] = {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      lines[tok.start[0]] = tok.string.lstrip("#").strip()
  own_line = {n for n in lines if source.splitlines()[n - 1].lstrip().startswith("#")}
  out = {}
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Assign) or len(node.targets) != 1:
      continue
    parts, target = [], node.targets[0]
    while isinstance(target, ast.Attribute):
      parts.append(target.attr)
      target = target.value
    if not parts or not isinstance(target, ast.Name):
      continue
    text = lines.get(node.end_lineno) if node.end_lineno not in own_line else None
    if not text:
      above, n = [], node.lineno - 1
      while n in own_line:
        above.insert(0, lines[n])
        n -= 1
      text = " ".join(above)
    if text:
      out[".".join(reversed(parts))] = text
  return out


def _config_sources(path: Path) -> list[Path]:
  """The config file and the `configs` modules it imports, transitively (the file first)."""
  seen, todo = [], [path]
  while todo:
    p = todo.pop(0)
    if p in seen or not p.is_file():
      continue
    seen.append(p)
    for node in ast.walk(ast.parse(p.read_text())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "configs":
        rest = node.module.split(".")[1:]
        names = [rest] if rest else [[a.name] for a in node.names]
        todo += [path.parent.joinpath(*n).with_suffix(".py") for n in names]
  return seen


def field_comments(path: str | os.PathLike) -> dict[str, str]:
  """{field path: comment} from the config file's source and the config modules it imports."""
  out: dict[str, str] = {}
  for source in reversed(_config_sources(Path(path))):  # the file's own comments win
    out.update(_comments(source.read_text()))
  return out


def _flatten(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, Any]]:
  out = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out += _flatten(value, f"{prefix}{key}.")
    else:
      out.append((f"{prefix}{key}", value))
  return out


def format_config(config: ml_collections.ConfigDict, path: str | os.PathLike) -> str:
  """Every field of `config` as `<field> = <value>  # <comment>`, one per line."""
  comments = field_comments(path)
  rows = [(f"{k} = {v!r}", comments.get(k, "")) for k, v in _flatten(config)]
  width = max(len(r) for r, _ in rows)
  head = f"# {path}, with the overrides given; set a field with --config.<field>=<value>"
  body = [f"{r:<{width}}  # {c}" if c else r for r, c in rows]
  return "\n".join([head, *body])
