"""The chaos drills (tests/chaos.py) in a light form: one seed with two random SIGKILLs, two concurrent runs of one
shard and files arriving mid-run; every final output must equal an uninterrupted run's. ``make chaos`` runs more
seeds and kills."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import run_chaos


@pytest.mark.chaos
def test_kills_concurrent_runs_and_arrivals_end_identical_to_a_clean_run(tmp_path: Path) -> None:
    line = run_chaos(tmp_path, seeds=1, kills=2)
    print(line)
    assert line["kills"] >= 1, line  # at least one kill landed before the run ended
    assert line["concurrent_runs"] == 2 and line["arrival_drills"] == 1
    assert line["arrivals_mid_decode"] == 1, line  # the arrivals were indexed while the run decoded
    assert line["failed_runs"] == 0, line
    assert line["identical"], line["mismatches"]
    assert line["duplicates"] == 0 and line["transient_dead_letters"] == 0, line
