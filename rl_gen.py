"""DiffusionNFT for a text-to-image model (SD3) with the FIRM QMA reward (paper Sec 3.4, 4.1; FIRM_NOTES 4).

One RL step, as the release runs it:
  1. rollout: K samples per prompt from the "old" policy with a deterministic 10-step DPM-Solver-2 style ODE
     sampler, no classifier-free guidance; keep the final latents x0 and the sampler's timesteps;
  2. reward: QMA (R = I (0.4 + 0.6 Q)) from the generation critic, in process or from the reward server;
  3. advantage A = (R - mean of the prompt's group) / (std over the whole gathered batch + 1e-4), clipped to
     [-5, 5], mapped to the optimality probability r = 0.5 + A/10;
  4. the NFT loss on the positive and implicit negative velocities with adaptive x0-space weights, plus
     kl_weight * mse to the frozen base model's velocity, at 99% of the rollout's own timesteps;
  5. one AdamW step (grad clip 1.0); the old policy is soft-updated towards the trained one; an EMA of the
     trained weights is kept, and the EMA is what gets saved.

The policy is SD3.5-Medium (or any StableDiffusion3Pipeline directory) with LoRA (rank 32, alpha 64) on the
attention projections, or --full-finetune. Multi-GPU: FSDP2 on each transformer block, then the root; text
encoders and VAE frozen and replicated; the step's (prompt, sample) pairs are split into contiguous slices,
one per rank, so the group size need not divide the number of GPUs; rewards are all-reduced with their ids.

  python rl_gen.py --preset mini                         # tiny SD3 + tiny critic's QMA, ~3 min on CPU
  python rl_gen.py --preset mini --reward pixel --out runs/mini/rl_gen_pixel   # exact reward: the algorithm check
  torchrun --standalone --nproc_per_node=8 rl_gen.py --model /ckpt/stable-diffusion-3.5-medium \
      --prompts prompts.jsonl --test-prompts test.jsonl --reward-model /ckpt/FIRM-Gen-8B --out runs/firm-sd35
  (or --reward-model http://critic-host:8000/v1#firm-gen: a critic served by vLLM or any OpenAI-compatible engine)

The policy is trained without classifier-free guidance: sample the saved LoRA with guidance_scale=1.0 (the
pipeline's default 7.0 is a different sampler from the one the critic rewarded). Rollouts use the checkpoint's
own scheduler noise levels (noise_levels), the release's 128 T5 tokens and an fp32 VAE.

Outputs in --out: pytorch_lora_weights.safetensors (the EMA LoRA; pipe.load_lora_weights(out) reads it) with
its sidecar pytorch_lora_weights.json (or transformer/ with --full-finetune), metrics.jsonl and eval.jsonl,
reward_curve.png, samples_grid.png (held-out prompts x evaluation steps), checkpoint/ (resume with --resume).

Deviations from the paper / release:
  1. The old policy, the EMA and (with --full-finetune) the frozen base are kept as copies of the trainable
     parameters and swapped in for their forward passes, not as extra peft adapters / modules. With LoRA the
     frozen base is the policy with the LoRA up-projections at their zero initialisation, which computes
     exactly what the base model with adapters disabled computes.
  2. A sample whose reward could not be computed (critic answer that failed to parse) is dropped from its
     group and from training, and counted; the release turns such failures into 0.
  3. Without a T5 encoder (the miniature world) no T5 tokens are appended; diffusers' pipeline would
     append --max-sequence-length zero vectors instead.
  4. The miniature world has no VAE: the transformer works on pixels (latents = pixels, one place: decode()),
     images are 32 px and are upsampled to --reward-image-size for the critic.
  5. The miniature world's exact reward (--reward pixel) is objects x background of toy's pixel judge (object
     colour coverage, background accuracy), not the judge's 0.5 / 0.5 sum: with the sum an empty canvas scores
     0.5, and RL learned to draw nothing within 90 steps (--reward pixel-sum reproduces it); with
     objects x (0.4 + 0.6 background) it learned to paint the canvas in the objects' colours.
  6. The mini preset (CPU budget): 4 prompts x 8 samples per step, 2 of the 10 rollout timesteps trained per
     sample (release: int(0.99 * 10) = 9), LoRA lr 1e-3 (paper 3e-4), 60 steps. Flags override it.
"""

import argparse
import json
import math
import random
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from common import (DataError, MetricsLog, cleanup_dist, clone_weights, die, every, find_checkpoint, fsdp_shard,
                    full_weights, image_grid, keep_rows_through, load_checkpoint, load_image, plot_curves, print0,
                    read_jsonl_resumable, read_manifest, run_stage, save_checkpoint, save_diffusers_model,
                    save_lora_files, setup_dist, tensor_to_pil, use_weights, write_json)

# -----------------------------------------------------------------------------
# CLI: defaults are the paper's / release's settings; --preset mini swaps in the miniature world's

