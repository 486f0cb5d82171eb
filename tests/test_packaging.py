"""The wheel a user installs, and the README's code: built, installed and run as a user would.

Offline: the wheel is built without build isolation (setuptools from this environment) and
installed with `pip --no-index --no-deps` into a fresh virtual environment that borrows this
environment's site-packages for jax/optax/numpy through a `.pth` file.
"""

import os
import re
import subprocess
import sys
import sysconfig
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import galore_jax

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


def readme_blocks(path: Path = README) -> dict[str, str]:
  """{heading: code} of a page's ```python blocks, keyed by the heading above each."""
  blocks, heading = {}, ""
  for m in re.finditer(r"^(#+ [^\n]*)$|^```python\n(.*?)^```$", path.read_text(), re.M | re.S):
    if m.group(1):
      heading = m.group(1).lstrip("# ")
    else:
      key = heading if heading not in blocks else f"{heading} ({len(blocks)})"
      blocks[key] = m.group(2)
  return blocks


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
  pytest.importorskip("build")
  src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
  for name in ("pyproject.toml", "README.md", "LICENSE"):
    (src / name).write_bytes((REPO / name).read_bytes())
  for f in (REPO / "galore_jax").glob("*.py"):  # a copy: the build writes build/ and egg-info
    (src / "galore_jax").mkdir(exist_ok=True)
    (src / "galore_jax" / f.name).write_bytes(f.read_bytes())
  subprocess.run(
    [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
    check=True,
    capture_output=True,
    timeout=300,
  )
  (whl,) = out.glob("*.whl")
  return whl


def test_wheel_holds_only_the_library(wheel):
  version = galore_jax.__version__
  assert wheel.name == f"galore_jax-{version}-py3-none-any.whl"
  names = zipfile.ZipFile(wheel).namelist()
  tops = {n.split("/")[0] for n in names}
  assert tops == {"galore_jax", f"galore_jax-{version}.dist-info"}, tops
  assert not [n for n in names if n.startswith(("train/", "configs/", "tests/", "benchmarks/"))]
  assert f"galore_jax-{version}.dist-info/licenses/LICENSE" in names
  meta = Parser().parsestr(
    zipfile.ZipFile(wheel).read(f"galore_jax-{version}.dist-info/METADATA").decode()
  )
  assert meta["Version"] == version and meta["License-Expression"] == "Apache-2.0"
  required = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
  assert sorted(re.split(r"[<>=\[ ]", r)[0] for r in required) == ["jax", "numpy", "optax"]
  assert {"cuda", "cuda12", "train"} <= set(meta.get_all("Provides-Extra"))


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_the_readme_example(wheel, tmp_path):
  env_dir = tmp_path / "venv"
  venv.EnvBuilder(with_pip=False).create(env_dir)
  python = env_dir / "bin" / "python"
  site = subprocess.run(
    [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  # jax, optax, numpy from this environment (appended to sys.path, after the venv's own).
  Path(site, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  # --ignore-installed: this environment's own galore_jax (editable) is visible through the .pth.
  pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
  pip += ["--no-deps", "--no-index", "--ignore-installed", str(wheel)]
  subprocess.run(pip, env=env, check=True, timeout=120)
  example = next(iter(readme_blocks().values()))  # the README's first example: the library's
  check = (
    "import galore_jax, importlib.util\n"
    f"assert galore_jax.__file__.startswith({str(env_dir)!r}), galore_jax.__file__\n"
    "assert importlib.util.find_spec('train') is None\n"
  )
  proc = subprocess.run(
    [str(python), "-c", check + example],
    cwd=tmp_path,  # not the checkout: `train` must not be importable
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  before, after = (float(x) for x in re.findall(r"loss \w+: ([\d.]+)", proc.stdout))
  assert after < 0.1 * before, proc.stdout


LIBRARY_GUIDE = REPO / "docs" / "library.md"


@pytest.mark.parametrize("heading", list(readme_blocks(LIBRARY_GUIDE)))
def test_library_guide_code_runs(heading, tmp_path, monkeypatch):
  """Every ```python block of docs/library.md runs (each in a fresh namespace)."""
  monkeypatch.chdir(tmp_path)
  code = readme_blocks(LIBRARY_GUIDE)[heading]
  exec(compile(code, f"docs/library.md: {heading}", "exec"), {"__name__": "guide"})


@pytest.mark.parametrize("heading", list(readme_blocks()))
def test_readme_code_runs(heading, tmp_path, monkeypatch):
  """Every ```python block of the README runs (each in a fresh namespace)."""
  monkeypatch.chdir(tmp_path)
  code = readme_blocks()[heading]
  if heading.startswith("Example ("):  # the chain example continues the first one
    code = next(iter(readme_blocks().values())) + code
  exec(compile(code, f"README.md: {heading}", "exec"), {"__name__": "readme"})


def test_api_reference_lists_every_public_name():
  """docs/api.md documents each name of `galore_jax.__all__` (autosummary or py:data)."""
  page = (REPO / "docs" / "api.md").read_text()
  listed = set(re.findall(r"^   (\w+)$", page, re.M)) | set(re.findall(r"py:data:: (\w+)", page))
  assert set(galore_jax.__all__) <= listed, set(galore_jax.__all__) - listed
