"""Tiny randomly initialised models of the real architecture classes, saved as ordinary model directories.

The critic base (Qwen3-VL, with its vision tower pre-trained on the world), the generation policy (SD3) and the
editing policy (Qwen-Image-Edit); pretrain.py teaches the two policies to draw the world.
"""

import json
import math
import random

import numpy as np

from toy.judges import object_mask
from toy.rubrics import EDITORS, simulate_editor
from toy.world import BACKGROUNDS, COLORS, SHAPES, SIZES, gen_prompt, random_edit, random_scene, render

# -----------------------------------------------------------------------------
# tiny models of the real classes, saved as ordinary model directories

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
# A ChatML template like Qwen's: content is a string or a list of {"type": "image"|"text"} parts.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_qwen_tokenizer(texts, vocab_size):
    """A byte-level BPE tokenizer with Qwen's special tokens, trained on the world's texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIAL, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=QWEN_CHAT_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
    return tok


def build_tiny_critic(out_dir, texts, image_size=64, hidden=128, layers=4, heads=4, vision_hidden=64,
                      vision_depth=2, vocab_size=1024, vision_steps=0, seed=0):
    """A randomly initialised Qwen3-VL critic base: model + locally trained tokenizer + real processor.

    The directory opens with AutoModelForImageTextToText / AutoProcessor like Qwen3-VL-8B-Instruct.
    `texts` (prompts and answers of the world) train the byte-level BPE tokenizer; `vision_steps` > 0
    pre-trains the vision tower on the world's scenes (pretrain_vision), the language model stays random.
    """
    import torch
    from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor,
                              Qwen3VLVideoProcessor)

    tok = _tiny_qwen_tokenizer(texts, vocab_size)
    # one image = (size/8)^2 patches of 8 px, merged 2x2 -> (size/16)^2 tokens (16 at 64 px)
    image_proc = Qwen2VLImageProcessor(min_pixels=image_size ** 2, max_pixels=image_size ** 2, patch_size=8,
                                       merge_size=2, temporal_patch_size=2)
    proc = Qwen3VLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=Qwen3VLVideoProcessor(),
                            chat_template=QWEN_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    head_dim = hidden // heads
    half = head_dim // 2  # mrope sections (t, h, w) must add up to head_dim / 2
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [half - 2 * (half // 3), half // 3, half // 3],
                                          "mrope_interleaved": True},
                         bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_heads=4,
                           patch_size=8, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                           num_position_embeddings=(image_size // 8) ** 2, deepstack_visual_indexes=[vision_depth - 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    if vision_steps:
        pretrain_vision(model, image_proc, vision_steps, size=image_size, seed=seed)
    model.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


# The tiny critic's vision tower, pre-trained on the world. A real Qwen3-VL arrives with a pre-trained vision
# encoder; a random one learns to see only through the text loss, and slowly: after the seeing stage
# (train_reward.py --preset mini-vlm, 1 epoch) a random-init base described 1 of 80 validation image pairs exactly
# (positions and shapes mostly wrong), the same stage on a tower pre-trained here for 2000 steps (~2 CPU-min)
# 44 of 80, and the edit critic trained from it reached eval loss 0.107 instead of 0.148 (same data and steps).
# Linear heads on the features the decoder receives (the merger's output and the deepstack features) learn
# to read off each image token what it shows; the heads are then dropped.

VISION_TOKEN_PX, VISION_BLOCK_PX = 16, 4  # an LLM image token = 2x2 merged patches of 8 px; label blocks of 4 px
N_PIXEL_CLASSES = len(BACKGROUNDS) + 2 * len(COLORS)  # background colours, object colours, tinted object colours
DENSE_CLASSES = {"blocks": N_PIXEL_CLASSES, "shape": len(SHAPES) + 1, "size": len(SIZES) + 1, "cell": 9 + 1}


def dense_labels(scene, size=64):
    """What each LLM image token of `scene` shows (tokens of 16x16 px, row-major), as class indices:
    "blocks": the class at the centre of each of its 4x4-px blocks (background colour, object colour, or tinted
    object colour); "shape", "size", "cell": those of the object covering most of the token (>= 10% of it), or
    the last class ("none")."""
    t, b, n = VISION_TOKEN_PX, VISION_BLOCK_PX, size // VISION_TOKEN_PX
    pixel = np.full((size, size), list(BACKGROUNDS).index(scene.background))
    shape, sz, cell = (np.full((size, size), -1) for _ in range(3))
    for o in scene.objects:  # drawn in order, so a later object covers an earlier one, as in render()
        m = object_mask(scene, o.id, size)
        pixel[m] = len(BACKGROUNDS) + list(COLORS).index(o.color) + (len(COLORS) if o.tint else 0)
        shape[m], sz[m], cell[m] = SHAPES.index(o.shape), list(SIZES).index(o.size), o.row * 3 + o.col
    tiles = lambda a: a.reshape(n, a.shape[0] // n, n, a.shape[1] // n).transpose(0, 2, 1, 3).reshape(n * n, -1)

    def covering(a, none):
        return np.array([np.bincount(v[v >= 0]).argmax() if (v >= 0).sum() >= t * t // 10 else none for v in tiles(a)])
    return {"blocks": tiles(pixel[b // 2::b, b // 2::b]), "shape": covering(shape, len(SHAPES)),
            "size": covering(sz, len(SIZES)), "cell": covering(cell, 9)}


def _vision_batch(rng, n, size):
    """n images: random sources and their edits by every kind of simulated editor (tints, nudges, degradations)."""
    import torch
    images, labels = [], []
    while len(images) < n:
        src = random_scene(rng)
        out, degrade = simulate_editor(rng, src, random_edit(rng, src), rng.choice(EDITORS))
        for scene, deg in ((src, None), (out, degrade)):
            images.append(render(scene, size, deg, seed=rng.randrange(1 << 30)))
            labels.append(dense_labels(scene, size))
    return images, {k: torch.as_tensor(np.stack([lab[k] for lab in labels])) for k in DENSE_CLASSES}


def pretrain_vision(model, image_processor, steps, size=64, batch=32, lr=2e-3, seed=0, log=print):
    """Train `model.model.visual` (a Qwen3-VL vision tower) to predict dense_labels from its output features.
    Returns the held-out accuracy of each label kind at the end."""
    import torch
    import torch.nn.functional as F
    vis = model.model.visual
    per_token = {k: (VISION_TOKEN_PX // VISION_BLOCK_PX) ** 2 if k == "blocks" else 1 for k in DENSE_CLASSES}
    n_out = sum(per_token[k] * c for k, c in DENSE_CLASSES.items())
    heads = torch.nn.ModuleList(torch.nn.Linear(model.config.vision_config.out_hidden_size, n_out)
                                for _ in range(1 + len(model.config.vision_config.deepstack_visual_indexes)))
    opt = torch.optim.AdamW([*vis.parameters(), *heads.parameters()], lr=lr, weight_decay=0.0)
    rng, held_out = random.Random(seed), _vision_batch(random.Random(f"{seed}:held-out"), 128, size)

    def loss_and_accuracy(images, labels):
        enc = image_processor(images=images, return_tensors="pt")
        out = vis(enc["pixel_values"], grid_thw=enc["image_grid_thw"])
        loss, correct = 0.0, {}
        for head, feats in zip(heads, [out.pooler_output, *out.deepstack_features]):
            logits = head(feats).view(len(images), -1, n_out)  # (image, token, all label logits)
            start = 0
            for k, c in DENSE_CLASSES.items():
                y = labels[k].reshape(-1)
                part = logits[..., start:start + per_token[k] * c].reshape(-1, c)
                start += per_token[k] * c
                loss = loss + F.cross_entropy(part, y)
                correct.setdefault(k, (part.argmax(-1) == y).float().mean().item())
        return loss, correct  # accuracy of the merger's features (the first head)

    warmup = max(1, steps // 20)
    for step in range(steps):
        for g in opt.param_groups:  # linear warmup, cosine decay
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss, _ = loss_and_accuracy(*_vision_batch(rng, batch, size))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vis.parameters(), 1.0)
        opt.step()
        if (step + 1) % 250 == 0 or step + 1 == steps:
            with torch.no_grad():
                held_loss, acc = loss_and_accuracy(*held_out)
            log(f"vision pre-training step {step + 1}/{steps}: held-out loss {held_loss.item():.3f}, accuracy "
                + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    with torch.no_grad():
        return loss_and_accuracy(*held_out)[1]


# -----------------------------------------------------------------------------
# tiny generation policy (SD3): a diffusers StableDiffusion3Pipeline directory, pre-trained by pretrain.py
#
# The real classes (SD3Transformer2DModel, two CLIPTextModelWithProjection + CLIPTokenizer, the flow-matching
# scheduler), tiny and randomly initialised, then taught to draw the world by plain flow matching so that RL
# (rl_gen.py) starts from a policy that already draws scenes. Deviations from SD3.5: no VAE (the transformer
# works on 32x32 RGB pixels, "latents = pixels"), no T5 encoder (text_encoder_3 = None), a BPE tokenizer trained
# on the world's prompts. Sizes from MINIATURE_NOTES (0.97 M parameters). Measured (shared 2-core CPU, 1 thread):
# 1500 steps at lr 3e-3 take ~3.7 CPU-min; only then do samples show coherent objects in the prompt's colours
# (mostly at wrong places); at 400-600 steps they are scattered coloured patches.

GEN_SIZE = 32  # pixels; the critic sees these upsampled to 64 (rl_gen.py --reward-image-size)


def _clip_tokenizer(texts, vocab_size=400, max_length=32):
    """A CLIPTokenizer (same normaliser, pre-tokeniser and </w> BPE as CLIP's) trained on `texts`."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    bpe = Tokenizer(models.BPE(unk_token=eos, end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[bos, eos], show_progress=False,
                                                       initial_alphabet=alphabet, end_of_word_suffix="</w>"))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # the trainer numbers single characters in a per-process random order: renumber them (sorted), so that two runs
    # build the same tokenizer and hence the same model
    merged = [a + b for a, b in merges]
    singles = sorted(set(model["vocab"]) - set(merged) - {bos, eos})
    vocab = {t: i for i, t in enumerate(dict.fromkeys([bos, eos] + singles + merged))}
    for ch in sorted(alphabet):  # every byte also as a word end, as in CLIP's vocabulary: no <unk> for odd words
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length), vocab, merges