PRESETS = {
    "mini": dict(model="runs/mini/models/gen-base", prompts="runs/mini/data/rl/gen_train.jsonl",
                 test_prompts="runs/mini/data/rl/gen_test.jsonl", reward_model="runs/mini/models/gen-critic",
                 reward_image_size=64, out="runs/mini/rl_gen", resolution=0, steps=60, prompts_per_step=4,
                 group_size=8, timestep_fraction=0.2, lr=1e-3, rollout_batch=32, train_batch=32, eval_every=20,
                 save_every=20, eval_prompts=32, eval_samples=1, reward_max_new_tokens=256, threads=1),
}


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="named small setting (flags given explicitly win)")
    # model
    ap.add_argument("--model", default=None, help="StableDiffusion3Pipeline directory (e.g. stable-diffusion-3.5-medium)")
    ap.add_argument("--full-finetune", action="store_true", help="train all transformer weights instead of LoRA")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward (less memory)")
    ap.add_argument("--lora-rank", type=int, default=32, help="LoRA rank on the attention projections")
    ap.add_argument("--lora-alpha", type=float, default=64, help="LoRA alpha (scale = alpha / rank)")
    ap.add_argument("--resolution", type=int, default=512, help="image side in pixels (0 = the model's native size)")
    ap.add_argument("--max-sequence-length", type=int, default=128, help="T5 tokens (release: 128; ignored without a T5 encoder)")
    # data
    ap.add_argument("--prompts", default=None, help="JSONL {id, prompt[, requirement]} of RL training prompts")
    ap.add_argument("--test-prompts", default=None, help="JSONL of held-out prompts for evaluation (optional)")
    # reward
    ap.add_argument("--reward", default="qma", choices=["qma", "instruction", "pixel", "pixel-sum"],
                    help="qma / instruction: critic fusion (reward.py); pixel: the miniature world's exact judge, "
                         "objects x background; pixel-sum: its 0.5 / 0.5 sum (an empty canvas scores 0.5)")
    ap.add_argument("--reward-model", default=None, help="the critic: a model directory scored in process (e.g. "
                    "FIRM-Gen-8B) or an OpenAI-compatible endpoint http://host:port/v1[#served name] (reward.open_critic)")
    ap.add_argument("--reward-image-size", type=int, default=0, help="resize images to this side (px) for the critic; 0 = as generated")
    ap.add_argument("--reward-batch", type=int, default=16, help="images per critic call")
    ap.add_argument("--reward-method", default="generate", choices=["generate", "expected"],
                    help="critic scoring: greedy answer then parse (paper), or expected score from digit probabilities")
    ap.add_argument("--reward-max-new-tokens", type=int, default=None, help="critic answer length limit, tokens "
                    "(default: the release's 8192 for the gen critic, reward.MAX_NEW_TOKENS)")
    # rollout
    ap.add_argument("--prompts-per-step", type=int, default=48, help="prompt groups per RL step (global)")
    ap.add_argument("--group-size", type=int, default=16, help="samples per prompt (K)")
    ap.add_argument("--rollout-steps", type=int, default=10, help="ODE sampler steps for rollouts and evaluation")
    ap.add_argument("--rollout-batch", type=int, default=16, help="samples per sampler call, per rank")
    # DiffusionNFT
    ap.add_argument("--nft-beta", type=float, default=1.0, help="NFT mixing coefficient beta of v+ / v- (NOT the KL weight)")
    ap.add_argument("--kl-weight", type=float, default=1e-4, help="weight of mse(v, v_base), the KL to the frozen base (NOT beta)")
    ap.add_argument("--adv-clip", type=float, default=5.0, help="advantages clipped to [-c, c]; r = 0.5 + A / (2c)")
    ap.add_argument("--timestep-fraction", type=float, default=0.99, help="share of the rollout's timesteps trained on per sample")
    # optimisation
    ap.add_argument("--steps", type=int, default=600, help="RL steps (one optimizer step each)")
    ap.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    ap.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    ap.add_argument("--train-batch", type=int, default=8, help="samples per forward/backward, per rank")
    # evaluation, output
    ap.add_argument("--out", default="runs/rl_gen", help="output directory")
    ap.add_argument("--eval-every", type=int, default=50, help="evaluate the EMA weights on held-out prompts every N steps (0 = never)")
    ap.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts per evaluation")
    ap.add_argument("--eval-samples", type=int, default=1, help="samples per held-out prompt")
    ap.add_argument("--grid-prompts", type=int, default=6, help="rows of samples_grid.png")
    ap.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps and after the last (0 = after the last only)")
    ap.add_argument("--resume", action="store_true", help="continue from --out/checkpoint if it exists")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    pre, _ = ap.parse_known_args(argv)
    if pre.preset:
        ap.set_defaults(**PRESETS[pre.preset])
    args = ap.parse_args(argv)
    if not args.model or not args.prompts:
        ap.error("--model and --prompts are required (or --preset mini)")
    return args


# -----------------------------------------------------------------------------
# --- DiffusionNFT: the paper's quantities as small pure functions (FIRM_NOTES section 4)
# rl_edit.py imports these; the algorithm lives here once.
# Conventions (rectified flow, as SD3 and Qwen-Image use): t in [0, 1], t = 1 is pure noise,
#   x_t = (1 - t) x0 + t eps,   the network predicts the velocity v = eps - x0,   x0_hat = x_t - t v.


