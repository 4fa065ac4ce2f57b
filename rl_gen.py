"""DiffusionNFT for a text-to-image model (SD3) with the FIRM QMA reward (paper Sec 3.4, 4.1; FIRM_NOTES 4).

One RL step, as the release runs it (main() numbers its steps the same way):
  1. rollout: K samples of each of P prompts from the "old" policy, deterministic 10-step DPM-Solver-2 style ODE
     sampler, no classifier-free guidance; keep the final latents x0 and the sampler's noise levels;
  2. reward: QMA, R = I (0.4 + 0.6 Q), from the generation critic (in process, or served by an inference engine);
  3. A = (R - mean of the prompt's group) / (std of the whole batch + 1e-4), clipped to [-5, 5]; r = 0.5 + A / 10;
  4. the NFT loss on the positive and implicit negative velocities with adaptive x0-space weights, plus kl_weight *
     mse to the frozen base's velocity, at 99% of the rollout's own noise levels; one AdamW step;
  5. soft updates: the old policy follows the trained one; an EMA of the trained weights is what gets saved.
The DiffusionNFT block below is the algorithm in one piece (rl_edit.py imports it). The policy: SD3.5-Medium (any
StableDiffusion3Pipeline directory) with LoRA (rank 32, alpha 64) on the attention projections, or --full-finetune.

  python rl_gen.py --preset mini                                       # the miniature world, on one CPU core
  torchrun --standalone --nproc_per_node=8 rl_gen.py --model /ckpt/stable-diffusion-3.5-medium \
      --prompts prompts.jsonl --test-prompts test.jsonl --reward-model /ckpt/FIRM-Gen-8B --out runs/firm-sd35
  (or --reward-model http://critic-host:8000/v1#firm-gen: a critic served by vLLM, see the README)

Outputs in --out: pytorch_lora_weights.safetensors (the EMA LoRA; pipe.load_lora_weights(out)) + .json sidecar (or
transformer/ with --full-finetune), metrics.jsonl (per step), eval.jsonl (per evaluation), reward_curve.png,
samples_grid.png (held-out prompts x evaluations), checkpoint/. Sample the LoRA without CFG (guidance_scale=1.0).

Departures from the paper / release:
  1. The old policy, the EMA and the frozen base are values of the trained parameters swapped into the one sharded
     model (common.use_weights). With LoRA the frozen base is the adapters at B = 0: exactly the base model.
  2. A sample whose critic answer gave no score is dropped from its group and from training, and counted
     (reward_fail); the release rewards a failed instruction score 0, a failed quality the instruction score alone.
  3. Without a T5 encoder no T5 tokens are appended; without a VAE the latents are pixels (decode() knows).
  4. Every --eval-every steps the EMA weights draw one image per held-out prompt (fixed seeds), scored by the
     critic and, with --eval-judge SPEC, by an independent judge; with the rollouts' ODE sampler (the release: Euler).
  5. Details where the release's code differs (group size, precision, the critic's templates): README, deviation 9.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from common import (add_rl_args, all_gather_values, cleanup_dist, clone_weights, DataError, evaluate_rl, fsdp_shard,
                    full_weights, mixed_precision, noise_like, parse_with_preset, print0, rank_batches, read_manifest,
                    RLRun, run_stage, sample_seed, save_diffusers_model, save_lora_files, setup_dist, step_prompts,
                    tensor_to_pil, use_weights, write_json)
from reward import METHODS, open_critic, rl_rewards

# -----------------------------------------------------------------------------
# CLI: the defaults are the paper's / release's settings; a preset swaps in a small setting (explicit flags win).
# rl_edit.py uses the same flag names for the same things.

PRESETS = {
    # The miniature world on one CPU core (MINIATURE_NOTES): the tiny SD3 and gen critic; 4 prompts x 8 samples per
    # step, 2 of the 10 noise levels trained per sample, LoRA lr 1e-3, 60 steps. The KL to the base weighs 1 (the
    # release: 1e-4, inert here): unanchored, the tiny critic is hacked (its held-out reward rises while the judge
    # falls); of the counters measured in three worlds only the anchor gained in all three (NOTES.md, "A KL anchor").
    "mini": dict(model="runs/mini/models/gen-base", prompts="runs/mini/data/rl/gen_train.jsonl",
                 test_prompts="runs/mini/data/rl/gen_test.jsonl", reward_model="runs/mini/models/gen-critic",
                 eval_judge="toy.judges:pixel", reward_image_size=64, out="runs/mini/rl_gen", resolution=0, steps=60,
                 prompts_per_step=4, group_size=8, timestep_fraction=0.2, lr=1e-3, kl_weight=1.0, micro_batch=32, eval_every=20,
                 eval_steps=10, save_every=10, eval_prompts=32, reward_max_new_tokens=256, threads=1),
}


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # model and data
    ap.add_argument("--model", default=None, help="StableDiffusion3Pipeline directory (e.g. stable-diffusion-3.5-medium)")
    ap.add_argument("--prompts", default=None, help="JSONL {id, prompt[, requirement]} of RL training prompts")
    ap.add_argument("--test-prompts", default=None, help="JSONL of held-out prompts for evaluation (optional)")
    ap.add_argument("--out", default="runs/rl_gen", help="output directory")
    ap.add_argument("--resolution", type=int, default=512, help="image side, px (0 = the model's native size)")
    ap.add_argument("--max-sequence-length", type=int, default=128, help="T5 tokens (release: 128)")
    ap.add_argument("--reward-image-size", type=int, default=0, help="resize images to this side (px) for the critic "
                    "(0 = as generated)")
    add_rl_args(ap, METHODS)  # the flags rl_edit.py shares, with the same names (common.add_rl_args)
    return parse_with_preset(ap, PRESETS, argv, required=("model", "prompts", "reward_model"))


# -----------------------------------------------------------------------------
# DiffusionNFT: the paper's quantities as small pure functions (FIRM_NOTES section 4), then the update.
# Conventions (rectified flow, as SD3 and Qwen-Image use): t in [0, 1], t = 1 is pure noise,
#   x_t = (1 - t) x0 + t eps,   the network predicts the velocity v = eps - x0,   x0_hat = x_t - t v.

ADV_CLIP = 5.0  # advantages are clipped to [-5, 5] and the NFT loss is scaled by the same 5 (release: adv_clip_max)

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


def group_advantages(rewards, group_ids, clip=ADV_CLIP, eps=1e-4):
    """A = (R - mean of its prompt group) / (std over the whole batch + eps), clipped to [-clip, clip]; float64 (N,).

    None or NaN marks a reward that could not be computed: that sample is DROPPED from its group's mean and the
    std, and its A is NaN ("do not train on it"). The std is over the whole gathered batch, not per group (per-group
    std would blow tiny reward differences up to +-1; DiffusionNFT and FIRM use the global one).
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


