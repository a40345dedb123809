"""The per-shard work of each stage, one module per stage (the assets only wrap them).

Every stage is incremental: it reads its upstream table and its own outcomes (results + dead letters), processes only
the items without an outcome, and checkpoints as it goes, so a re-run after new arrivals or a crash does only the
missing work and a re-run with nothing new writes nothing.

- ``index``: media_index (listing or manifest -> index parts)
- ``decode``: audio_wav (FFmpeg decode to 16 kHz FLAC)
- ``vad``: vad_segments (Silero VAD)
- ``features``: segment_features (cut, measure, pack)
- ``transcribe``: transcripts (teacher + second opinion)
"""

from asr_assets.stages.common import PoolSettings, StageReport
from asr_assets.stages.decode import DecodeSettings, decode_shard
from asr_assets.stages.features import PackSettings, features_shard
from asr_assets.stages.index import build_index, index_objects, media_id_of, read_manifest
from asr_assets.stages.transcribe import (
    TranscribeSettings,
    _transcribe,
    _transcribe_checked,
    read_transcripts,
    transcribe_shard,
)
from asr_assets.stages.vad import GroupSettings, vad_shard

__all__ = [
    "DecodeSettings",
    "GroupSettings",
    "PackSettings",
    "PoolSettings",
    "StageReport",
    "TranscribeSettings",
    "_transcribe",
    "_transcribe_checked",
    "build_index",
    "decode_shard",
    "features_shard",
    "index_objects",
    "media_id_of",
    "read_manifest",
    "read_transcripts",
    "transcribe_shard",
    "vad_shard",
]