def _bcast(t, x):
    """A per-sample (B,) or scalar t shaped to broadcast against x (B, ...)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim == 1 else t


def rectified_flow_interp(x0, eps, t):
    """x_t = (1 - t) x0 + t eps."""
    t = _bcast(t, x0)
    return (1 - t) * x0 + t * eps


def x0_from_v(x_t, v, t):
    """x0_hat = x_t - t v (exact when v = eps - x0)."""
    return x_t - _bcast(t, x_t) * v


def group_advantages(rewards, group_ids, clip=5.0, eps=1e-4):
    """A = (R - mean of its prompt group) / (std over the whole batch + eps), clipped to [-clip, clip].

    `rewards`: list/tensor of N floats, where None or NaN marks a reward that could not be computed
    (a critic answer that failed to parse). Such samples are DROPPED: they take no part in their
    group's mean nor in the batch std, and their advantage is NaN, which the caller must read as
    "do not train on this sample". A group with a single valid sample gets A = 0 for it.
    The std is over all valid rewards of the gathered batch (all ranks), not per group: per-group
    std would blow tiny reward differences up to +-1 (DiffusionNFT / FIRM use the global std).
    Returns a float64 tensor (N,).
    """
    r = torch.tensor([math.nan if x is None else float(x) for x in rewards], dtype=torch.float64)
    ids = list(group_ids)
    assert len(ids) == len(r), "one group id per reward"
    valid = ~torch.isnan(r)
    adv = torch.full_like(r, math.nan)
    if valid.sum() == 0:
        return adv
    std = r[valid].std(unbiased=False) if valid.sum() > 1 else torch.tensor(0.0, dtype=torch.float64)
    for g in dict.fromkeys(ids):
        idx = torch.tensor([i for i, x in enumerate(ids) if x == g and valid[i]], dtype=torch.long)
        if len(idx):
            adv[idx] = (r[idx] - r[idx].mean()) / (std + eps)
    return adv.clamp(-clip, clip)


def optimality_probability(adv, clip=5.0):
    """r = clip(0.5 + A / (2 clip), 0, 1): with clip 5 this is the paper's r = 0.5 + A/10.

    r = 1: train only towards the positive policy; r = 0: only towards the implicit negative one.
    """
    return (0.5 + adv / (2 * clip)).clamp(0.0, 1.0)


def nft_velocities(v, v_old, nft_beta):
    """Positive and implicit negative velocities (DiffusionNFT):
    v+ = beta v + (1 - beta) v_old,   v- = (1 + beta) v_old - beta v.
    v_old is the old (rollout) policy's prediction and carries no gradient.
    `nft_beta` is the NFT mixing coefficient (1.0 in the release), NOT the KL weight.
    """
    v_old = v_old.detach()
    return nft_beta * v + (1 - nft_beta) * v_old, (1 + nft_beta) * v_old - nft_beta * v


def adaptive_weight(x0_pred, x0, floor=1e-5):
    """w = stopgrad(mean |x0_pred - x0|) per sample, >= floor; shape (B, 1, ..., 1) to divide an mse by."""
    with torch.no_grad():
        dims = tuple(range(1, x0.ndim))
        return (x0_pred.detach().double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp_min(floor).to(x0.dtype)


def nft_loss(v, v_old, x_t, x0, t, r, nft_beta=1.0, scale=5.0):
    """The DiffusionNFT policy loss, per sample (B,):

    x0+ = x_t - t v+,  x0- = x_t - t v-,
    L = scale * ( r |x0+ - x0|^2 / w+  +  (1 - r) |x0- - x0|^2 / w- ) / nft_beta   (means over pixels),
    with w+- the adaptive weights. `scale` is the release's advantage clip (5). Take .mean() for the loss.
    Its minimiser: v+ pulled to the data velocity for r = 1, v- pulled there for r = 0.
    """
    v_pos, v_neg = nft_velocities(v, v_old, nft_beta)
    x0_pos, x0_neg = x0_from_v(x_t, v_pos, t), x0_from_v(x_t, v_neg, t)
    dims = tuple(range(1, x0.ndim))
    pos = ((x0_pos - x0) ** 2 / adaptive_weight(x0_pos, x0)).mean(dim=dims)
    neg = ((x0_neg - x0) ** 2 / adaptive_weight(x0_neg, x0)).mean(dim=dims)
    r = torch.as_tensor(r, dtype=pos.dtype, device=pos.device)
    return scale * (r * pos + (1 - r) * neg) / nft_beta


def kl_loss(v, v_ref):
    """Per-sample mse(v, v_ref) (B,) to the frozen base model's velocity: the "KL" term.
    (For Gaussian transition kernels of equal variance this is the KL up to a constant factor.)
    Multiplied by `kl_weight` (1e-4 in the release), which is NOT the NFT beta.
    """
    return ((v - v_ref.detach()) ** 2).mean(dim=tuple(range(1, v.ndim)))


def old_policy_decay(step):
    """Soft update of the rollout ("old") policy: old <- d old + (1 - d) current, d = min(0.001 step, 0.5).
    d = 0 at step 0: the old policy starts as a copy of the current one."""
    return min(0.001 * step, 0.5)


def ema_decay(step):
    """Decay of the saved EMA of the trained weights: min((1 + s) / (10 + s), 0.9) (fast warm-up)."""
    return min((1 + step) / (10 + step), 0.9)


@torch.no_grad()
def ema_update_(target_params, source_params, decay):
    """In place: target <- decay * target + (1 - decay) * source, for matching parameter lists."""
    for tgt, src in zip(target_params, source_params, strict=True):
        tgt.mul_(decay).add_(src.detach().to(tgt.dtype), alpha=1 - decay)


def noise_levels(scheduler, steps, **kwargs):
    """The steps + 1 noise levels (1 -> 0) of the checkpoint's own flow-matching scheduler, as the release samples.

    For SD3.5-Medium (FlowMatchEulerDiscreteScheduler, shift 3) and 10 steps: [1, .960, .913, .858, .790, .707,
    .602, .465, .278, .0089, 0]: the shift is applied to the scheduler's training grid of 1000 timesteps, so the
    last level before 0 is small and the sampler ends with a small step. kwargs go to set_timesteps (Qwen-Image:
    `sigmas`, `mu`)."""
    scheduler.set_timesteps(None if "sigmas" in kwargs else steps, device="cpu", **kwargs)
    return scheduler.sigmas.double()  # (steps + 1,), ends with 0


@torch.no_grad()
def ode_sample(velocity_fn, x_T, timesteps):
    """Deterministic DPM-Solver-2 style sampler (multistep, second order, data prediction; no CFG).

    velocity_fn(x_t, t) -> v, with t a (B,) tensor in [0, 1]. `timesteps`: decreasing, from ~1 to 0.
    For rectified flow, alpha_t = 1 - t and sigma_t = t; with lambda = log(alpha / sigma) and
    h = lambda_next - lambda, one step is (DPM-Solver++(2M))
        x_next = (sigma_next / sigma) x_t - alpha_next (exp(-h) - 1) D,
    D = x0_hat (first step, last step) or the second-order extrapolation
        D = (1 + 1/(2 rho)) x0_hat_i - 1/(2 rho) x0_hat_{i-1},  rho = h_{i-1} / h_i.
    Returns (x0, xs): xs[i] is the state at timesteps[i] (len(timesteps) states, the last is x0).
    """
    ts = [float(t) for t in timesteps]
    x, xs = x_T, [x_T]
    lam = lambda t: math.log((1 - t) / t) if 0 < t < 1 else (math.inf if t <= 0 else -math.inf)
    prev_x0, prev_h = None, None
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        v = velocity_fn(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))
        x0_hat = x - t * v
        if t_next <= 0:  # last step: the data prediction itself (lower-order final step)
            x = x0_hat
        else:
            h = lam(t_next) - lam(t)
            D = x0_hat
            if prev_x0 is not None and math.isfinite(prev_h):
                rho = prev_h / h
                D = (1 + 0.5 / rho) * x0_hat - (0.5 / rho) * prev_x0
            x = (t_next / t) * x - (1 - t_next) * math.expm1(-h) * D
            prev_h = h
        prev_x0 = x0_hat
        xs.append(x)
    return x, xs


# -----------------------------------------------------------------------------
# the generator: loading, prompt encoding, the velocity field, sampling, decoding


class Generator:
    """The parts of a StableDiffusion3Pipeline that RL uses. `vae` is None in the miniature world."""

    def __init__(self, pipe, device, max_sequence_length=128, dtype=torch.float32):
        self.pipe, self.device, self.dtype = pipe, device, dtype  # dtype: of the frozen parts (and of saved weights)
        self.transformer, self.vae = pipe.transformer, pipe.vae
        self.shift = float(pipe.scheduler.config.get("shift", 1.0))  # SD3's timestep shift (3.0 for SD3.5-M)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        # deviation 3: no T5 encoder -> no T5 tokens (the pipeline would append that many zero vectors)
        self.t5_tokens = max_sequence_length if pipe.text_encoder_3 is not None else 0

    def latent_shape(self, resolution=0):
        cfg = self.transformer.config
        side = (resolution or cfg.sample_size * self.vae_scale) // self.vae_scale
        return (cfg.in_channels, side, side)


def load_generator(model_dir, lora_dir=None, device=None, dtype=None, transformer_dtype=None, max_sequence_length=128):
    """Open a StableDiffusion3Pipeline directory (components saved as null, e.g. no VAE, are passed as None).

    lora_dir: an rl_gen output (pytorch_lora_weights.safetensors, or transformer/ after --full-finetune).
    dtype: of the frozen text encoders; transformer_dtype: of the transformer (fp32 to train). The VAE runs in
    fp32, as the release decodes.
    """
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    index_file = Path(model_dir) / "model_index.json"
    if not index_file.is_file():
        raise DataError(f"{index_file}: not found; --model must be a diffusers StableDiffusion3Pipeline directory "
                        f"(for the miniature world run `python toy.py pretrain-gen`)")
    index = json.loads(index_file.read_text())
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
    dtypes = {"default": dtype, "transformer": transformer_dtype or dtype, "vae": torch.float32}
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, dtype=dtypes, **absent)
    if lora_dir is not None:
        if (Path(lora_dir) / "transformer").is_dir():
            pipe.transformer = SD3Transformer2DModel.from_pretrained(Path(lora_dir) / "transformer", dtype=transformer_dtype or dtype)
        else:
            pipe.load_lora_weights(lora_dir)
    for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.vae, pipe.transformer):
        if m is not None:
            m.requires_grad_(False).eval().to(device)
    return Generator(pipe, device, max_sequence_length, dtype)


def encode_prompts(gen, prompts):
    """(prompt_embeds (B, L, D), pooled (B, P)) exactly as the SD3 pipeline computes them, without CFG.
    (No graph is built while the encoders are frozen, as they are in RL.)"""
    emb, _, pooled, _ = gen.pipe.encode_prompt(list(prompts), None, None, device=gen.device, do_classifier_free_guidance=False,
                                               max_sequence_length=gen.t5_tokens)
    return emb.float(), pooled.float()


def velocity(transformer, x_t, t, emb, pooled):
    """The SD3 transformer's prediction v = eps - x0 at noise level t in [0, 1] (it takes t * 1000), in fp32.

    The inputs are cast to the transformer's dtype (bf16 weights for inference on a GPU); under FSDP2 with a
    mixed-precision policy the parameters report fp32 and the policy casts the inputs itself."""
    dt = transformer.dtype
    return transformer(hidden_states=x_t.to(dt), encoder_hidden_states=emb.to(dt), pooled_projections=pooled.to(dt),
                       timestep=(t * 1000).to(dt), return_dict=False)[0].float()


def sample_seed(seed, *ids):
    """A 63-bit seed from the run seed and global ids (step, sample index, ...): never from the rank."""
    return random.Random(":".join(str(i) for i in (seed, *ids))).getrandbits(63)


def noise_like(shape, seeds, device):
    """One Gaussian tensor per seed, stacked: the same sample gets the same noise on any rank or batch."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)


