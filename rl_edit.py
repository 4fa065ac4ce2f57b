"""DiffusionNFT for an instruction-based image editor (Qwen-Image-Edit) with the FIRM CME reward (Sec 3.4, 4.1).

The editor sees a source image and an instruction and draws the edited image. Each RL step: the old
policy edits every prompt K times (6-step deterministic ODE), the edit critic scores each result for
execution and consistency, the scores are fused into one reward (--reward: CME, the paper's choice, or
the naive weighted sums of its Table 5 ablation), and the DiffusionNFT loss (rl_gen.py, where the
algorithm lives once) pulls the policy towards the better edits of each group. LoRA adapters by
default; what is saved is the EMA of the adapters, as a diffusers LoRA file.

    python toy.py pretrain-edit                              # the tiny editor -> runs/mini/models/edit-base
    python rl_edit.py --preset mini --reward cme             # -> runs/mini/rl_edit_cme
    python rl_edit.py --preset mini --reward sum55           # the 0.5/0.5 sum (Table 5) -> runs/mini/rl_edit_sum55
    torchrun --standalone --nproc_per_node=2 rl_edit.py --preset mini --reward cme
    torchrun --standalone --nproc_per_node=8 rl_edit.py --model /ckpt/Qwen-Image-Edit-2509 \\
        --prompts edits.jsonl --reward-model /ckpt/FIRM-Edit-8B --out ckpt/firm-qwen-edit
    python rl_edit.py ... --reward-model http://critic-host:8000/v1#firm-edit   # a critic served by vLLM (README)

Accepts Qwen-Image-Edit-2509 checkpoints (QwenImageEditPlusPipeline), as the release trains; others are refused.

Prompt records (JSONL): {"id", "prompt" (the instruction), "image" (path relative to the JSONL file),
"requirement" (optional, passed to the critic)}; the miniature world's also carry "toy" (scenes) for the
independent pixel judge. Output (--out), laid out like rl_gen.py's: pytorch_lora_weights.safetensors (the EMA
adapters; pipe.load_lora_weights(out) or load_editor(model, lora_dir=out)) + pytorch_lora_weights.json, or
transformer/ with --full-finetune; metrics.jsonl, reward_curve.png, samples_grid.png (source | before RL | after),
rl_edit.json (before/after summary), checkpoint/ (resume with --resume).

Conditioning, as Qwen-Image-Edit does it (read diffusers' pipeline_qwenimage_edit_plus.py beside this):
  - the source is encoded to latents, packed 2x2 into tokens, and concatenated AFTER the noisy latents
    along the sequence; img_shapes lists both grids, so RoPE gives the source frame index 1 at the same
    (h, w) positions; only the first half of the output (the noisy latents' tokens) is the velocity;
  - the instruction and the source (at ~384x384) go through Qwen2.5-VL in the edit chat template; the
    last layer's hidden states, without the system-prompt prefix, are the text stream;
  - the transformer takes t in [0, 1] (the pipeline's timestep / 1000), the noise levels come from the
    checkpoint's scheduler (resolution-dependent exponential shift, terminal stretch).

Departures from the paper / release:
  1. Our own prompt encoding: it passes mm_token_type_ids to Qwen2.5-VL (diffusers drops it, so the
     image tokens get 1-D instead of 3-D M-RoPE positions: a known upstream bug) and finds the length of
     the template prefix to drop from the tokenizer (diffusers hard-codes 64, right only for Qwen's).
  2. Our own sampler (rl_gen.ode_sample) at --resolution (512 px, the paper's), not the pipeline's ~1 MP;
     results are resized back to the source's size for the critic.
  3. The old policy and the frozen reference are parameter VALUES swapped into the one sharded model
     (for LoRA: the adapters; the reference is the adapters at step 0, B = 0, i.e. the base model).
  4. Each rank scores its own edits (a critic per rank, or all ranks call one server); a critic answer
     that does not parse gives no reward: the edit is dropped from its group (counted as parse_failures).
  5. Defaults follow the release's editing configs where the paper is silent or differs (each flag's help
     names its source): lr 1.5e-3, 24 prompts x 12 edits per step, 15 evaluation sampler steps; 150 steps as
     the paper. The LoRA is trained and saved guidance-free: sample it with true_cfg_scale=1.0.
  6. Miniature world (--preset mini): a tiny Qwen-Image editor of the real classes (toy.py pretrain-edit)
     with no VAE: its "latents" are the 32 px pixels rearranged space-to-depth (lossless, handled in
     encode_latents / decode_latents only); the critic sees the edits upsampled to 64 px. The preset
     trains 30 steps of 4 prompts x 8 edits, 2 of the 6 noise levels per edit, LoRA r16 at lr 1e-3.

Logged per step (metrics.jsonl): reward (fused, mean over edits that parsed), parse_failures, loss (NFT),
kl, grad_norm, train_pixel (miniature world only); every --eval-every steps on the test prompts with the
EMA weights: eval_reward, eval_change (mean |edited - source| per pixel, 0..1: ~0 = the editor returns the
input unchanged), and on the miniature world eval_edited / eval_kept / eval_pixel (toy.pixel_judge_edit).
"""

import argparse
import json
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from common import (DataError, MetricsLog, cleanup_dist, clone_weights, every, fill_from_rank0, find_checkpoint,
                    fsdp_shard, full_state_of, full_weights, image_grid, keep_rows_through, load_checkpoint, load_image,
                    load_on_rank0, pil_to_tensor, plot_curves, print0, read_manifest, run_stage, save_checkpoint,
                    save_diffusers_model, save_lora_files, seed_everything, setup_dist, tensor_to_pil, use_weights,
                    write_json)
from rl_gen import group_advantages, nft_step, noise_levels, ode_sample, optimality_probability, rectified_flow_interp

# -----------------------------------------------------------------------------
# the editor: loading, latents, prompt encoding, velocity, sampling