def optimality_probability(adv, clip=ADV_CLIP):
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


def nft_loss(v, v_old, x_t, x0, t, r, nft_beta=1.0, scale=ADV_CLIP):
    """The DiffusionNFT policy loss, per sample (B,):

    x0+ = x_t - t v+,  x0- = x_t - t v-,
    L = scale * ( r |x0+ - x0|^2 / w+  +  (1 - r) |x0- - x0|^2 / w- ) / nft_beta   (means over pixels),
    with w+- the adaptive weights. `scale` is the advantage clip (ADV_CLIP), as in the release. Take .mean() for the loss.
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


def optimality_targets(rewards, group_ids):
    """Step 3 for a whole step: rewards (None = no score) -> (r (N,), valid (N,) bool). A failed reward is valid
    False: the caller gives that sample weight 0."""
    adv = group_advantages(rewards, group_ids)  # (N,) float64, NaN where the reward failed
    return optimality_probability(adv.nan_to_num(0.0)).float(), ~torch.isnan(adv)


def training_points(x0, levels, seeds, T):
    """Step 4's inputs: per sample, T of the rollout's own noise levels (`levels`, without the final 0) in an order
    drawn from the sample's seed, and x0 re-noised at each with fresh noise from that seed.
    x0 (B, ...) -> (ts (B, T), x_t (B, T, ...))."""
    pick = lambda s: torch.randperm(len(levels), generator=torch.Generator().manual_seed(sample_seed(s, "t")))[:T]
    ts = torch.stack([levels[pick(s)] for s in seeds]).float().to(x0.device)  # (B, T)
    eps = torch.stack([noise_like(x0.shape[1:], [sample_seed(s, "eps", i) for i in range(T)], x0.device)
                       for s in seeds])  # (B, T, ...)
    return ts, rectified_flow_interp(x0[:, None], eps, ts.view(*ts.shape, *[1] * (x0.ndim - 1)))


def nft_update(model, params, opt, old, ref, micro_batches, n_valid, args, world):
    """Step 4: the DiffusionNFT loss over this rank's micro-batches, one AdamW step.

    micro_batches: [(vfn, x_t (B, T, ...), ts (B, T), x0 (B, ...), r (B,), w (B,))]: vfn(x, t) -> v is the policy's
    velocity under that micro-batch's conditioning, x_t the rollout's x0 re-noised at T of its noise levels ts,
    r the optimality probabilities, w the sample weights (0 = failed reward or padding). n_valid: samples with a
    reward over ALL ranks. Returns float64 (4,): sums of loss, nft, kl (weighted) and the gradient norm.
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
    # FSDP averages gradients over the ranks, so each rank's sum is scaled by world / (all valid samples x T):
    # the total is the mean over every valid (sample, noise level) of the whole step, whatever the rank count
    norm = world / (n_valid * micro_batches[0][2].shape[1])
    for k, (vfn, x_t, ts, x0, r, w) in enumerate(micro_batches):  # every rank runs as many passes (padding): FSDP needs it
        for i in range(ts.shape[1]):
            v = vfn(x_t[:, i], ts[:, i])  # (B, ...)
            l_nft = nft_loss(v, frozen["old"][k][:, i], x_t[:, i], x0, ts[:, i], r, nft_beta=args.nft_beta, scale=ADV_CLIP)
            l_kl = kl_loss(v, frozen["ref"][k][:, i]) if ref is not None else torch.zeros_like(l_nft)  # (B,)
            loss = l_nft + args.kl_weight * l_kl  # the NFT beta lives inside nft_loss; kl_weight only here
            ((loss * w).sum() * norm).backward()  # gradients reduce-scattered over the ranks here (FSDP2)
            stats[:3] += torch.stack([(x.detach() * w).sum() for x in (loss, l_nft, l_kl)]).double()
    gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)  # sync point: the norm over every rank's shard
    stats[3] = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
    opt.step()
    return stats


