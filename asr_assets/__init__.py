"""asr-distill: Dagster assets that turn audio/video into a distilled speech-text dataset."""
