"""Fixtures shared by the test files."""

import pytest

from train import data


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """The bundled C4 sample (data/), prepared once per test session into a temporary tfds dir."""
  out = tmp_path_factory.mktemp("bundled_c4")
  data.ensure_bundled_prepared(out)
  return str(out)