def nft_step(model, params, opt, old, ema, ref, micro_batches, valid, step, args, world):
    """Steps 4-5: one optimizer step and the soft updates; nothing at all when no sample of the step has a reward
    (an AdamW step on a zero gradient still moves the weights). The decay schedules count optimizer steps DONE
    (the release increments its counter first): step + 1. Returns the log's loss / nft / kl / grad_norm."""
    n_valid, T = int(valid.sum()), micro_batches[0][2].shape[1]
    if n_valid == 0:
        print0(f"step {step + 1}: no sample of the step has a reward; skipping the update")
        return {"loss": None, "nft": None, "kl": None, "grad_norm": None}
    stats = nft_update(model, params, opt, old, ref, micro_batches, n_valid, args, world)
    ema_update_(old, params, old_policy_decay(step + 1))  # the rollout policy follows slowly
    ema_update_(ema, params, ema_decay(step + 1))  # the saved weights
    sums = stats[:3].clone()
    if world > 1:
        torch.distributed.all_reduce(sums)  # sync point: the loss sums of every rank's samples, for the log
    return {"loss": float(sums[0]) / (n_valid * T), "nft": float(sums[1]) / (n_valid * T),
            "kl": float(sums[2]) / (n_valid * T), "grad_norm": float(stats[3])}


# -----------------------------------------------------------------------------
# the model adapter: the generator (loading, prompt encoding, the velocity field, sampling, decoding), the policy


class Generator:
    """The parts of a StableDiffusion3Pipeline that RL uses. `vae` is None in the miniature world."""

    def __init__(self, pipe, device, max_sequence_length=128, dtype=torch.float32):
        self.pipe, self.device, self.dtype = pipe, device, dtype  # dtype: of the frozen parts (and of saved weights)
        self.transformer, self.vae = pipe.transformer, pipe.vae
        self.compute_dtype = pipe.transformer.dtype  # what velocity casts its inputs to; make_policy sets FSDP2's
        self.shift = float(pipe.scheduler.config.get("shift", 1.0))  # SD3's timestep shift (3.0 for SD3.5-M)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        # deviation 3: no T5 encoder -> no T5 tokens (the pipeline would append as many zero vectors)
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
                        f"(for the miniature world run `python -m toy pretrain-gen`)")
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