def world_prompts(n=3000, seed=0):
    """Prompts over random scenes (every word of the world appears many times)."""
    rng = random.Random(f"{seed}:gen-prompts")
    return [gen_prompt(random_scene(rng), rng) for _ in range(n)]


def build_tiny_generator(out_dir, texts=None, size=GEN_SIZE, seed=0):
    """A randomly initialised tiny SD3 pipeline saved as an ordinary diffusers directory (no VAE, no T5).

    Open it with rl_gen.load_generator(out_dir), or StableDiffusion3Pipeline.from_pretrained(out_dir,
    vae=None, text_encoder_3=None, tokenizer_3=None). Returns the transformer's parameter count.
    """
    import os
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tok, vocab, merges = _clip_tokenizer(texts or world_prompts())

    def text_encoder(s):  # CLIP-L / CLIP-G stand-ins: hidden 32 each, so concatenated = joint_attention_dim 64
        torch.manual_seed(s)
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=tok.model_max_length, projection_dim=32, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=size, patch_size=4, in_channels=3, out_channels=3, num_layers=3,
                                        attention_head_dim=24, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=96, pooled_projection_dim=64, pos_embed_max_size=size // 4)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=None,
                                    text_encoder=text_encoder(seed + 1), tokenizer=tok, text_encoder_2=text_encoder(seed + 2),
                                    tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
    import logging
    logging.getLogger("diffusers").setLevel(logging.ERROR)  # "vae=None cannot be saved" is what we want
    pipe.save_pretrained(out_dir)
    for sub in ("tokenizer", "tokenizer_2"):  # the classic CLIP files too, for loaders that want them
        d = os.path.join(out_dir, sub)
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return sum(p.numel() for p in transformer.parameters())


