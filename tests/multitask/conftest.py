import pytest

from taps_fast import MultiTaskModel


@pytest.fixture(autouse=True)
def chunks_whenever_asked(monkeypatch):
    """cpu_chunk > 0 runs the chunk path in every test here, however few rows each task has
    (MultiTaskModel picks the mixed path for many tasks of few rows: test_cpu_path_choice)."""
    monkeypatch.setattr(MultiTaskModel, "CPU_CHUNK_MIN_ROWS", 0)