def velocity(transformer, x_t, t, emb, pooled, dtype):
    """The SD3 transformer's prediction v = eps - x0 at noise level t in [0, 1] (it takes t * 1000), in fp32.

    dtype: Generator.compute_dtype, for all inputs but the timestep: fp32 as in the SD3 pipeline and the release (bf16
    rounds 1000 t and the embedding's frequencies: 857.69 -> 856, 38% of its norm; make_policy stops FSDP2's cast)."""
    return transformer(hidden_states=x_t.to(dtype), encoder_hidden_states=emb.to(dtype),
                       pooled_projections=pooled.to(dtype), timestep=(t * 1000).float(), return_dict=False)[0].float()


@torch.no_grad()
def sample_latents(gen, transformer, emb, pooled, seeds, timesteps, shape, batch_size):
    """Deterministic ODE sampling (ode_sample) of len(seeds) latents, batch_size at a time. Returns (B, C, h, w)."""
    out = []
    for i in range(0, len(seeds), batch_size):
        e, p = emb[i:i + batch_size], pooled[i:i + batch_size]
        x_T = noise_like(shape, seeds[i:i + batch_size], gen.device)
        x0, _ = ode_sample(lambda x, t: velocity(transformer, x, t, e, p, gen.compute_dtype), x_T, timesteps)
        out.append(x0)
    return torch.cat(out) if out else torch.zeros(0, *shape, device=gen.device)


@torch.no_grad()
def decode(gen, latents):
    """Latents -> images in [-1, 1]. The one place that knows about the VAE (deviation 3: none = pixels)."""
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
    fsdp_shard(tr, tr.transformer_blocks, device, cast_root_inputs=False)  # velocity casts all but the timestep
    gen.compute_dtype = mixed_precision(device).param_dtype or tr.dtype
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
# data and reward


def load_prompts(path):
    """Prompt records {prompt[, id, requirement, ...]}, all checked first (common.read_manifest); a record without an
    id gets "<file stem>:<line>"; other fields travel with the record (a judge may read them: reward.open_critic)."""
    rows = read_manifest(path, {"id": "id?", "prompt": "text", "requirement": "str?"}, lines=True)
    for lineno, r in rows:
        r.setdefault("id", f"{Path(path).stem}:{lineno}")
    return [r for _, r in rows]


def score(critic, fusion, recs, images, method="generate", size=0):
    """Step 2: the critic's fused reward of each image, in [0, 1]; None where an answer gave no score (that sample
    is dropped from its group: deviation 2)."""
    from PIL import Image
    items = [{"image": im.resize((size, size), Image.BICUBIC) if size else im, "prompt": r["prompt"],
              "requirement": r.get("requirement"), "record": r} for im, r in zip(images, recs)]
    return rl_rewards("gen", critic, items, fusion, method)


# -----------------------------------------------------------------------------
# the loop


