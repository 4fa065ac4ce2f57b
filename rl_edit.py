"""DiffusionNFT for an instruction-based image editor (Qwen-Image-Edit-2509) with the FIRM CME reward (Sec 3.4, 4.1).

The same RL step as rl_gen.py (its docstring numbers the steps; main() below follows them), with an editor as the
policy: the old policy edits each of P source images K times (6-step deterministic ODE), the edit critic scores every
edit for execution E and consistency C, and the scores are fused into one reward (--reward: CME = E (0.6 + 0.4 C), the
paper's choice, or the weighted sums of its Table 5). The DiffusionNFT block (advantages, r, loss, update, decays,
sampler) is imported from rl_gen.py, where the algorithm lives once. What this file adds is the model adapter: how
Qwen-Image-Edit is conditioned, how its velocity is predicted, how latents are made and unmade.

    python rl_edit.py --preset mini                                  # the miniature world -> runs/mini/rl_edit_cme
    torchrun --standalone --nproc_per_node=8 rl_edit.py --model /ckpt/Qwen-Image-Edit-2509 \
        --prompts edits.jsonl --test-prompts edits_test.jsonl --reward-model /ckpt/FIRM-Edit-8B --out runs/firm-edit
    (or --reward-model http://critic-host:8000/v1#firm-edit: a critic served by vLLM, see the README)

Prompt records (JSONL): {"id", "prompt" (the instruction), "image" (the source, relative to the JSONL file),
"requirement" (optional, for the critic)}. Outputs (--out), as rl_gen.py's: pytorch_lora_weights.safetensors (the EMA
adapters; pipe.load_lora_weights(out)) + .json sidecar, or transformer/ with --full-finetune; metrics.jsonl, eval.jsonl,
reward_curve.png, samples_grid.png (held-out sources, then their edits at each evaluation), checkpoint/.

Conditioning, as Qwen-Image-Edit-2509 does it (read diffusers' pipeline_qwenimage_edit_plus.py beside this):
  - the source is encoded to latents, packed 2x2 into tokens and concatenated AFTER the noisy latents along the
    sequence; img_shapes lists both grids, so RoPE gives the source frame index 1 at the same (h, w) positions; only
    the first half of the output (the noisy latents' tokens) is the velocity;
  - the instruction and the source (at ~384x384) go through Qwen2.5-VL in the edit chat template; the last layer's
    hidden states, without the system-prompt prefix, are the text stream;
  - the transformer takes t in [0, 1]; the noise levels come from the checkpoint's scheduler (exponential shift by
    the token count).

Departures from the paper / release (and those of rl_gen.py: weight values swapped in, failed rewards dropped):
  1. Our own prompt encoding: it passes mm_token_type_ids to Qwen2.5-VL (diffusers drops it, so under transformers 5
     the image tokens get 1-D instead of 3-D M-RoPE positions; the release's transformers 4 derived 3-D ones from the
     input ids, as here) and measures the template prefix to drop (diffusers hard-codes 64).
  2. Our own sampler (rl_gen.ode_sample) at --resolution (512 px, the paper's), not the pipeline's ~1 MP; edits are
     resized back to the source's size for the critic. Its state and stored x0 stay fp32 (the release's: bf16).
  3. Defaults follow the release's editing configs where the paper is silent or differs: lr 1.5e-3, 24 prompts x 12
     edits per step, 15 evaluation steps, gradient checkpointing; 150 steps as the paper. The LoRA is trained and saved
     guidance-free: sample it with true_cfg_scale=1.0.
  4. Without a VAE (the miniature world's tiny editor) the "latents" are the pixels rearranged space-to-depth
     (lossless; encode_latents / decode_latents are the one place that knows).
  5. Sources keep their aspect ratio (the release center-crops them to a square, which can cut away what the
     instruction refers to); the instruction is not truncated (the release: 256 text tokens, template included);
     one advantage group per record (the release groups by instruction text, merging sources that share one);
     evaluation uses the rollouts' ODE sampler (the release: Euler).
"""