# -----------------------------------------------------------------------------
# tiny editing policy (Qwen-Image-Edit): the real classes, pre-trained briefly by pretrain.py
#
# A QwenImageTransformer2DModel, a randomly initialised (frozen) Qwen2.5-VL text encoder with a locally
# trained tokenizer and the real processor, and the real scheduler config, saved by the real pipeline
# class as an ordinary diffusers directory. There is no VAE (a random AutoencoderKLQwenImage would
# destroy the images): rl_edit.encode_latents rearranges the 32 px pixels space-to-depth (2x2 -> 12
# channels, lossless), the 2x2 packing makes 8x8 = 64 tokens of 48 features per image.

EDIT_RESOLUTION = 32  # px the tiny editor works at; sources and results are 64 px like the rest of the world


def build_tiny_editor(out_dir, texts, resolution=EDIT_RESOLUTION, layers=3, heads=3, head_dim=32, s2d=2, text_hidden=64,
                      text_layers=2, vocab_size=1024, seed=0):
    """A randomly initialised tiny Qwen-Image-Edit directory that QwenImageEditPlusPipeline.from_pretrained opens."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor
    tok = _tiny_qwen_tokenizer(texts, vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    # the text encoder sees the source at 32 px: 4x4 patches of 8 px, merged 2x2 -> 4 image tokens
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=8,
                                                                  merge_size=2, temporal_patch_size=2),
                            tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_CHAT_TEMPLATE)
    half = text_hidden // 4 // 2  # 4 heads; mrope sections (t, h, w) add up to head_dim / 2
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                         num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]},
                         bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=32, out_hidden_size=text_hidden, fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(cfg)
    # RoPE dims (frame, h, w) add up to head_dim. The frame axis only tells target (0) from source (1): 4 dims;
    # h and w get the rest, so that their slower frequencies (theta 10000) can tell 8 token positions apart and
    # a target token finds the source token at its own position (how the editor copies what it keeps).
    rope = (head_dim - 4) // 2
    c = 3 * s2d * s2d  # latent channels: pixels space-to-depth by s2d
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=4 * c, out_channels=c, num_layers=layers,
                                              attention_head_dim=head_dim, num_attention_heads=heads,
                                              joint_attention_dim=text_hidden, axes_dims_rope=(4, rope, rope))
    # Qwen-Image's scheduler config: exponential shift growing with the token count, terminal noise 0.02
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                                max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    QwenImageEditPlusPipeline(scheduler=scheduler, vae=None, text_encoder=text_encoder, tokenizer=tok, processor=proc,
                              transformer=transformer).save_pretrained(out_dir)
    with open(f"{out_dir}/firm_edit.json", "w") as f:
        json.dump({"resolution": resolution, "condition_area": 64 * 64,  # the world's 64 px sources, as they are
                   "latents": "no VAE: pixels space-to-depth 2x2 (rl_edit.encode_latents)"}, f, indent=2)
    return sum(p.numel() for p in transformer.parameters())