def main(args):
    # Setup: one code path for python and torchrun (a world of one without it)
    rank, world, device = setup_dist(args.threads)
    out = Path(args.out)
    train = load_prompts(args.prompts)
    test = load_prompts(args.test_prompts)[:args.eval_prompts] if args.test_prompts and args.eval_every else []
    # the critics before the policy: a wrong path or URL fails in seconds
    critic = open_critic(args.reward_model, device=device, prompt_file=args.reward_prompt_file, batch_size=args.reward_batch,
                         max_new_tokens=args.reward_max_new_tokens)
    judge = open_critic(args.eval_judge, device=device, batch_size=args.reward_batch) if args.eval_judge and test else None

    # The policy: LoRA (or every weight) on the fp32 transformer, FSDP2, the optimizer after sharding. The frozen base,
    # the old (rollout) policy and the EMA are values of the trained parameters (deviation 1)
    gen = load_generator(args.model, device=device, transformer_dtype=torch.float32, max_sequence_length=args.max_sequence_length)
    model, params = gen.transformer, make_policy(gen, args, device)
    ref = clone_weights(params) if args.kl_weight > 0 else None
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    run = RLRun(args, model, params, opt, rank, device, f"rl_gen --reward {args.reward}", min(args.grid_prompts, len(test)))
    start, old, ema = run.resume(clone_weights(params), clone_weights(params))

    P, K = args.prompts_per_step, args.group_size
    N, T = P * K, max(1, int(args.timestep_fraction * args.rollout_steps))  # samples per step; trained levels per sample
    levels = noise_levels(gen.pipe.scheduler, args.rollout_steps)  # (steps + 1,) the checkpoint's own, 1 -> 0
    shape = gen.latent_shape(args.resolution)
    print0(f"{world} rank(s) | {'full fine-tuning' if args.full_finetune else f'LoRA r{args.lora_rank} alpha {args.lora_alpha:g}'}: "
           f"{sum(p.numel() for p in params) / 1e6:.3f} M trained parameters | latents {tuple(shape)}, shift {gen.shift:g}")
    print0(f"per step: {P} prompts x {K} samples = {N} rollouts, ~{math.ceil(N / world)} per rank | {args.rollout_steps} "
           f"sampler steps, {T} trained noise levels per sample | reward {args.reward} | {len(train)} prompts, {len(test)} held out")
    def evaluate(step):  # the EMA weights (what gets saved), one sample per held-out prompt, the same seeds every time
        eval_levels = noise_levels(gen.pipe.scheduler, args.eval_steps)
        def draw(idx):
            emb, pooled = encode_prompts(gen, [test[i]["prompt"] for i in idx])
            lat = sample_latents(gen, model, emb, pooled, [sample_seed(args.seed, "eval", i) for i in idx], eval_levels, shape, len(idx))
            return [tensor_to_pil(x) for x in decode(gen, lat)]
        scorers = {"reward": lambda idx, ims: score(critic, args.reward, [test[i] for i in idx], ims, args.reward_method, args.reward_image_size)}
        if judge is not None:
            scorers["judge"] = lambda idx, ims: score(judge, "qma", [test[i] for i in idx], ims)
        with use_weights(model, params, ema):
            return evaluate_rl(draw, scorers, [0] * len(test), step, out, args.grid_prompts, args.micro_batch, rank, world, device)

    if start == 0 and test:
        run.elog.log(0, **evaluate(0))
    for step in range(start, args.steps):
        t0 = time.time()
        # 1. rollout: K samples of each of the step's P prompts from the old policy (deterministic ODE, no CFG)
        prompt_of = [p for p in step_prompts(len(train), P, step, args.seed) for _ in range(K)]  # (N,) sample j -> prompt
        seeds = [sample_seed(args.seed, step, j) for j in range(N)]  # of the global index, never of the rank
        batches = []
        with use_weights(model, params, old):
            for idx, real in rank_batches([0] * N, rank, world, args.micro_batch):  # one shape: contiguous chunks
                emb, pooled = encode_prompts(gen, [train[prompt_of[j]]["prompt"] for j in idx])
                x0 = sample_latents(gen, model, emb, pooled, [seeds[j] for j in idx], levels, shape, len(idx))  # (B, C, h, w)
                batches.append((idx, real, emb, pooled, x0))
        # 2. reward: each rank scores its own samples, then every rank has every reward
        t1 = time.time()
        mine = [j for idx, real, *_ in batches if real for j in idx]
        images = [tensor_to_pil(x) for idx, real, _, _, x0 in batches if real for x in decode(gen, x0)]
        local = score(critic, args.reward, [train[prompt_of[j]] for j in mine], images, args.reward_method, args.reward_image_size)
        rewards = all_gather_values(local, mine, N, device)
        # 3. advantages (group mean, global std) -> optimality probability r; a failed reward trains nothing
        t2 = time.time()
        r, valid = optimality_targets(rewards, prompt_of)  # (N,), (N,)
        # 4-5. the NFT update at T of the rollout's own noise levels per sample, then the soft updates
        micro = []
        for idx, real, emb, pooled, x0 in batches:
            ts, x_t = training_points(x0, levels[:-1], [seeds[j] for j in idx], T)  # (B, T), (B, T, C, h, w)
            vfn = lambda x, t, e=emb, p=pooled: velocity(model, x, t, e, p, gen.compute_dtype)
            micro.append((vfn, x_t, ts, x0, r[idx].to(device), (valid[idx] & real).float().to(device)))
        nft = nft_step(model, params, opt, old, ema, ref, micro, valid, step, args, world)
        run.log_step(step, rewards, nft, t0, t1, t2)
        if run.end_step(step, start, old, ema, evaluate if test else None):
            return cleanup_dist()

    # Save: the EMA weights, in the format diffusers loads
    run.finish(lambda sidecar: save_policy(out, gen, model, params, ema, args, rank, sidecar),
               "transformer/" if args.full_finetune else "pytorch_lora_weights.safetensors")
    cleanup_dist()


if __name__ == "__main__":
    run_stage(main, get_args())
