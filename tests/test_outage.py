"""The OSS outage drill: the store unreachable in the middle of `audio_wav` and of `transcripts`; nothing is
dead-lettered for it, and the same run (retries ride it out) or the next completes with the outputs of a clean run.

`make test` runs a light form (ASR_OUTAGE_S, default 6 s); `make outage` runs the issue's 60 s and prints one JSON line.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from asr_assets import failures
from asr_assets.definitions import all_assets
from asr_assets.sample_corpus import Corpus
from partitions import NUM_SHARDS, shard_of
from resources.storage import StorageResource
from resources.teachers import TeacherResource
from tests.oss_server import OssServer
from tests.test_oss import BUCKET, KEY_ID, SECRET, _outputs, _upload_corpus

OUTAGE_S = float(os.environ.get("ASR_OUTAGE_S", "6"))
WAVES = {"ops": {"transcripts": {"config": {"wave_size": 2}}}}  # a checkpoint part every two labels
ORDER = ["media_index", "audio_wav", "vad_segments", "segment_features", "transcripts", "distilled_dataset"]


def _materialize(
    server: OssServer, shard: str, prefix: str, tmp_path: Path, names: list[str], config: dict | None = None
) -> bool:
    storage = StorageResource(
        source_uri=f"oss://{BUCKET}/in",
        output_root=f"oss://{BUCKET}/{prefix}",
        oss_endpoint=server.endpoint,
        oss_access_key_id=KEY_ID,
        oss_access_key_secret=SECRET,
        cache_dir=str(tmp_path / f"cache-{prefix}"),
    )
    assets = [a for a in all_assets if a.partitions_def is not None and a.key.path[-1] in names]
    result = dg.materialize(
        assets,
        resources={"storage": storage, "teacher": TeacherResource()},
        partition_key=shard,
        run_config=config or {},
        raise_on_error=False,
    )
    return result.success


def _transient_dead_letters(server: OssServer, prefix: str) -> int:
    import io

    count = 0
    for key, obj in server.objects.items():
        if key.startswith(f"{prefix}/dead_letter/"):
            rows = pq.read_table(io.BytesIO(obj.data)).to_pylist()
            count += sum(not failures.is_final(r["error_class"], r["attempt"]) for r in rows)
    return count


@pytest.mark.parametrize("stage", ["audio_wav", "transcripts"])
def test_an_oss_outage_mid_stage_loses_nothing(stage: str, corpus: Corpus, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ASR_TRANSIENT_DEADLINE_S", str(max(30.0, 3 * OUTAGE_S)))
    with OssServer(KEY_ID, SECRET, BUCKET) as server:
        _upload_corpus(server, corpus, tmp_path)
        shards = Counter(shard_of(f"oss://{BUCKET}/in/{item.path}", NUM_SHARDS) for item in corpus.items)
        shard = shards.most_common(1)[0][0]
        assert _materialize(server, shard, "clean", tmp_path, ORDER, WAVES)
        upstream, rest = ORDER[: ORDER.index(stage)], ORDER[ORDER.index(stage) :]
        assert _materialize(server, shard, "drill", tmp_path, upstream)
        # Mid-stage: once the stage has published its first output (a decoded file; a labelled wave of two segments),
        # with items still to do.
        first_output = f"drill/{stage}/{shard}/"
        at_start: list[int] = []

        def started() -> bool:
            done = sum(key.startswith(first_output) for key in list(server.objects))
            if done:
                at_start.append(done)
            return bool(done)

        outage = server.outage(OUTAGE_S, when=started)
        runs = 1
        while not _materialize(server, shard, "drill", tmp_path, rest, WAVES):
            outage.join()  # the next run, once the store is back
            runs += 1
            assert runs <= 2, "the run after the outage did not complete"
        outage.join()
        # The outage landed mid-stage: the stage published more outputs after it began.
        assert at_start and sum(key.startswith(first_output) for key in server.objects) > at_start[-1]
        identical = _outputs(server, "drill") == _outputs(server, "clean")
        transient = _transient_dead_letters(server, "drill")
        assert transient == 0 and identical
        assert _transient_dead_letters(server, "clean") == 0
        dead = {k[len("drill/") :]: v.data for k, v in server.objects.items() if k.startswith("drill/dead_letter/")}
        clean = {k[len("clean/") :] for k in server.objects if k.startswith("clean/dead_letter/")}
        assert set(dead) == clean  # no dead-letter table the clean run lacks
        assert server.counts["outages"] == 1
        print(
            json.dumps(
                {
                    "outage_s": OUTAGE_S,
                    "stages": [stage],
                    "transient_dead_letters": transient,
                    "identical": identical,
                    "runs": runs,
                }
            )
        )