import argparse
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from common import (add_rl_args, all_gather_values, cleanup_dist, clone_weights, DataError, evaluate_rl,
                    fill_from_rank0, fsdp_shard, full_state_of, full_weights, load_image, load_on_rank0, noise_like,
                    parse_with_preset, pil_to_tensor, print0, rank_batches, read_manifest, RLRun, run_stage,
                    sample_seed, save_diffusers_model, save_lora_files, seed_everything, setup_dist, step_prompts,
                    tensor_to_pil, use_weights, write_json)
from reward import METHODS, open_critic, rl_rewards
from rl_gen import nft_step, noise_levels, ode_sample, optimality_targets, training_points

# -----------------------------------------------------------------------------
# CLI: the defaults are the release's editing settings; a preset swaps in a small setting (explicit flags win)

PRESETS = {
    # The miniature world on one CPU core: the tiny editor (python -m toy pretrain-edit) and the tiny edit critic;
    # 4 prompts x 8 edits per step, 2 of the 6 noise levels trained per edit, LoRA r16 at lr 1e-3. 10 steps, stopped
    # early: in two main jobs of 30 steps the held-out judge was highest at step 10 (or at 0) and then fell while
    # the critic's reward kept rising (NOTES.md). The KL to the base at weight 1, as in rl_gen's preset: in both
    # worlds measured it shrank the losses from the edit critic (-0.004, -0.055 to 0.000, -0.017) and gained nothing.
    "mini": dict(model="runs/mini/models/edit-base", prompts="runs/mini/data/rl/edit_train.jsonl",
                 test_prompts="runs/mini/data/rl/edit_test.jsonl", reward_model="runs/mini/models/edit-critic",
                 eval_judge="toy.judges:pixel", out="runs/mini/rl_edit_cme", steps=10, prompts_per_step=4, group_size=8,
                 micro_batch=32, timestep_fraction=0.34, lora_rank=16, lora_alpha=32, lr=1e-3, kl_weight=1.0, eval_every=2,
                 save_every=5, eval_steps=6, gradient_checkpointing=False, eval_prompts=32, grid_prompts=8,
                 reward_max_new_tokens=192, reward_batch=32, threads=1),
}


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # model and data
    ap.add_argument("--model", default=None, help="Qwen-Image-Edit-2509 diffusers directory")
    ap.add_argument("--prompts", default=None, help="JSONL {id, prompt, image[, requirement]} of RL training edits")
    ap.add_argument("--test-prompts", default=None, help="JSONL of held-out edits for evaluation (optional)")
    ap.add_argument("--out", default="runs/rl_edit", help="output directory")
    ap.add_argument("--resolution", type=int, default=None, help="working resolution, px per side of a square "
                    "(default 512, or the tiny editor's own)")
    # release (editing/config): 6 rollout / 15 evaluation steps, 24 groups of 12, lr 1.5e-3, 150 steps (paper)
    add_rl_args(ap, METHODS, reward="cme", fusions=("cme", "sum55", "sum64"), rollout_steps=6, eval_steps=15, prompts_per_step=24,
                group_size=12, steps=150, lr=1.5e-3, eval_every=25, save_every=25)
    ap.set_defaults(gradient_checkpointing=True)  # release: on; a 20B editor needs it on 80 GB
    return parse_with_preset(ap, PRESETS, argv, required=("model", "prompts", "reward_model"))


# -----------------------------------------------------------------------------
# the model adapter: the editor (loading, latents, prompt encoding, velocity, sampling), LoRA, FSDP2, saving

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
    condition_area: int = CONDITION_AREA  # pixels of the source as the text encoder sees it

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
                            "(or build the tiny one: python -m toy pretrain-edit)")
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
    editor = Editor(transformer, text_encoder, processor, scheduler, vae, resolution or extra.get("resolution", 512), device, dtype,
                    extra.get("condition_area", CONDITION_AREA))
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


def condition_image(im, area=CONDITION_AREA):
    """The source as the text encoder sees it, as the pipeline resizes it: about `area` pixels (384x384) with its
    aspect ratio, sides multiples of 32, up or down, Lanczos (diffusers' image processor, like the release)."""
    size = working_size(*im.size, math.sqrt(area), 32)
    return im if im.size == size else im.resize(size, Image.LANCZOS)


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
    images = [condition_image(im, editor.condition_area) for im in sources]
    inputs = proc(text=texts, images=images, padding=True, return_tensors="pt")
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
    x = torch.stack([pil_to_tensor(im.resize((W, H), Image.LANCZOS) if im.size != (W, H) else im) for im in images])
    z = encode_latents(editor, x.to(editor.device))
    return x, pack(z), z.shape[-2:]




