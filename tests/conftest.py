"""Fixtures; the helpers they use live in helpers.py."""

import pytest
from helpers import small_params


@pytest.fixture
def params():
  return small_params()