@torch.no_grad()
def sample_latents(gen, transformer, emb, pooled, seeds, timesteps, shape, batch_size):
    """Deterministic ODE sampling (ode_sample) of len(seeds) latents, batch_size at a time. Returns (B, C, h, w)."""
    out = []
    for i in range(0, len(seeds), batch_size):
        e, p = emb[i:i + batch_size], pooled[i:i + batch_size]
        x_T = noise_like(shape, seeds[i:i + batch_size], gen.device)
        x0, _ = ode_sample(lambda x, t: velocity(transformer, x, t, e, p), x_T, timesteps)
        out.append(x0)
    return torch.cat(out) if out else torch.zeros(0, *shape, device=gen.device)


@torch.no_grad()
def decode(gen, latents):
    """Latents -> images in [-1, 1]. The one place that knows about the VAE (deviation 4: none = pixels)."""
    if gen.vae is None:
        return latents.float().clamp(-1, 1)
    z = latents / gen.vae.config.scaling_factor + gen.vae.config.shift_factor
    return gen.vae.decode(z.to(gen.vae.dtype), return_dict=False)[0].float().clamp(-1, 1)


@torch.no_grad()
def generate(gen, prompts, seeds, steps=10, resolution=0, batch_size=16):
    """PIL images for (prompt, seed) pairs with the rollout sampler (no CFG); identical whatever the batching."""
    emb, pooled = encode_prompts(gen, prompts)
    ts = noise_levels(gen.pipe.scheduler, steps)
    lat = sample_latents(gen, gen.transformer, emb, pooled, list(seeds), ts, gen.latent_shape(resolution), batch_size)
    return [tensor_to_pil(x) for x in decode(gen, lat)]