@torch.no_grad()
def rollout(editor, sources, instructions, seeds, steps):
    """Edit a batch (one shared working size): returns dict of packed x0, source tokens, text, noise levels, grid."""
    _, src, (h, w) = prepare_sources(editor, sources)
    embeds, mask = encode_prompt(editor, instructions, sources)
    x_T = noise_like((src.shape[1], src.shape[2]), seeds, editor.device)  # (B, N, 4C) packed tokens
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
# data and reward


def load_prompts(path):
    """{"id", "prompt", "image", "requirement"?, ...} records, all checked first (common.read_manifest): fields, types,
    unique ids, every source image present and decodable. Other fields travel with the record (a judge may read them)."""
    rows = read_manifest(path, {"id": "id", "prompt": "text", "image": "image", "requirement": "str?"}, images="decode")
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


def score(critic, fusion, recs, sources, edited, method="generate"):
    """Step 2: the critic's execution and consistency of each edit fused into a reward in [0, 1]; None where an answer
    gave no score (that edit is dropped from its group)."""
    items = [{"source": s, "edited": e, "instruction": r["prompt"], "requirement": r.get("requirement"), "record": r}
             for r, s, e in zip(recs, sources, edited)]
    return rl_rewards("edit", critic, items, fusion, method)


# -----------------------------------------------------------------------------
# the loop


