"""The tiny models' vocabulary, tokenizer, processor and configs (built, never downloaded)."""

from __future__ import annotations

import json
import os
from typing import Any

IMAGE_SIZE = 96
PATCH_SIZE = 8
SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "<unk>"]
PROMPT = "<s> question : {question} <image> answer :"


def build_tokenizer(words: list[str]):
    """A word-level ``PreTrainedTokenizerFast``: ids 0-4 are ``<pad> <s> </s> <image> <unk>``."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + [w for w in words if w not in SPECIALS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )


def build_processor(tokenizer):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as CLIPImageProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True,
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1)


def tiny_llava_config(vocab_size: int, **overrides: Any):
    from transformers import LlavaConfig

    vision = dict(model_type="clip_vision_model", hidden_size=192, intermediate_size=768, num_hidden_layers=6,
                  num_attention_heads=3, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=192)
    text = dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=vocab_size, max_position_embeddings=512, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, rope_theta=10000.0)
    vision.update(overrides.pop("vision", {}))
    text.update(overrides.pop("text", {}))
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=3, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       tie_word_embeddings=True, **overrides)


def write_world_card(path: str, extra: dict) -> None:
    card = {"prompt": PROMPT, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE} | extra
    with open(os.path.join(path, "mmtoken_world.json"), "w") as f:
        json.dump(card, f, indent=1)


NEXT_IMAGE_SIZE = 192  # synth-hires / synth-doc images; each 96-px crop is a quarter at full resolution
NEXT_GRID_PINPOINTS = [[96, 192], [192, 96], [192, 192]]


def build_next_processor(tokenizer):
    """The ``LlavaNextProcessor`` of ``tiny-llava-next``: a 96-px thumbnail plus 96-px crops of the image
    resized to the best of ``NEXT_GRID_PINPOINTS`` (a 192-px image: four crops, 5 x 144 visual tokens + 24
    newline tokens = 744)."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=NEXT_GRID_PINPOINTS, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                              vision_feature_select_strategy="default", image_token="<image>",
                              num_additional_image_tokens=1)


def tiny_llava_next_config(llava_config, max_positions: int = 1024):
    """A ``LlavaNextConfig`` with ``tiny-llava``'s vision tower, projector and LM shapes (so its weights load
    into it), AnyRes pinpoints ``NEXT_GRID_PINPOINTS`` and room for 744 visual tokens plus the prompt."""
    from transformers import LlavaNextConfig

    text = llava_config.text_config.to_dict()
    text["max_position_embeddings"] = max(max_positions, text.get("max_position_embeddings", 0))
    return LlavaNextConfig(vision_config=llava_config.vision_config.to_dict(), text_config=text,
                           image_token_id=llava_config.image_token_id, vision_feature_layer=llava_config.vision_feature_layer,
                           vision_feature_select_strategy="default", projector_hidden_act="gelu",
                           image_grid_pinpoints=NEXT_GRID_PINPOINTS, tie_word_embeddings=True)
