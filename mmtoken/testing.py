"""Tiny random-initialised LLaVA / LLaVA-NeXT models built from configs, for tests, demos and timing.

Nothing is downloaded: the configs are written here and the weights drawn from a seeded generator.
"""

from __future__ import annotations

from typing import Any

import torch

IMAGE_TOKEN_ID = 3
PAD_TOKEN_ID = 0


def _vision_config(image_size: int, patch_size: int, hidden: int, layers: int, heads: int) -> dict[str, Any]:
    return {
        "model_type": "clip_vision_model",
        "hidden_size": hidden,
        "intermediate_size": hidden * 4,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "image_size": image_size,
        "patch_size": patch_size,
        "projection_dim": hidden,
    }


def _text_config(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "pad_token_id": PAD_TOKEN_ID,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def tiny_llava(
    *,
    image_size: int = 64,
    patch_size: int = 8,
    vision_hidden: int = 64,
    vision_layers: int = 3,
    vision_heads: int = 4,
    text_hidden: int = 64,
    text_layers: int = 4,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    vocab: int = 128,
    attn: str = "sdpa",
    seed: int = 0,
    next: bool = False,
    intermediate: tuple[int, int] | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    grid_pinpoints: list[list[int]] | None = None,
) -> torch.nn.Module:
    """A random LLaVA-1.5-shaped model (or LLaVA-NeXT with ``next=True``) in eval mode, built directly on
    ``device`` in ``dtype`` (so 7B shapes initialise in seconds on a GPU). ``intermediate``: MLP widths
    (vision, text); default 4x and 2x the hidden sizes."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration

    vcfg = _vision_config(image_size, patch_size, vision_hidden, vision_layers, vision_heads)
    tcfg = _text_config(text_hidden, text_layers, text_heads, text_kv_heads, vocab)
    if intermediate is not None:
        vcfg["intermediate_size"], tcfg["intermediate_size"] = intermediate
    kw = dict(
        vision_config=vcfg,
        text_config=tcfg,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if next:
                s = image_size
                pins = grid_pinpoints or [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
                model = LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=pins, **kw))
            else:
                model = LlavaForConditionalGeneration(LlavaConfig(**kw))
    finally:
        torch.set_default_dtype(old_dtype)
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.suppress_tokens = [IMAGE_TOKEN_ID]  # a random model may otherwise emit <image>
    return model.eval()


def tokens_per_image(model: torch.nn.Module) -> int:
    vc = model.config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


def make_batch(model: torch.nn.Module, n: int, seed: int = 0, prompt_lens: list[int] | None = None, with_image: list[bool] | None = None) -> dict[str, torch.Tensor]:
    """A left-padded batch of ``n`` prompts ``[text] <image x N> [text]`` with random images (LLaVA-1.5)."""
    g = torch.Generator().manual_seed(seed)
    n_img = tokens_per_image(model)
    vocab = model.config.text_config.vocab_size
    lens = prompt_lens or [3 + 2 * i for i in range(n)]
    with_image = with_image or [True] * n
    rows = []
    for i in range(n):
        pre = torch.randint(4, vocab, (2,), generator=g)
        post = torch.randint(4, vocab, (lens[i],), generator=g)
        img = torch.full((n_img,), IMAGE_TOKEN_ID) if with_image[i] else torch.zeros(0, dtype=torch.long)
        rows.append(torch.cat([torch.tensor([1]), pre, img, post]))
    width = max(r.numel() for r in rows)
    ids = torch.full((n, width), PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.numel() :] = r
        mask[i, width - r.numel() :] = 1
    s = model.config.vision_config.image_size
    out = {"input_ids": ids, "attention_mask": mask}
    n_images = sum(with_image)
    if n_images:
        out["pixel_values"] = torch.randn(n_images, 3, s, s, generator=g)
    return out


def make_next_batch(model: torch.nn.Module, sizes: list[tuple[int, int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded LLaVA-NeXT batch, one image of each ``(height, width)`` in ``sizes``, through the
    model's own AnyRes preprocessing geometry (pixel crops are random)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    s = cfg.vision_config.image_size
    vocab = cfg.text_config.vocab_size
    counts = []
    for h, w in sizes:
        out = model.model.pack_image_features(
            [torch.zeros(image_size_to_num_patches((h, w), cfg.image_grid_pinpoints, s), tokens_per_image(model), 1)],
            torch.tensor([[h, w]]), cfg.vision_feature_select_strategy, image_newline=torch.zeros(1),
        )[1]
        counts.append(int(out[0]))
    rows = []
    for i, c in enumerate(counts):
        post = torch.randint(4, vocab, (3 + 2 * i,), generator=g)
        rows.append(torch.cat([torch.tensor([1, 5]), torch.full((c,), IMAGE_TOKEN_ID), post]))
    width = max(r.numel() for r in rows)
    ids = torch.full((len(rows), width), PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - r.numel() :] = r
        mask[i, width - r.numel() :] = 1
    n_views = max(image_size_to_num_patches(hw, cfg.image_grid_pinpoints, s) for hw in sizes)
    pv = torch.randn(len(sizes), n_views, 3, s, s, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pv, "image_sizes": torch.tensor(sizes)}


def select_rows(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Sample ``i`` of a batch made by :func:`make_batch` / :func:`make_next_batch`, unpadded, with its own
    image (samples hold one image or none; the images are those of the samples that have one, in order)."""
    keep = batch["attention_mask"][i].bool()
    out = {"input_ids": batch["input_ids"][i : i + 1, keep], "attention_mask": batch["attention_mask"][i : i + 1, keep]}
    has_image = (batch["input_ids"] == IMAGE_TOKEN_ID).any(-1).tolist()
    if has_image[i]:
        first = sum(has_image[:i])
        for key in ("pixel_values", "image_sizes"):
            if key in batch:
                out[key] = batch[key][first : first + 1]
    return out


def save_random_world_model(path: str, seed: int = 0, **overrides) -> str:
    """A random-weight model with the world's tokenizer, processor and prompt card, saved like a shipped
    model (tiny dimensions): lets the harness run end to end before any training."""
    from transformers import LlavaForConditionalGeneration

    from .world.build import build_processor, build_tokenizer, tiny_llava_config, write_world_card
    from .world.tasks import vocabulary

    tok = build_tokenizer(vocabulary())
    small = {"vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2),
             "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)}
    for k, v in overrides.items():
        small.setdefault(k, {}).update(v)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(len(tok), **small)).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.suppress_tokens = [model.config.image_token_id]
    model.save_pretrained(path)
    build_processor(tok).save_pretrained(path)
    write_world_card(path, {"trained_by": "nobody: random weights"})
    return path