def main(args):
    # Setup: one code path for python and torchrun (a world of one without it)
    rank, world, device = setup_dist(args.threads)
    seed_everything(args.seed)  # the LoRA initialisation
    out = Path(args.out)
    train = load_prompts(args.prompts)
    test = load_prompts(args.test_prompts)[:args.eval_prompts] if args.test_prompts and args.eval_every else []
    # the critics before the policy: a wrong path or URL fails in seconds
    critic = open_critic(args.reward_model, device=device, prompt_file=args.reward_prompt_file,
                         max_new_tokens=args.reward_max_new_tokens, batch_size=args.reward_batch)
    judge = open_critic(args.eval_judge, device=device, batch_size=args.reward_batch) if args.eval_judge and test else None

    # The policy: LoRA (or every weight) in fp32 over the frozen base, FSDP2, the optimizer after sharding; the frozen
    # base (LoRA: B = 0), the old (rollout) policy and the EMA are values of the trained parameters
    editor = load_editor(args.model, device=device, resolution=args.resolution, place=False, rank=rank,
                         transformer_dtype=torch.float32 if args.full_finetune else None)
    model = editor.transformer
    model.requires_grad_(args.full_finetune)
    lora_cfg = None if args.full_finetune else add_lora(model, args.lora_rank, args.lora_alpha)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trained weights and their AdamW state in fp32
    shard(editor, world)
    params = [p for p in model.parameters() if p.requires_grad]
    ref = clone_weights(params) if args.kl_weight > 0 else None
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    # strict=False: adapters that never get a gradient (the last block's text-stream output is unused) have no AdamW state
    test_sources = [load_image(r["image_path"]) for r in test]
    run = RLRun(args, model, params, opt, rank, device, f"rl_edit --reward {args.reward}", min(args.grid_prompts, len(test)),
                first_column=test_sources)  # the grid: each held-out source, then its edits at each evaluation
    start, old, ema = run.resume(clone_weights(params), clone_weights(params), strict=False)

    P, K = args.prompts_per_step, args.group_size
    N, T = P * K, max(1, int(args.timestep_fraction * args.rollout_steps))  # edits per step; trained levels per edit
    sources = Sources(train)
    size_of = lambda im: working_size(*im.size, editor.resolution, editor.multiple)  # one batch, one working size
    print0(f"{world} rank(s) | {'full fine-tuning' if args.full_finetune else f'LoRA r{args.lora_rank} alpha {args.lora_alpha:g}'}: "
           f"{sum(p.numel() for p in params) / 1e6:.3f} M trained parameters | {editor.resolution} px working resolution")
    print0(f"per step: {P} prompts x {K} edits = {N} rollouts, ~{math.ceil(N / world)} per rank | {args.rollout_steps} "
           f"sampler steps, {T} trained noise levels per edit | reward {args.reward} | {len(train)} prompts, {len(test)} held out")
    def evaluate(step):  # the EMA weights (what gets saved), one edit per held-out prompt, the same seeds every time
        def draw(idx):
            r = rollout(editor, [test_sources[i] for i in idx], [test[i]["prompt"] for i in idx],
                        [sample_seed(args.seed, "eval", i) for i in idx], args.eval_steps)
            return to_images(editor, r["x0"], r["hw"], [test_sources[i].size for i in idx])
        recs = lambda idx: ([test[i] for i in idx], [test_sources[i] for i in idx])
        scorers = {"reward": lambda idx, ims: score(critic, args.reward, *recs(idx), ims, args.reward_method)}
        if judge is not None:
            scorers["judge"] = lambda idx, ims: score(judge, "cme", *recs(idx), ims)
        with use_weights(model, params, ema):
            return evaluate_rl(draw, scorers, [size_of(s) for s in test_sources], step, out, args.grid_prompts,
                               args.micro_batch, rank, world, device)

    if start == 0 and test:
        run.elog.log(0, **evaluate(0))
    for step in range(start, args.steps):
        t0 = time.time()
        # 1. rollout: K edits of each of the step's P prompts with the old policy (deterministic ODE, no CFG)
        prompt_of = [p for p in step_prompts(len(train), P, step, args.seed) for _ in range(K)]  # (N,) edit j -> prompt
        seeds = [sample_seed(args.seed, step, j) for j in range(N)]  # of the global index, never of the rank
        batches = []
        with use_weights(model, params, old):
            for idx, real in rank_batches([size_of(sources[p]) for p in prompt_of], rank, world, args.micro_batch):
                batches.append((idx, real, rollout(editor, [sources[prompt_of[j]] for j in idx],
                                                   [train[prompt_of[j]]["prompt"] for j in idx], [seeds[j] for j in idx],
                                                   args.rollout_steps)))
        # 2. reward: each rank scores its own edits, then every rank has every reward
        t1 = time.time()
        mine = [j for idx, real, _ in batches if real for j in idx]
        edited = [im for idx, real, b in batches if real
                  for im in to_images(editor, b["x0"], b["hw"], [sources[prompt_of[j]].size for j in idx])]
        local = score(critic, args.reward, [train[prompt_of[j]] for j in mine], [sources[prompt_of[j]] for j in mine],
                      edited, args.reward_method)
        rewards = all_gather_values(local, mine, N, device)
        # 3. advantages (group mean, global std) -> optimality probability r; a failed reward trains nothing
        t2 = time.time()
        r, valid = optimality_targets(rewards, prompt_of)  # (N,), (N,)
        # 4-5. the NFT update at T of the rollout's own noise levels per edit, then the soft updates
        micro = []
        for idx, real, b in batches:
            ts, x_t = training_points(b["x0"], b["ts"][:-1], [seeds[j] for j in idx], T)  # (B, T), (B, T, N, 4C)
            vfn = lambda x, t, b=b: predict_velocity(model, x, b["source"], t, b["embeds"], b["mask"], b["grid"]).float()
            micro.append((vfn, x_t, ts, b["x0"], r[idx].to(device), (valid[idx] & real).float().to(device)))
        nft = nft_step(model, params, opt, old, ema, ref, micro, valid, step, args, world)
        run.log_step(step, rewards, nft, t0, t1, t2)
        if run.end_step(step, start, old, ema, evaluate if test else None):
            return cleanup_dist()

    # Save: the EMA weights, in the formats diffusers loads
    if args.full_finetune:
        run.finish(lambda sidecar: save_transformer(out / "transformer", editor, params, ema, rank, sidecar), "transformer/")
    else:
        run.finish(lambda sidecar: save_lora(out, model, params, ema, lora_cfg, rank, sidecar), "pytorch_lora_weights.safetensors")
    cleanup_dist()


if __name__ == "__main__":
    run_stage(main, get_args())