# -----------------------------------------------------------------------------
# the policy: LoRA or full fine-tuning, FSDP2, weight sets (old policy, EMA, frozen base), checkpoints

LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",  # image-stream projections
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]  # text stream


def make_policy(gen, args, device):
    """Add LoRA (or unfreeze everything), then FSDP2: each transformer block, then the root. Returns trainable params."""
    tr = gen.transformer
    if args.full_finetune:
        tr.requires_grad_(True)
    else:
        from peft import LoraConfig
        torch.manual_seed(args.seed)  # LoRA A init; B starts at 0, so the policy starts as the base model
        tr.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                  target_modules=LORA_TARGETS))
    if args.gradient_checkpointing:
        tr.enable_gradient_checkpointing()
    tr.train()
    fsdp_shard(tr, tr.transformer_blocks, device)
    return [p for p in tr.parameters() if p.requires_grad]


def save_policy(out, gen, model, params, ema, args, rank, sidecar):
    """The EMA weights, in the format diffusers loads: a LoRA file (load_lora_weights) or a transformer dir."""
    if args.full_finetune:  # the whole transformer (with its buffers), as a diffusers folder in the base's dtype
        with use_weights(model, params, ema):
            options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
            sd = get_model_state_dict(model, options=options)  # collective
    else:
        sd = full_weights(model, params, ema)
    if rank != 0:
        return
    if args.full_finetune:
        save_diffusers_model(Path(out) / "transformer", gen.transformer, sd, gen.dtype)
        write_json(Path(out) / "transformer" / "rl_gen.json", sidecar)
        return
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict
    lora = get_peft_model_state_dict(model, state_dict=sd, adapter_name="default")  # drops the ".default" adapter names
    meta = model.peft_config["default"].to_dict()  # rank and alpha travel with the file
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    save_lora_files(StableDiffusion3Pipeline, out, lora, meta, sidecar)


# -----------------------------------------------------------------------------
# data: prompts, the step's (prompt, sample) pairs, this rank's slice


def load_prompts(path, need_scene=False):
    """Prompt records {prompt[, id, requirement]}, checked (common.read_manifest); a record without an id gets
    "<file stem>:<line>"."""
    rows = read_manifest(path, {"id": "id?", "prompt": "text", "requirement": "str?", "toy": "dict?"}, lines=True)
    for lineno, r in rows:
        if need_scene and "scene" not in r.get("toy", {}):
            raise DataError(f"{path}:{lineno}: field 'toy.scene' missing; --reward pixel needs the miniature world's prompts")
        r.setdefault("id", f"{Path(path).stem}:{lineno}")
    return [r for _, r in rows]


def step_prompts(n_prompts, per_step, step, seed):
    """Prompt indices of one RL step: consecutive slices of per-epoch shuffles (each prompt once per epoch)."""
    out, perms = [], {}
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(k, n_prompts)
        if epoch not in perms:
            perms[epoch] = random.Random(f"{seed}:epoch:{epoch}").sample(range(n_prompts), n_prompts)
        out.append(perms[epoch][i])
    return out


def rank_slice(n, rank, world):
    """Contiguous slice [lo, hi) of n global items for this rank (sizes differ by at most one)."""
    return rank * n // world, (rank + 1) * n // world


def all_gather_values(values, lo, n, device):
    """Global list of n floats-or-None from each rank's slice starting at lo (sum-reduce of value and mask)."""
    buf = torch.zeros(2, n, dtype=torch.float64, device=device)
    for i, v in enumerate(values):
        if v is not None and math.isfinite(v):
            buf[0, lo + i], buf[1, lo + i] = v, 1.0
    dist.all_reduce(buf)  # sync point: every rank gets every reward
    return [float(buf[0, j]) if buf[1, j] > 0 else None for j in range(n)]


# -----------------------------------------------------------------------------
# rewards: the critic's fusion (in process / server) or the miniature world's exact pixel judge


PIXEL_REWARDS = ("pixel", "pixel-sum")


def make_scorer(args, device):
    if args.reward in PIXEL_REWARDS:
        return None
    from reward import open_critic
    if not args.reward_model:
        die("give --reward-model (a critic directory or endpoint URL), or use --reward pixel")
    return open_critic(args.reward_model, device=device, batch_size=args.reward_batch,
                       max_new_tokens=args.reward_max_new_tokens)