# Qwen-Image-Edit-2509's chat template (as its diffusers pipeline writes it; the checkpoint was trained
# with exactly these tokens, so they are kept verbatim). The system turn is dropped from the output.
SYSTEM_PREFIX = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
                 "background), then explain how the user's text instruction should alter or modify the image. Generate a "
                 "new image that meets the user's requirements while maintaining consistency with the original input where "
                 "appropriate.<|im_end|>\n<|im_start|>user\n")
USER_TURN = "Picture 1: <|vision_start|><|image_pad|><|vision_end|>{instruction}<|im_end|>\n<|im_start|>assistant\n"
CONDITION_AREA = 384 * 384  # pixels of the source as the text encoder sees it (the pipeline's CONDITION_IMAGE_SIZE)
# FSDP2 warns that the transformer returns a view; we never modify its output in place
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


@dataclass
class Editor:
    transformer: torch.nn.Module  # QwenImageTransformer2DModel (with LoRA adapters when training)
    text_encoder: torch.nn.Module  # Qwen2_5_VLForConditionalGeneration, frozen
    processor: object  # Qwen2VLProcessor: tokenizer + image processor of the text encoder
    scheduler: object  # FlowMatchEulerDiscreteScheduler: only its noise-level schedule is used
    vae: object  # AutoencoderKLQwenImage, or None: pixel space-to-depth "latents" (the tiny editor)
    resolution: int  # working resolution: images are resized to about resolution^2 pixels
    device: torch.device
    dtype: torch.dtype  # compute dtype of the frozen text encoder / VAE

    @property
    def latent_channels(self):
        return self.transformer.config.in_channels // 4  # 2x2 packing

    @property
    def space_to_depth(self):
        """Pixels per latent cell along a side: the VAE's 8, or sqrt(channels / 3) without a VAE."""
        return 8 if self.vae is not None else math.isqrt(self.latent_channels // 3)

    @property
    def multiple(self):
        return 2 * self.space_to_depth  # latents are packed 2x2


def load_editor(model_dir, lora_dir=None, device=None, dtype=None, resolution=None, transformer_dtype=None, place=True, rank=0):
    """A Qwen-Image-Edit-2509 directory (diffusers layout) -> Editor. lora_dir: a diffusers LoRA to load.

    dtype: of the frozen parts and, by default, the transformer (bf16 on GPU, fp32 on CPU). place=False keeps
    the transformer and text encoder on the CPU: fully_shard moves them to the GPU block by block, so a rank
    never holds a whole 20B transformer on its GPU. rank > 0 (training): the transformer and text encoder are
    empty skeletons (parameters on the meta device) that shard() fills from rank 0 (common.load_on_rank0).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration
    model_dir = Path(model_dir)
    for sub in ("transformer", "text_encoder", "processor", "scheduler"):
        if not (model_dir / sub).is_dir():
            raise DataError(f"{model_dir}: no '{sub}' folder; expected a Qwen-Image-Edit-2509 diffusers directory "
                            "(or build the tiny one: python toy.py pretrain-edit)")
    cls = json.loads((model_dir / "model_index.json").read_text()).get("_class_name") if (model_dir / "model_index.json").is_file() else None
    if cls != "QwenImageEditPlusPipeline":  # the conditioning below is the 2509 pipeline's (as the release trains)
        raise DataError(f"{model_dir}/model_index.json: _class_name is {cls!r}; rl_edit encodes prompts as "
                        "QwenImageEditPlusPipeline (Qwen-Image-Edit-2509) does: 'Picture 1:' template, a 384x384 condition "
                        "image. Another checkpoint (e.g. the original Qwen-Image-Edit) would be conditioned unlike its own "
                        "pipeline; use Qwen-Image-Edit-2509")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tdt = transformer_dtype or dtype
    transformer = load_on_rank0(
        lambda: QwenImageTransformer2DModel.from_pretrained(model_dir, subfolder="transformer", torch_dtype=tdt),
        lambda: QwenImageTransformer2DModel.from_config(QwenImageTransformer2DModel.load_config(model_dir / "transformer")).to(tdt),
        rank)
    text_encoder = load_on_rank0(
        lambda: Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir / "text_encoder", dtype=dtype),
        lambda: Qwen2_5_VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(model_dir / "text_encoder"), dtype=dtype),
        rank).eval()
    text_encoder.requires_grad_(False)
    processor = AutoProcessor.from_pretrained(model_dir / "processor")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    vae = None
    if (model_dir / "vae").is_dir():
        from diffusers import AutoencoderKLQwenImage
        vae = AutoencoderKLQwenImage.from_pretrained(model_dir, subfolder="vae", torch_dtype=dtype).to(device).eval()
        vae.requires_grad_(False)
    extra = json.loads((model_dir / "firm_edit.json").read_text()) if (model_dir / "firm_edit.json").is_file() else {}
    if lora_dir is not None and (Path(lora_dir) / "transformer").is_dir():  # an rl_edit --full-finetune output
        transformer = QwenImageTransformer2DModel.from_pretrained(Path(lora_dir) / "transformer", torch_dtype=transformer_dtype or dtype)
    elif lora_dir is not None:
        transformer.load_lora_adapter(str(lora_dir), weight_name="pytorch_lora_weights.safetensors", prefix="transformer",
                                      adapter_name="default")
    if place:
        transformer, text_encoder = transformer.to(device), text_encoder.to(device)
    editor = Editor(transformer, text_encoder, processor, scheduler, vae, resolution or extra.get("resolution", 512), device, dtype)
    if vae is None and 3 * editor.space_to_depth ** 2 != editor.latent_channels:
        raise DataError(f"{model_dir}: no VAE and {editor.latent_channels} latent channels is not 3 x n^2 (space-to-depth)")
    return editor


def working_size(w, h, resolution, multiple):
    """(W, H) of about resolution^2 pixels with the source's aspect ratio, multiples of `multiple`."""
    scale = resolution / math.sqrt(w * h)
    return (max(multiple, round(w * scale / multiple) * multiple), max(multiple, round(h * scale / multiple) * multiple))


# The ONE place latents are made and unmade: a real VAE (normalised with its latents_mean / latents_std,
# as the pipeline does), or, for the tiny editor, a lossless space-to-depth of the pixels.
@torch.no_grad()
def encode_latents(editor, x):
    """(B, 3, H, W) pixels in [-1, 1] -> (B, C, H / s, W / s) latents."""
    if editor.vae is None:
        return F.pixel_unshuffle(x, editor.space_to_depth)
    cfg = editor.vae.config
    z = editor.vae.encode(x.to(editor.dtype).unsqueeze(2)).latent_dist.mode()[:, :, 0].float()  # (B, C, h, w); 1 frame
    mean, std = (torch.tensor(v, device=z.device).view(1, -1, 1, 1) for v in (cfg.latents_mean, cfg.latents_std))
    return (z - mean) / std


@torch.no_grad()
def decode_latents(editor, z):
    """Inverse of encode_latents: (B, C, h, w) -> (B, 3, H, W) pixels in [-1, 1]."""
    if editor.vae is None:
        return F.pixel_shuffle(z, editor.space_to_depth).clamp(-1, 1)
    cfg = editor.vae.config
    mean, std = (torch.tensor(v, device=z.device).view(1, -1, 1, 1) for v in (cfg.latents_mean, cfg.latents_std))
    x = editor.vae.decode((z * std + mean).to(editor.dtype).unsqueeze(2), return_dict=False)[0][:, :, 0]
    return x.float().clamp(-1, 1)


def pack(z):
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2x2 cell of latents is one token (Qwen-Image's packing)."""
    B, C, h, w = z.shape
    return z.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def unpack(tokens, h, w):
    """(B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    B, N, D = tokens.shape
    return tokens.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, h, w)


def template_prefix_length(tokenizer):
    """Tokens of the system turn, which the pipeline drops from the text stream (64 for Qwen2.5-VL's tokenizer)."""
    return len(tokenizer(SYSTEM_PREFIX, add_special_tokens=False)["input_ids"])


def condition_image(im):
    """The source as the text encoder sees it: about 384x384 pixels (never upscaled), like the pipeline."""
    w, h = im.size
    if w * h <= CONDITION_AREA:
        return im
    return im.resize(working_size(w, h, math.sqrt(CONDITION_AREA), 32), Image.BICUBIC)


@torch.no_grad()
def encode_prompt(editor, instructions, sources):
    """Instructions + source images -> (embeds (B, L, D), mask (B, L) bool) for the transformer's text stream.

    Unlike the diffusers pipeline, this passes mm_token_type_ids (which tokens are image tokens) to the
    text encoder, so Qwen2.5-VL computes its 3-D M-RoPE positions for the image tokens and 1-D ones for
    the text after them; without it every token gets a plain 1-D position.
    """
    for i, s in enumerate(instructions):
        if not isinstance(s, str) or not s.strip():
            raise DataError(f"instruction {i} is empty or not a string: {s!r}")
    proc = editor.processor
    texts = [SYSTEM_PREFIX + USER_TURN.format(instruction=s) for s in instructions]
    inputs = proc(text=texts, images=[condition_image(im) for im in sources], padding=True, return_tensors="pt")
    if "mm_token_type_ids" not in inputs:  # an older processor: mark the image tokens ourselves (text 0, image 1)
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == editor.text_encoder.config.image_token_id).long()
    inputs = {k: v.to(editor.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(editor.dtype)
    hidden = editor.text_encoder(**inputs, output_hidden_states=True).hidden_states[-1]  # (B, T, D), last layer
    drop = template_prefix_length(proc.tokenizer)
    mask = inputs["attention_mask"].bool()
    seqs = [hidden[i][mask[i]][drop:] for i in range(len(texts))]  # real tokens, system turn removed
    L = max(len(s) for s in seqs)
    embeds = torch.stack([F.pad(s, (0, 0, 0, L - len(s))) for s in seqs]).float()
    keep = torch.stack([torch.arange(L, device=hidden.device) < len(s) for s in seqs])
    return embeds, keep


def predict_velocity(transformer, x_t, source, t, embeds, mask, grid):
    """v(x_t, t | source, instruction) for packed latents x_t, source (B, N, 4C); t (B,) in [0, 1].

    The source tokens follow the noisy ones in the sequence; img_shapes gives both the same (h, w) grid
    (frame 0 and 1 for RoPE). The output over the source tokens is discarded.
    """
    B, N = x_t.shape[:2]
    dt = transformer.dtype  # bf16 weights without FSDP (inference); under FSDP2 its policy casts the inputs itself
    out = transformer(hidden_states=torch.cat([x_t, source], 1).to(dt), timestep=t.to(dt),
                      encoder_hidden_states=embeds.to(dt), encoder_hidden_states_mask=None if mask.all() else mask,
                      img_shapes=[[(1, *grid), (1, *grid)]] * B, return_dict=False)[0]
    return out[:, :N]


def editor_noise_levels(editor, steps, n_tokens):
    """The scheduler's steps + 1 noise levels from 1 to 0, as QwenImageEditPlusPipeline sets them: sigmas
    linspace(1, 1/steps), shifted by the token count (exponential shift) when the config asks for it."""
    cfg, kwargs = editor.scheduler.config, {"sigmas": np.linspace(1.0, 1.0 / steps, steps)}
    if cfg.get("use_dynamic_shifting", False):
        b0, b1 = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        s0, s1 = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        kwargs["mu"] = s0 + (s1 - s0) * (n_tokens - b0) / (b1 - b0)  # the pipeline's calculate_shift
    return noise_levels(editor.scheduler, steps, **kwargs)


def prepare_sources(editor, images):
    """PIL sources -> (pixels (B, 3, H, W) at the working size, packed source latents, latent (h, w))."""
    W, H = working_size(*images[0].size, editor.resolution, editor.multiple)
    for im in images:
        if working_size(*im.size, editor.resolution, editor.multiple) != (W, H):
            raise ValueError("one batch must share one aspect ratio")
    x = torch.stack([pil_to_tensor(im.resize((W, H), Image.BICUBIC) if im.size != (W, H) else im) for im in images])
    z = encode_latents(editor, x.to(editor.device))
    return x, pack(z), z.shape[-2:]


def initial_noise(seeds, shape, device):
    """Per-sample noise from per-sample seeds (global indices), identical on any number of ranks."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


@torch.no_grad()
def rollout(editor, sources, instructions, seeds, steps):
    """Edit a batch (one shared working size): returns dict of packed x0, source tokens, text, noise levels, grid."""
    _, src, (h, w) = prepare_sources(editor, sources)
    embeds, mask = encode_prompt(editor, instructions, sources)
    x_T = initial_noise(seeds, (src.shape[1], src.shape[2]), editor.device)
    ts = editor_noise_levels(editor, steps, src.shape[1])
    grid = (h // 2, w // 2)
    vfn = lambda x, t: predict_velocity(editor.transformer, x, src, t, embeds, mask, grid).float()
    x0, _ = ode_sample(vfn, x_T, ts)
    return {"x0": x0, "source": src, "embeds": embeds, "mask": mask, "ts": ts, "grid": grid, "hw": (h, w)}


def to_images(editor, x0, hw, sizes):
    """Packed latents -> PIL images, each resized back to its source's size."""
    x = decode_latents(editor, unpack(x0, *hw)).cpu()
    return [tensor_to_pil(xi).resize(size, Image.BILINEAR) if size != (xi.shape[2], xi.shape[1]) else tensor_to_pil(xi)
            for xi, size in zip(x, sizes)]


def edit(editor, images, instructions, seeds, steps=6, batch_size=16):
    """Edit PIL `images` by `instructions`; sample i starts from the noise of seeds[i]. Returns PIL images
    of the sources' sizes. (For bench.py and the grids: no gradient, any batch size, any GPU count.)"""
    out = [None] * len(images)
    by_size = {}
    for i, im in enumerate(images):  # a batch shares one working size
        by_size.setdefault(working_size(*im.size, editor.resolution, editor.multiple), []).append(i)
    for idx in by_size.values():
        for k in range(0, len(idx), batch_size):
            b = idx[k:k + batch_size]
            r = rollout(editor, [images[i] for i in b], [instructions[i] for i in b], [seeds[i] for i in b], steps)
            for i, im in zip(b, to_images(editor, r["x0"], r["hw"], [images[i].size for i in b])):
                out[i] = im
    return out


# -----------------------------------------------------------------------------
# data: prompt records, checked up front (a bad record stops the run at once, named by file, record and field)


def load_prompt_records(path):
    """{"id", "prompt", "image", "requirement"?, "toy"?} records, all checked first (common.read_manifest): fields, types,
    unique ids, every source image present and decodable. Images are loaded lazily (Sources)."""
    rows = read_manifest(path, {"id": "id", "prompt": "text", "image": "image", "requirement": "str?", "toy": "dict?"},
                         images="decode")
    for r in rows:
        r["image_path"] = Path(path).parent / r["image"]
    return rows


class Sources:
    """Source images by record index, loaded once (load_image raises DataError naming an unreadable file)."""

    def __init__(self, records):
        self.records, self.cache = records, {}

    def __getitem__(self, i):
        if i not in self.cache:
            self.cache[i] = load_image(self.records[i]["image_path"])
        return self.cache[i]


# -----------------------------------------------------------------------------
# rewards: the edit critic's two scores fused (reward.py), or the pixel judge of the miniature world


def pixel_judgements(records, edited):
    """toy.pixel_judge_edit of each edit (edited region vs the target, the rest vs the source), or None off the world."""
    if not records or any("toy" not in r for r in records):
        return None
    import toy
    S = toy.Scene.from_dict
    return [toy.pixel_judge_edit(e, S(r["toy"]["scene"]), S(r["toy"]["target_scene"])) for r, e in zip(records, edited)]


def pixel_judge(records, edited):
    """Means of the pixel judge's edited / kept / overall over the edits, or None off the miniature world."""
    js = pixel_judgements(records, edited)
    return {k: float(np.mean([j[k] for j in js])) for k in js[0]} if js else None


class Rewarder:
    """score(records, sources, edited) -> (rewards: list[float | None], parse failures). Never raises on a
    critic answer that does not parse: that sample's reward is None (dropped from its group) and counted.

    --reward cme | sum55 | sum64: the critic's execution and consistency, fused (reward.py).
    --reward pixel: the miniature world's exact judge (edited x kept), a control with a perfect reward.
    --reward pixel-cme | pixel-sum55 | pixel-sum64: the same fusions of a critic with perfect perception,
      execution = the pixel judge's `edited`, consistency = its `kept`: the fusion ablation without the
      critic's own errors (these make the pixel judge part of the reward: it is no longer independent).
    """

    def __init__(self, args, device):
        self.fusion, self.method = args.reward, args.reward_method
        if args.reward.startswith("pixel"):
            self.scorer = None
        else:
            from reward import open_critic
            self.scorer = open_critic(args.reward_model, device=device, max_new_tokens=args.reward_max_new_tokens,
                                      batch_size=args.reward_batch)

    def score(self, records, sources, edited):
        if not records:
            return [], 0
        if self.fusion.startswith("pixel"):
            from reward import fuse
            js = pixel_judgements(records, edited)
            if js is None:
                raise DataError(f"--reward {self.fusion} needs the miniature world's records (field 'toy')")
            if self.fusion == "pixel":
                return [j["overall"] for j in js], 0
            # fractions in [0, 1] as the 1-5 scores that normalise to them
            return [fuse(self.fusion[6:], {"execution": 1 + 4 * j["edited"], "consistency": 1 + 4 * j["kept"]}) for j in js], 0
        from reward import edit_rewards, failure_note
        items = [{"source": s, "edited": e, "instruction": r["prompt"], "requirement": r.get("requirement")}
                 for r, s, e in zip(records, sources, edited)]
        rewards, stats = edit_rewards(self.scorer, items, fusion=self.fusion, on_failure="drop", method=self.method)
        if note := failure_note(stats):  # a dead critic server, answers cut by the limit, or answers with no score
            print0(f"rank 0: {note}")
        return rewards, stats["failed"]


# -----------------------------------------------------------------------------
# model: LoRA adapters, FSDP2 (the old policy / reference / EMA are parameter values that common.use_weights
# swaps in; checkpoints are common.save_checkpoint / load_checkpoint: the plumbing lives once, there)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]  # attention


def add_lora(transformer, rank, alpha):
    from peft import LoraConfig
    cfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    transformer.add_adapter(cfg)  # peft: B = 0 at init, so the adapted model starts as the base model
    return cfg


def shard(editor, world):
    """FSDP2: every transformer block, then the root; the frozen text encoder likewise (its decoder layers,
    the vision tower, the root), so a 7B encoder is split across ranks too. Then rank 0's weights (the only
    rank that read the checkpoint) are broadcast into every rank's shards."""
    from torch.distributed.device_mesh import init_device_mesh
    dev = editor.device
    full = [full_state_of(m, dist.get_rank()) for m in (editor.transformer, editor.text_encoder)]
    mesh = init_device_mesh(dev.type, (world,))
    fsdp_shard(editor.transformer, editor.transformer.transformer_blocks, dev, mesh)
    te = editor.text_encoder  # frozen, already in its dtype: no mixed precision
    fsdp_shard(te, [*te.model.language_model.layers, te.model.visual], dev, mesh, mp=False)
    for m, sd in zip((editor.transformer, te), full):
        fill_from_rank0(m, sd, dev)


# -----------------------------------------------------------------------------
# batching over ranks


def plan_batches(keys, rank, world, micro_batch):
    """Micro-batches of global sample indices for this rank: samples g with g % world == rank, grouped by
    `keys[g]` (the working size: one batch, one shape), chunked. Padded with dummy batches (flag False)
    to the largest count over ranks, because every FSDP forward is collective: all ranks run as many."""
    plans = []
    for r in range(world):
        groups = {}
        for g in range(r, len(keys), world):
            groups.setdefault(keys[g], []).append(g)
        plans.append([grp[i:i + micro_batch] for grp in groups.values() for i in range(0, len(grp), micro_batch)])
    n = max(len(p) for p in plans)
    mine = plans[rank]
    filler = mine[0] if mine else [0]
    return [(b, True) for b in mine] + [(filler, False)] * (n - len(mine))


def edit_all_ranks(editor, sources, instructions, seeds, steps, micro_batch, rank, world):
    """Edits of every sample, computed spread over the ranks, returned on every rank (PIL, sources' sizes)."""
    keys = [working_size(*im.size, editor.resolution, editor.multiple) for im in sources]
    mine = {}
    for b, real in plan_batches(keys, rank, world, micro_batch):
        r = rollout(editor, [sources[g] for g in b], [instructions[g] for g in b], [seeds[g] for g in b], steps)
        if real:
            for g, im in zip(b, to_images(editor, r["x0"], r["hw"], [sources[g].size for g in b])):
                mine[g] = np.asarray(im)
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    merged = {g: a for p in parts for g, a in p.items()}
    return [Image.fromarray(merged[g]) for g in range(len(sources))]


# -----------------------------------------------------------------------------
# save: the EMA weights in the formats diffusers loads


def save_lora(out_dir, model, params, values, lora_cfg, rank, sidecar):
    """The adapters as a diffusers LoRA (pytorch_lora_weights.safetensors + .json sidecar): pipe.load_lora_weights(out_dir)."""
    from diffusers import QwenImageEditPlusPipeline
    full = full_weights(model, params, values)  # only the adapters are gathered, never the 20B base
    if rank == 0:
        sd = {n.replace(".default.", "."): v.contiguous() for n, v in full.items()}
        meta = {"r": lora_cfg.r, "lora_alpha": lora_cfg.lora_alpha, "target_modules": sorted(lora_cfg.target_modules)}
        save_lora_files(QwenImageEditPlusPipeline, out_dir, sd, meta, sidecar)


def save_transformer(out_dir, editor, params, values, rank, sidecar):
    """Full fine-tuning: the whole transformer with `values` in, as a diffusers model folder in the frozen parts'
    dtype (bf16 on GPU), sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    with use_weights(editor.transformer, params, values):
        sd = get_model_state_dict(editor.transformer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_diffusers_model(out_dir, editor.transformer, sd, editor.dtype)
        write_json(Path(out_dir) / "rl_edit.json", sidecar)


# -----------------------------------------------------------------------------
# CLI. A preset sets defaults; any flag given explicitly still wins.

PRESETS = {
    # The miniature world on one CPU core: the tiny editor (toy.py pretrain-edit), the tiny edit critic
    # (train_reward.py), few prompts and samples, a few minutes per run.
    "mini": dict(model="runs/mini/models/edit-base", prompts="runs/mini/data/rl/edit_train.jsonl",
                 test_prompts="runs/mini/data/rl/edit_test.jsonl", reward_model="runs/mini/models/edit-critic",
                 out_root="runs/mini", steps=30, prompts_per_step=4, group_size=8, micro_batch=32,
                 timestep_fraction=0.34, lora_rank=16, lora_alpha=32, lr=1e-3, eval_every=10, save_every=10, eval_steps=6,
                 gradient_checkpointing=False,
                 eval_prompts=32, reward_max_new_tokens=192, reward_batch=32, threads=1),
}


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="DiffusionNFT for an image editor with the FIRM edit critic",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="named defaults for a CPU run (see PRESETS)")
    # model and data
    ap.add_argument("--model", default=None, help="Qwen-Image-Edit(-2509) diffusers directory (or the tiny editor)")
    ap.add_argument("--prompts", default=None, help="training prompt records (JSONL: id, prompt, image, requirement)")
    ap.add_argument("--test-prompts", default=None, help="held-out prompt records for evaluation (default: the first training ones)")
    ap.add_argument("--out", default=None, help="output directory (default with --preset: <out-root>/rl_edit_<reward>)")
    ap.add_argument("--out-root", default=None, help="preset only: parent of the output directory")
    ap.add_argument("--resolution", type=int, default=None, help="working resolution, px per side of a square (default 512; the tiny editor's own)")
    # reward
    ap.add_argument("--reward", choices=["cme", "sum55", "sum64", "pixel", "pixel-cme", "pixel-sum55", "pixel-sum64"],
                    default="cme", help="fusion of the critic's execution E and consistency C: cme = E(0.6 + 0.4C) "
                    "(paper); sum55 / sum64 = 0.5E + 0.5C / 0.6E + 0.4C (Table 5 baselines). Miniature world only: "
                    "pixel = the exact pixel judge; pixel-* = the fusions with E, C from the pixel judge (see Rewarder)")
    ap.add_argument("--reward-model", default=None, help="the edit critic: a model directory, loaded on every rank "
                    "(FIRM-Edit-8B, or the tiny critic), or an OpenAI-compatible endpoint http://host:port/v1[#served "
                    "name] (reward.open_critic; its key from $FIRM_CRITIC_API_KEY)")
    ap.add_argument("--reward-method", choices=["generate", "expected"], default="generate",
                    help="critic scoring: greedy answer then parse (paper), or expected score from digit probabilities")
    ap.add_argument("--reward-batch", type=int, default=16, help="items per critic forward")
    ap.add_argument("--reward-max-new-tokens", type=int, default=None, help="critic answer length limit, tokens (default: reward.py's "
                    "per-mode limit, the release's 256 for the edit critic)")
    # rollout
    ap.add_argument("--rollout-steps", type=int, default=6, help="ODE steps per edit (release: sample.num_steps 6)")
    ap.add_argument("--eval-steps", type=int, default=15, help="ODE steps per evaluation edit (release: sample.eval_num_steps 15)")
    ap.add_argument("--prompts-per-step", type=int, default=24, help="prompts per RL step, all ranks together (release: 24 "
                    "groups; the paper says 16)")
    ap.add_argument("--group-size", type=int, default=12, help="edits per prompt (K; release: num_image_per_prompt 12, the "
                    "paper says 16); need not divide the rank count")
    ap.add_argument("--micro-batch", type=int, default=8, help="samples per forward on one rank")
    # DiffusionNFT
    ap.add_argument("--nft-beta", type=float, default=1.0, help="NFT mixing coefficient beta of v+ / v- (release: config.beta; "
                    "not the KL weight)")
    ap.add_argument("--kl-weight", type=float, default=1e-4, help="weight of mse(v, v_ref) to the frozen base model (release: "
                    "train.beta)")
    ap.add_argument("--timestep-fraction", type=float, default=0.99, help="trained timesteps per sample = int(fraction x "
                    "rollout steps), >= 1 (release: 0.99)")
    ap.add_argument("--adv-clip", type=float, default=5.0, help="advantages clipped to +-this; also the loss scale (release: 5)")
    # optimisation
    ap.add_argument("--steps", type=int, default=150, help="RL steps, one optimizer step each (paper: 150)")
    ap.add_argument("--lr", type=float, default=1.5e-3, help="AdamW learning rate (release: editing/config/base.py 1.5e-3)")
    ap.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (release: 1e-4)")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (release: 1.0)")
    ap.add_argument("--lora-rank", type=int, default=32, help="LoRA rank on the attention projections (release: 32)")
    ap.add_argument("--lora-alpha", type=float, default=64, help="LoRA alpha, scale alpha / rank (release: 64)")
    ap.add_argument("--full-finetune", action="store_true", help="train every transformer weight instead of LoRA adapters")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="recompute each transformer block in backward (release: on; a 20B editor needs it on 80 GB)")
    # evaluation, logging, checkpoints
    ap.add_argument("--eval-every", type=int, default=25, help="steps between evaluations on the test prompts with the EMA "
                    "weights, also before the first and after the last (0 = never; no grid)")
    ap.add_argument("--eval-prompts", type=int, default=64, help="test prompts evaluated (one edit each, fixed seeds)")
    ap.add_argument("--grid-prompts", type=int, default=8, help="test prompts in the edit grids")
    ap.add_argument("--save-every", type=int, default=25, help="steps between checkpoints (--out/checkpoint; release: 50), "
                    "and after the last step (0 = after the last only)")
    ap.add_argument("--resume", action="store_true", help="continue from --out/checkpoint if it exists")
    ap.add_argument("--stop-after", type=int, default=None, help="testing: exit after this many steps as if killed (no final save)")
    ap.add_argument("--seed", type=int, default=0, help="prompt order, noise and timesteps")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank")
    pre, _ = ap.parse_known_args(argv)
    if pre.preset:
        ap.set_defaults(**PRESETS[pre.preset])
    args = ap.parse_args(argv)
    if args.out is None and args.out_root:
        args.out = f"{args.out_root}/rl_edit_{args.reward}"
    for flag in ("model", "prompts", "out"):
        if not getattr(args, flag):
            ap.error(f"--{flag} is required (or use --preset mini)")
    if not args.reward.startswith("pixel") and not args.reward_model:
        ap.error("--reward-model is required (or --reward pixel on the miniature world)")
    return args


# -----------------------------------------------------------------------------
# the loop


def sample_seed(seed, step, g):
    """A per-sample seed from the run seed, the step and the sample's global index (not the rank)."""
    return (seed * 1_000_003 + step) * 100_003 + g


def main(args):
    rank, world, device = setup_dist()
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    records = load_prompt_records(args.prompts)
    test = load_prompt_records(args.test_prompts) if args.test_prompts else records
    if args.reward.startswith("pixel") and any("toy" not in r for r in records):
        raise DataError(f"{args.prompts}: --reward {args.reward} needs the miniature world's records (field 'toy')")
    rewarder = Rewarder(args, device)  # before the editor: a wrong critic path or URL fails in seconds
    # LoRA: frozen base in the compute dtype, fp32 adapters; full fine-tuning: fp32 master weights
    editor = load_editor(args.model, device=device, resolution=args.resolution, place=False, rank=rank,
                         transformer_dtype=torch.float32 if args.full_finetune else None)
    test = test[:args.eval_prompts]
    sources, test_sources = Sources(records), [load_image(r["image_path"]) for r in test]
    tr = editor.transformer
    tr.requires_grad_(args.full_finetune)
    lora_cfg = None if args.full_finetune else add_lora(tr, args.lora_rank, args.lora_alpha)
    if args.gradient_checkpointing:
        tr.enable_gradient_checkpointing()
    for p in tr.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trained weights and their AdamW state in fp32
    shard(editor, world)
    params = [p for p in tr.parameters() if p.requires_grad]
    # Parameter values the loop swaps in: the frozen reference (LoRA: B = 0, i.e. the base model), the old
    # (rollout) policy and the EMA that gets saved. All are sharded like the parameters themselves.
    ref, old, ema = clone_weights(params), clone_weights(params), clone_weights(params)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    start = 0
    ckpt = find_checkpoint(out, rank) if args.resume else None
    if ckpt is not None:
        # strict=False: adapters that never get a gradient (the last block's text-stream output is unused) have no AdamW state
        start, old, ema = load_checkpoint(ckpt, tr, params, opt, strict=False)
        print0(f"resumed from {ckpt} after step {start}")
        if rank == 0:  # forget what the killed run logged after its checkpoint
            keep_rows_through(out / "metrics.jsonl", start)
    P, K = args.prompts_per_step, args.group_size
    N, T = P * K, max(1, int(args.timestep_fraction * args.rollout_steps))
    n_train = sum(p.numel() for p in params)  # a sharded DTensor reports its full size
    print0(f"{world} rank(s) | {N} edits per step ({P} prompts x {K}), about {math.ceil(N / world)} per rank | "
           f"{args.rollout_steps} rollout steps, {T} trained timesteps per edit | reward {args.reward} | "
           f"{'full fine-tuning' if args.full_finetune else f'LoRA r{args.lora_rank} alpha {args.lora_alpha:g}'}: "
           f"{n_train / 1e6:.3f} M trainable parameters | {editor.resolution} px | {len(records)} prompts, {len(test)} test")
    if rank == 0:
        write_json(out / "rl_edit_args.json", vars(args))
    log = MetricsLog(out / "metrics.jsonl", enabled=rank == 0)
    test_seeds = [sample_seed(args.seed + 1, 10**6, g) for g in range(len(test))]

    def evaluate(values):
        """Edit the test prompts with the given weights (fixed seeds); critic reward + pixel judge on rank 0."""
        with use_weights(tr, params, values):
            imgs = edit_all_ranks(editor, test_sources, [r["prompt"] for r in test], test_seeds, args.eval_steps,
                                  args.micro_batch, rank, world)
        m = {}
        if rank == 0:
            rw, fails = rewarder.score(test, test_sources, imgs)
            ok = [x for x in rw if x is not None]
            m = {"eval_reward": float(np.mean(ok)) if ok else None, "eval_parse_failures": fails,
                 "eval_change": float(np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(s, np.float32)).mean() / 255
                                               for a, s in zip(imgs, test_sources)]))}
            pj = pixel_judge(test, imgs)
            if pj:
                m.update({"eval_edited": pj["edited"], "eval_kept": pj["kept"], "eval_pixel": pj["overall"]})
        return imgs, m

    before = after = m_after = None
    if start == 0 and args.eval_every:
        before, m = evaluate(ema)  # the EMA is the base model here
        log.log(0, **m)
    for step in range(start, args.steps):
        t0 = time.time()
        # 1. this step's prompts and per-sample seeds: functions of (seed, step, global index), never of the rank
        rng = random.Random(f"{args.seed}:{step}")
        chosen = rng.sample(range(len(records)), P) if P <= len(records) else [rng.randrange(len(records)) for _ in range(P)]
        prompt_of = [chosen[g // K] for g in range(N)]
        seeds = [sample_seed(args.seed, step, g) for g in range(N)]
        keys = [working_size(*sources[p].size, editor.resolution, editor.multiple) for p in prompt_of]
        plan = plan_batches(keys, rank, world, args.micro_batch)

        # 2. rollout with the old policy (no grad): K edits of each prompt, x0 kept for training
        batches = []
        with use_weights(tr, params, old):
            for b, real in plan:
                r = rollout(editor, [sources[prompt_of[g]] for g in b], [records[prompt_of[g]]["prompt"] for g in b],
                            [seeds[g] for g in b], args.rollout_steps)
                batches.append(dict(r, idx=b, real=real))
        t_roll = time.time() - t0

        # 3. rewards: each rank scores its own edits, then all ranks see all rewards (None = critic parse failure)
        mine, imgs = [], []
        for r in batches:
            if r["real"]:
                mine += r["idx"]
                imgs += to_images(editor, r["x0"], r["hw"], [sources[prompt_of[g]].size for g in r["idx"]])
        recs = [records[prompt_of[g]] for g in mine]
        rw, fails = rewarder.score(recs, [sources[prompt_of[g]] for g in mine], imgs)
        buf = torch.zeros(N, 2, dtype=torch.float64)  # (reward, present) per global sample index
        for g, x in zip(mine, rw):
            if x is not None:
                buf[g] = torch.tensor([x, 1.0])
        pj = pixel_judge(recs, imgs)
        extra = torch.tensor([fails, len(mine), (pj or {}).get("overall", 0.0) * len(mine)], dtype=torch.float64)
        buf, extra = buf.to(device), extra.to(device)  # NCCL reduces GPU tensors only
        dist.all_reduce(buf)  # sync point: every rank needs every reward for the group advantages
        dist.all_reduce(extra)
        buf, extra = buf.cpu(), extra.cpu()
        rewards = [buf[g, 0].item() if buf[g, 1] > 0 else None for g in range(N)]
        adv = group_advantages(rewards, [g // K for g in range(N)], clip=args.adv_clip)
        valid = ~torch.isnan(adv)
        n_valid = int(valid.sum())
        t_reward = time.time() - t0 - t_roll

        # 4-5. DiffusionNFT update on T of the rollout's own noise levels per edit, fresh noise each, then the soft
        #      updates of the old policy and the EMA (rl_gen.nft_step: the same update as rl_gen's). A sample whose
        #      reward failed to parse, or a dummy batch, has weight 0 but still runs: every FSDP forward is collective.
        r_all = optimality_probability(adv.nan_to_num(0.0), clip=args.adv_clip).float()
        micro = []
        for r in batches:
            b, x0 = r["idx"], r["x0"]
            w = torch.tensor([float(valid[g]) if r["real"] else 0.0 for g in b], device=device)
            levels = r["ts"][:-1]  # the rollout's noise levels, without the final 0
            gens = [torch.Generator().manual_seed(seeds[g] + 1) for g in b]
            picks = [torch.randperm(len(levels), generator=gn)[:T] for gn in gens]
            ts = torch.stack([torch.stack([levels[p[j]] for j in range(T)]) for p in picks]).float().to(device)  # (B, T)
            eps = torch.stack([torch.stack([torch.randn(x0.shape[1:], generator=gn) for gn in gens]) for _ in range(T)], 1)
            x_t = rectified_flow_interp(x0[:, None], eps.to(device), ts[..., None, None])  # (B, T, N, 4C) packed tokens
            vfn = lambda x, t, r=r: predict_velocity(tr, x, r["source"], t, r["embeds"], r["mask"], r["grid"]).float()
            micro.append((vfn, x_t, ts, x0, r_all[b].to(device), w))
        stats = nft_step(tr, params, opt, old, ema, ref, micro, n_valid, step, args, world)
        if stats is None:
            print0(f"step {step + 1}: no critic answer parsed in the whole batch; skipping the update")
            stats = torch.zeros(4, dtype=torch.float64, device=device)
        sums = stats.clone()
        sums[3] = 0
        dist.all_reduce(sums)  # sync point: loss sums of every rank's samples, for the log

        ok = [x for x in rewards if x is not None]
        m = {"reward": float(np.mean(ok)) if ok else None, "reward_std": float(np.std(ok)) if ok else None,
             "parse_failures": int(extra[0]), "loss": sums[0].item() / max(1, n_valid * T),
             "nft": sums[1].item() / max(1, n_valid * T), "kl": sums[2].item() / max(1, n_valid * T),
             "grad_norm": float(stats[3])}
        if pj is not None:
            m["train_pixel"] = extra[2].item() / max(1.0, extra[1].item())
        m.update({"t_rollout": round(t_roll, 2), "t_reward": round(t_reward, 2), "t_step": round(time.time() - t0, 2)})
        done = step + 1
        if args.eval_every and (every(done, args.eval_every) or done == args.steps):
            after, m_after = evaluate(ema)
            m.update(m_after)
        log.log(done, **m)
        if every(done, args.save_every) or done == args.steps:  # the last step too: --resume after the end is a no-op
            save_checkpoint(out, tr, params, opt, old, ema, done, rank)
        if args.stop_after is not None and done >= start + args.stop_after:
            print0(f"stopping after {args.stop_after} steps (--stop-after), as if killed")
            cleanup_dist()
            return

    # save the EMA weights, the grids (source | before RL | after RL) and the summary
    sidecar = {"base_model": str(args.model), "steps": args.steps, "reward": args.reward, "weights": "EMA", "args": vars(args)}
    if args.full_finetune:
        save_transformer(out / "transformer", editor, params, ema, rank, sidecar)
    else:
        save_lora(out, tr, params, ema, lora_cfg, rank, sidecar)
    if args.eval_every:  # 0 = never evaluate: no grid, no before / after summary
        if before is None:  # resumed: the base model's edits again (same seeds)
            before, _ = evaluate(ref)
        if after is None:
            after, m_after = evaluate(ema)
    if rank == 0:
        if before is not None:
            rows = [[s, b, a] for s, b, a in zip(test_sources, before, after)][:args.grid_prompts]
            image_grid(rows).save(out / "samples_grid.png")
        rows_metrics = [json.loads(l) for l in open(out / "metrics.jsonl")]
        series = {k: [(r["step"], r[k]) for r in rows_metrics if r.get(k) is not None]
                  for k in ("reward", "eval_reward", "eval_pixel", "eval_edited", "eval_kept")}
        plot_curves(out / "reward_curve.png", {k: v for k, v in series.items() if v}, title=f"rl_edit --reward {args.reward}")
        first = next((r for r in rows_metrics if r["step"] == 0), {})
        summary = {"reward": args.reward, "steps": args.steps, "before": {k: v for k, v in first.items() if k.startswith("eval_")},
                   "after": m_after, "noop": pixel_judge(test, test_sources), "args": vars(args)}
        write_json(out / "rl_edit.json", summary)
        print0(f"wrote {out}: {'transformer/' if args.full_finetune else 'pytorch_lora_weights.safetensors'}, samples_grid.png (source | before | after), "
               f"reward_curve.png, metrics.jsonl, rl_edit.json")
        print0("before: " + json.dumps(summary["before"]) + "\nafter:  " + json.dumps(m_after))
    cleanup_dist()


if __name__ == "__main__":
    run_stage(main, get_args())
