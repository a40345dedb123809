"""A tiny random-weight Qwen3-Omni (thinker only, about 1M parameters) built offline, for the vLLM tests and demo.

It has the real architecture (`Qwen3OmniMoeForConditionalGeneration`: Whisper-style audio encoder, MoE text model), the
real processor classes, a byte-level tokenizer carrying Qwen's special tokens and a chat template that renders audio,
image and text items with the same placeholders as the released model's template. The weights are random, so its text
is garbage; everything around it (prompt rendering, audio token counts, batching, the engine) is the production path.

Usage: python -m tests.tiny_qwen3_omni OUT_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio_pad|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
)

# The released template's rendering of user turns with audio/image/video/text items, without the tool-calling and
# thinking branches this test model never needs.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message.content is string -%}{%- set content = message.content -%}"
    "{%- else -%}{%- set ns = namespace(c='') -%}"
    "{%- for item in message.content -%}"
    "{%- if item.type == 'audio' or 'audio' in item or 'audio_url' in item -%}"
    "{%- set ns.c = ns.c + '<|audio_start|><|audio_pad|><|audio_end|>' -%}"
    "{%- elif item.type == 'image' or 'image' in item or 'image_url' in item -%}"
    "{%- set ns.c = ns.c + '<|vision_start|><|image_pad|><|vision_end|>' -%}"
    "{%- elif item.type == 'video' or 'video' in item -%}"
    "{%- set ns.c = ns.c + '<|vision_start|><|video_pad|><|vision_end|>' -%}"
    "{%- elif item.type == 'text' -%}{%- set ns.c = ns.c + item.text -%}"
    "{%- endif -%}{%- endfor -%}{%- set content = ns.c -%}{%- endif -%}"
    "{{ '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def build_tiny_qwen3_omni(out_dir: Path, seed: int = 0) -> Path:
    """Writes the model, processor and generation config to ``out_dir`` (deterministic for a seed) and returns it."""
    import torch
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import (
        Qwen2Tokenizer,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        Qwen3OmniMoeConfig,
        Qwen3OmniMoeForConditionalGeneration,
        Qwen3OmniMoeProcessor,
        WhisperFeatureExtractor,
    )

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    # Byte-level BPE over the 256 byte symbols with no merges: every UTF-8 byte is a token, so any text round-trips.
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "audio_token": "<|audio_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
            "audio_bos_token": "<|audio_start|>",
            "audio_eos_token": "<|audio_end|>",
        },
        model_max_length=32768,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]}
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if len(set(ids.values())) != len(SPECIAL_TOKENS):
        raise RuntimeError(f"special tokens collide: {ids}")

    processor = Qwen3OmniMoeProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16 * 4, max_pixels=64 * 64 * 4
        ),
        video_processor=Qwen2VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2),
        feature_extractor=WhisperFeatureExtractor(
            feature_size=128,
            sampling_rate=16000,
            hop_length=160,
            chunk_length=30,
            n_fft=400,
            padding_value=0.0,
            return_attention_mask=True,
        ),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    hidden = 128
    thinker = {
        "text_config": {
            "vocab_size": 512,  # >= len(tokenizer), padded
            "hidden_size": hidden,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 64,  # vLLM's CPU attention supports 32, 64, 80, 96, 112, 128, ...
            "moe_intermediate_size": 64,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [12, 10, 10],
                "interleaved": True,
                "mrope_interleaved": True,
            },
            "tie_word_embeddings": False,
        },
        "audio_config": {
            "num_mel_bins": 128,
            "encoder_layers": 1,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 128,
            "d_model": 64,
            "output_dim": hidden,
            "downsample_hidden_size": 32,
            "n_window": 50,
            "n_window_infer": 800,
            "conv_chunksize": 500,
            "max_source_positions": 1500,
        },
        "vision_config": {
            "depth": 1,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [0],
            # Read by vLLM; transformers v5's config class drops them unless given explicitly.
            "image_size": 768,
            "apply_vit_abs_pos_embed": True,
        },
        "audio_token_id": ids["<|audio_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "audio_start_token_id": ids["<|audio_start|>"],
        "audio_end_token_id": ids["<|audio_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "user_token_id": tokenizer.convert_tokens_to_ids("u"),
        "position_id_per_seconds": 13,
    }
    config = Qwen3OmniMoeConfig(
        thinker_config=thinker,
        enable_audio_output=False,
        im_start_token_id=ids["<|im_start|>"],
        im_end_token_id=ids["<|im_end|>"],
    )
    config.architectures = ["Qwen3OmniMoeForConditionalGeneration"]
    model = Qwen3OmniMoeForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    generation = {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]}
    (out_dir / "generation_config.json").write_text(json.dumps(generation))
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    print(build_tiny_qwen3_omni(args.out_dir))


if __name__ == "__main__":
    main()