def pixel_judge(img, rec, part="overall"):
    """The independent judge of the miniature world (None for prompts without a known scene).
    part: "overall" = objects x background, "objects" (object colour coverage), "background"."""
    if not isinstance(rec.get("toy"), dict) or "scene" not in rec["toy"]:
        return None
    import toy
    return toy.pixel_judge_gen(img, toy.Scene.from_dict(rec["toy"]["scene"]))[part]


def compute_rewards(args, scorer, images, recs):
    """(rewards: list[float | None], judge: list[float | None]); None = failed to parse (dropped, counted)."""
    judge = [pixel_judge(im, r) for im, r in zip(images, recs)]
    if args.reward == "pixel":  # a product: neither an empty canvas nor one painted over earns anything
        return judge, judge
    if args.reward == "pixel-sum":  # the hackable 0.5 / 0.5 sum, kept to show the hack
        return [0.5 * pixel_judge(im, r, "objects") + 0.5 * pixel_judge(im, r, "background") for im, r in zip(images, recs)], judge
    from reward import failure_note, gen_rewards
    from PIL import Image
    size = args.reward_image_size
    items = [{"image": im.resize((size, size), Image.BICUBIC) if size else im, "prompt": r["prompt"],
              "requirement": r.get("requirement")} for im, r in zip(images, recs)]
    rewards, stats = gen_rewards(scorer, items, fusion=args.reward, on_failure="drop", method=args.reward_method)
    if note := failure_note(stats):  # a dead critic server, answers cut by the limit, or answers with no score
        print0(f"rank 0: {note}")
    return list(rewards), judge


# -----------------------------------------------------------------------------
# evaluation on held-out prompts (the EMA weights: what gets saved), pictures


def padded_slice(n, rank, world):
    """This rank's global indices, padded (repeating the last) to ceil(n / world): FSDP needs every rank to run
    the same number of forward passes. Returns (indices, n_real)."""
    lo, hi = rank_slice(n, rank, world)
    m = -(-n // world)
    real = list(range(lo, hi))
    return real + [real[-1] if real else 0] * (m - len(real)), len(real)


@torch.no_grad()
def evaluate(args, gen, model, params, weights, test, scorer, step, rank, world):
    """Reward and pixel judge of `weights` on the first --eval-prompts held-out prompts (fixed seeds)."""
    pairs = [(i, k) for i in range(min(args.eval_prompts, len(test))) for k in range(args.eval_samples)]
    idx, n_real = padded_slice(len(pairs), rank, world)
    mine = [pairs[j] for j in idx]
    emb, pooled = encode_prompts(gen, [test[i]["prompt"] for i, _ in mine])
    seeds = [sample_seed(args.seed, "eval", i, k) for i, k in mine]  # the same noise at every evaluation
    with use_weights(model, params, weights):
        lat = sample_latents(gen, model, emb, pooled, seeds, noise_levels(gen.pipe.scheduler, args.rollout_steps),
                             gen.latent_shape(args.resolution), args.rollout_batch)
    images = [tensor_to_pil(x) for x in decode(gen, lat[:n_real])]
    for (i, k), im in zip(mine[:n_real], images):  # each rank writes its own pictures; rank 0 assembles the grid
        if k == 0 and i < args.grid_prompts:
            im.save(Path(args.out) / "samples" / f"step{step:05d}_{i:03d}.png")
    recs = [test[i] for i, _ in mine[:n_real]]
    rewards, judge = compute_rewards(args, scorer, images, recs)
    cols = {"eval_reward": rewards, "eval_judge": judge,  # the judge's two halves: what did RL change?
            **{f"eval_{p}": [pixel_judge(im, r, p) for im, r in zip(images, recs)] for p in ("objects", "background")}}
    lo, out = rank_slice(len(pairs), rank, world)[0], {}
    for name, values in cols.items():
        ok = [x for x in all_gather_values(values, lo, len(pairs), gen.device) if x is not None]
        out[name] = sum(ok) / len(ok) if ok else float("nan")
        if name == "eval_reward":
            out["eval_fail"] = len(pairs) - len(ok)
    return out


def write_pictures(out, test, grid_prompts):
    """samples_grid.png (rows: held-out prompts, columns: evaluation steps) and reward_curve.png."""
    out = Path(out)
    steps = sorted({int(p.name[4:9]) for p in (out / "samples").glob("step*_*.png")})
    rows = []
    for i in range(min(grid_prompts, len(test))):
        row = [load_image(out / "samples" / f"step{s:05d}_{i:03d}.png") for s in steps
               if (out / "samples" / f"step{s:05d}_{i:03d}.png").is_file()]
        if row:
            rows.append([im.resize((max(im.width, 96), max(im.height, 96)), 0) for im in row])  # 0 = nearest
    if rows:
        image_grid(rows).save(out / "samples_grid.png")
    train, ev = read_jsonl_resumable(out / "metrics.jsonl"), read_jsonl_resumable(out / "eval.jsonl")
    plot_curves(out / "reward_curve.png", {
        "train reward": [(r["step"], r["reward"]) for r in train],
        "eval reward": [(r["step"], r["eval_reward"]) for r in ev],
        "eval pixel judge": [(r["step"], r["eval_judge"]) for r in ev]}, title=f"rl_gen: columns of samples_grid.png = steps {steps}")


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def nft_update(model, params, opt, old, ref, micro_batches, n_valid, args, world):
    """Steps 4-5 of one RL step: the DiffusionNFT loss over this rank's micro-batches, one AdamW step.

    micro_batches: [(vfn, x_t (B, T, ...), ts (B, T), x0 (B, ...), r (B,), w (B,))], where vfn(x, t) -> v is the
    policy's velocity under that micro-batch's conditioning, x_t are the rollout's x0 re-noised at T of its own
    noise levels ts, r the optimality probabilities and w the sample weights (0 = failed reward or padding).
    n_valid: samples with a reward over ALL ranks. Returns float64 (4,): sums of loss, nft, kl (weighted) and the
    gradient norm. Both RL scripts call this; the model-specific parts live in vfn.
    """
    # the frozen predictions first, each weight set swapped in once: old policy (for v+ / v-) and base (the KL)
    frozen = {}
    with torch.no_grad():
        for name, weights in (("old", old), ("ref", ref)):
            if weights is None:
                continue
            with use_weights(model, params, weights):
                frozen[name] = [torch.stack([vfn(x_t[:, i], ts[:, i]) for i in range(ts.shape[1])], 1)  # (B, T, ...)
                                for vfn, x_t, ts, *_ in micro_batches]
    stats = torch.zeros(4, dtype=torch.float64, device=micro_batches[0][1].device)
    opt.zero_grad(set_to_none=True)
    norm = world / (n_valid * micro_batches[0][2].shape[1])  # FSDP averages over ranks: the total is a mean over all (sample, t)
    for k, (vfn, x_t, ts, x0, r, w) in enumerate(micro_batches):  # every rank runs as many passes (padding): FSDP needs it
        for i in range(ts.shape[1]):
            v = vfn(x_t[:, i], ts[:, i])
            l_nft = nft_loss(v, frozen["old"][k][:, i], x_t[:, i], x0, ts[:, i], r, nft_beta=args.nft_beta, scale=args.adv_clip)
            l_kl = kl_loss(v, frozen["ref"][k][:, i]) if ref is not None else torch.zeros_like(l_nft)
            loss = l_nft + args.kl_weight * l_kl  # the NFT beta lives inside nft_loss; kl_weight only here
            ((loss * w).sum() * norm).backward()
            stats[:3] += torch.stack([(x.detach() * w).sum() for x in (loss, l_nft, l_kl)]).double()
    gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    stats[3] = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
    opt.step()
    return stats


def nft_step(model, params, opt, old, ema, ref, micro_batches, n_valid, step, args, world):
    """One optimizer step and the soft updates, or nothing at all when no sample of the step has a reward.

    Skipping matters: an AdamW step on a zero gradient still moves the weights (momentum, weight decay).
    The decay schedules count optimizer steps DONE (the release increments its step counter first): step + 1.
    Returns nft_update's stats, or None when the step was skipped.
    """
    if n_valid == 0:
        return None
    stats = nft_update(model, params, opt, old, ref, micro_batches, n_valid, args, world)
    ema_update_(old, params, old_policy_decay(step + 1))  # the rollout policy follows slowly
    ema_update_(ema, params, ema_decay(step + 1))  # the saved weights
    return stats


# -----------------------------------------------------------------------------
# the loop


def main(args):
    rank, world, device = setup_dist()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    train = load_prompts(args.prompts, need_scene=args.reward in PIXEL_REWARDS)
    test = load_prompts(args.test_prompts, need_scene=args.reward in PIXEL_REWARDS) if args.test_prompts else []
    scorer = make_scorer(args, device)  # before the policy: a wrong critic path fails in seconds
    gen = load_generator(args.model, device=device, transformer_dtype=torch.float32, max_sequence_length=args.max_sequence_length)
    params = make_policy(gen, args, device)
    model = gen.transformer
    ref = clone_weights(params) if args.kl_weight > 0 else None  # the frozen base (deviation 1)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    old, ema, start = clone_weights(params), clone_weights(params), 0  # rollout policy, saved EMA
    ckpt = find_checkpoint(out, rank) if args.resume else None
    if ckpt is not None:
        start, old, ema = load_checkpoint(ckpt, model, params, opt)
        print0(f"resumed from {ckpt} at step {start}")
    if rank == 0:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "eval.jsonl"):  # keep what the checkpoint covers, drop the rest
            keep_rows_through(out / name, start if ckpt is not None else -1)
        if ckpt is None:
            for p in (out / "samples").glob("*.png"):
                p.unlink()
    dist.barrier()

    P, K = args.prompts_per_step, args.group_size
    N = P * K  # (prompt, sample) pairs per step, global index j = g * K + k
    idx_local, n_real = padded_slice(N, rank, world)
    timesteps = noise_levels(gen.pipe.scheduler, args.rollout_steps)  # the checkpoint's noise levels, 1 -> 0
    T = max(1, int(args.timestep_fraction * args.rollout_steps))  # training timesteps per sample
    shape = gen.latent_shape(args.resolution)
    n_train = sum(p.numel() for p in params)
    print0(f"world {world} | {'full fine-tune' if args.full_finetune else f'LoRA r{args.lora_rank} alpha {args.lora_alpha:g}'}: "
           f"{n_train / 1e6:.2f} M trainable parameters | latents {tuple(shape)}, timestep shift {gen.shift:g}")
    print0(f"per step: {P} prompts x {K} samples = {N} rollouts ({len(idx_local)} on this rank), "
           f"{args.rollout_steps} sampler steps, {T} training timesteps per sample | reward {args.reward} | "
           f"nft_beta {args.nft_beta:g}, kl_weight {args.kl_weight:g}")
    log, elog = MetricsLog(out / "metrics.jsonl", rank == 0), MetricsLog(out / "eval.jsonl", rank == 0)
    if start == 0 and args.eval_every and test:
        elog.log(0, **evaluate(args, gen, model, params, ema, test, scorer, 0, rank, world))

    for step in range(start, args.steps):
        # 1. rollouts with the old policy (no grad, deterministic ODE, no CFG)
        t0 = time.time()
        prompt_idx = step_prompts(len(train), P, step, args.seed)
        recs = [train[prompt_idx[j // K]] for j in idx_local]
        emb, pooled = encode_prompts(gen, [r["prompt"] for r in recs])
        with use_weights(model, params, old):
            x0 = sample_latents(gen, model, emb, pooled, [sample_seed(args.seed, step, j) for j in idx_local],
                                timesteps, shape, args.rollout_batch)
        images = [tensor_to_pil(x) for x in decode(gen, x0[:n_real])]
        # 2. rewards of this rank's samples, gathered with their global ids
        t1 = time.time()
        rew_local, judge_local = compute_rewards(args, scorer, images, recs[:n_real])
        lo = rank_slice(N, rank, world)[0]
        rewards, judge = all_gather_values(rew_local, lo, N, device), all_gather_values(judge_local, lo, N, device)
        # 3. advantages (group mean, global std) -> optimality probability r; failed rewards get weight 0
        t2 = time.time()
        adv = group_advantages(rewards, [prompt_idx[j // K] for j in range(N)], clip=args.adv_clip)  # groups: same prompt
        valid = ~torch.isnan(adv)
        n_valid = int(valid.sum())
        r = optimality_probability(adv.nan_to_num(0.0), clip=args.adv_clip).float()[idx_local].to(device)
        w = valid.float()[idx_local].to(device)
        w[n_real:] = 0.0  # padding duplicates train nothing
        # 4-5. the DiffusionNFT update (one optimizer step) and the soft updates of the old policy and the EMA:
        #      T of the rollout's own noise levels per sample, in a random order, each with fresh noise
        ts = torch.stack([timesteps[:-1][torch.randperm(len(timesteps) - 1, generator=torch.Generator().manual_seed(
            sample_seed(args.seed, step, j, "t")))[:T]] for j in idx_local]).float().to(device)  # (m, T)
        eps = torch.stack([noise_like(shape, [sample_seed(args.seed, step, j, "eps", i) for i in range(T)], device)
                           for j in idx_local])  # (m, T, C, h, w)
        x_t = rectified_flow_interp(x0[:, None], eps, ts[..., None, None, None])  # (m, T, C, h, w)
        B = args.train_batch
        micro = [(lambda x, t, e=emb[b:b + B], p=pooled[b:b + B]: velocity(model, x, t, e, p),
                  x_t[b:b + B], ts[b:b + B], x0[b:b + B], r[b:b + B], w[b:b + B]) for b in range(0, len(idx_local), B)]
        stats = nft_step(model, params, opt, old, ema, ref, micro, n_valid, step, args, world)
        if stats is None:
            print0(f"step {step + 1}: no valid reward in the whole batch; skipping the update")
            stats = torch.zeros(4, dtype=torch.float64, device=device)
        t3 = time.time()
        sums = stats.clone()
        sums[3] = 0
        dist.all_reduce(sums)
        mem = torch.tensor([peak_memory_gb(device)], device=device)
        mems = [torch.zeros_like(mem) for _ in range(world)]
        dist.all_gather(mems, mem)
        ok, jd = [x for x in rewards if x is not None], [x for x in judge if x is not None]
        mean = sum(ok) / len(ok) if ok else float("nan")
        log.log(step + 1, reward=mean, reward_std=(sum((x - mean) ** 2 for x in ok) / len(ok)) ** 0.5 if ok else float("nan"),
                judge=sum(jd) / len(jd) if jd else float("nan"), parse_fail=N - len(ok),
                loss=float(sums[0]) / max(n_valid * T, 1), nft=float(sums[1]) / max(n_valid * T, 1),
                kl=float(sums[2]) / max(n_valid * T, 1), grad_norm=float(stats[3]),
                t_rollout=round(t1 - t0, 3), t_reward=round(t2 - t1, 3), t_train=round(t3 - t2, 3),
                mem_gb_max=round(max(float(m) for m in mems), 3), mem_gb_min=round(min(float(m) for m in mems), 3))
        done = step + 1
        if test and args.eval_every and (every(done, args.eval_every) or done == args.steps):
            elog.log(done, **evaluate(args, gen, model, params, ema, test, scorer, done, rank, world))
        if every(done, args.save_every) or done == args.steps:  # the last step too: --resume after the end is a no-op
            save_checkpoint(out, model, params, opt, old, ema, done, rank)
            if rank == 0:
                write_pictures(out, test, args.grid_prompts)

    # the saved policy: the EMA weights, in the format diffusers loads
    evals = read_jsonl_resumable(out / "eval.jsonl") if rank == 0 else []
    sidecar = {"base_model": str(args.model), "step": args.steps, "args": vars(args),
               "eval_before": evals[0] if evals else None, "eval_after": evals[-1] if evals else None,
               "last_train": (read_jsonl_resumable(out / "metrics.jsonl") or [None])[-1] if rank == 0 else None}
    save_policy(out, gen, model, params, ema, args, rank, sidecar)
    if rank == 0:
        write_pictures(out, test, args.grid_prompts)
        if evals:
            a, b = evals[0], evals[-1]
            print0(f"held-out, steps {a['step']} -> {b['step']}: reward {a['eval_reward']:.3f} -> {b['eval_reward']:.3f} | "
                   f"pixel judge {a['eval_judge']:.3f} -> {b['eval_judge']:.3f} (objects {a['eval_objects']:.3f} -> "
                   f"{b['eval_objects']:.3f}, background {a['eval_background']:.3f} -> {b['eval_background']:.3f})")
        print0(f"wrote {out}/{'transformer' if args.full_finetune else 'pytorch_lora_weights.safetensors'}, metrics.jsonl, "
               f"reward_curve.png, samples_grid.png")
    cleanup_dist()


if __name__ == "__main__":
    run_stage(main, get_args())
