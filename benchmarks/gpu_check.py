"""GPU check at the real model sizes with random weights: does each training path run, how fast, in how much memory.

    bash benchmarks/gpu_check.sh     # THE command: the real-layout tests on CUDA, then this on every visible GPU
    torchrun --standalone --nproc_per_node=8 benchmarks/gpu_check.py --out runs/gpu_check   # this part alone
    python benchmarks/gpu_check.py --tiny           # the same code at toy sizes on a CPU (or under torchrun, gloo)

Nothing is downloaded: models are built from their published configs with random weights; the frozen parts (VAE,
text encoders, critic) are random tensors of their output shapes. The project's own pieces do the work:
  a. rl_gen: one DiffusionNFT step of SD3.5-Medium's SD3Transformer2DModel at 512 px, fp32 weights, LoRA r32/alpha 64
     on rl_gen.LORA_TARGETS, FSDP2 per block then root (bf16 compute, fp32 reduce): a rollout batch of 16 with 10
     steps of ode_sample (old policy swapped in), then a micro-batch of 8 at 9 noise levels each (old and base
     passes, forward/backward of nft_loss + 1e-4 kl_loss, grad clip, AdamW). rl_gen's default sizes.
  b. train_reward: one SFT step of Qwen3-VL-8B as train_reward's defaults run it (fp32 weights, the vision tower
     frozen, train_reward.shard, activation checkpointing, forward_loss) on sequences of 1024 tokens with two 512 px
     images each.
  c. rl_edit: the 20 B Qwen-Image(-Edit-2509) transformer built on the meta device, sharded per block then root,
     materialised shard by shard in bf16 (to_empty, random values), LoRA by rl_edit.add_lora; an old-policy pass
     and a forward/backward of nft_loss through rl_edit.predict_velocity at 512 px (1024 noisy + 1024 source +
     200 text tokens): 1 edit without gradient checkpointing, and rl_edit's micro-batch of 8 with it.
Memory: peak per rank (CUDA: max allocated since the model was built; CPU: max RSS, which only grows). Times: the
slowest rank's, of the last of --repeats runs (the first warms up). A part that fails on any rank (e.g. out of
memory) becomes a "failed: <error>" row and the next part runs. The table (part, world size, card, metric, value)
is printed and rewritten to <out>/gpu_check.md and .json after every part, so a killed run keeps what it measured
(a failure on some ranks only, inside a collective, hangs the others: gpu_check.sh puts a time limit on the run).
"""

import argparse
import gc
import math
import resource
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import cleanup_dist, mixed_precision, print0, setup_dist, write_json  # noqa: E402

# -----------------------------------------------------------------------------
# sizes: REAL from the published configs; TINY the same layouts with a few layers and small widths (CPU test)

REAL = dict(
    # stabilityai/stable-diffusion-3.5-medium transformer/config.json
    sd3=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
             pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    sd3_latent=(16, 64, 64), sd3_text=77 + 128,  # 512 px / VAE 8; CLIP 77 + T5 128 tokens (rl_gen --max-sequence-length)
    # Qwen3-VL-8B-Instruct's config.json. NOT transformers' Qwen3VLConfig() defaults, which differ (32 layers,
    # 32 kv heads, intermediate 22016, vision out_hidden 3584).
    vl_text=dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 intermediate_size=12288, vocab_size=151936, max_position_embeddings=262144, rms_norm_eps=1e-6,
                 rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20], mrope_interleaved=True)),
    vl_vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16, spatial_merge_size=2,
                   temporal_patch_size=2, out_hidden_size=4096, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
    vl_ids=dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653),
    vl_seq=1024, vl_answer=256, vl_image=512,  # tokens per sequence, of which answer (the loss); image side, px
    qi={},  # QwenImageTransformer2DModel()'s defaults are Qwen-Image's 20 B transformer (as in Qwen-Image-Edit-2509):
    # 60 blocks, 24 heads x 128, joint_attention_dim 3584, in_channels 64 (16 latent channels packed 2x2), rope 16/56/56
    qi_grid=(32, 32), qi_text=200,  # 512 px / VAE 8 / 2x2 packing; Qwen2.5-VL tokens of instruction + 384 px source
)
TINY = dict(
    sd3=dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16,
             pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"),
    sd3_latent=(16, 8, 8), sd3_text=12,
    vl_text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=1024, max_position_embeddings=4096, rms_norm_eps=1e-6,
                 rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[4, 2, 2], mrope_interleaved=True)),
    vl_vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                   temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[1]),
    vl_ids=dict(image_token_id=1000, video_token_id=1001, vision_start_token_id=1002, vision_end_token_id=1003),
    vl_seq=96, vl_answer=16, vl_image=64,
    qi=dict(num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32, in_channels=16,
            out_channels=4, axes_dims_rope=(8, 12, 12)),
    qi_grid=(8, 8), qi_text=10,
)

# -----------------------------------------------------------------------------
# measuring


def timed(fn, device):
    """(seconds, fn()) with the GPU's queued work included."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda d: None)
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def over_ranks(x, device, op=dist.ReduceOp.MAX):
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)  # collective: every rank calls it at the same point of the part
    return t.item()


def memory_row(device, world):
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30  # Linux ru_maxrss: KiB
    hi, lo = over_ranks(peak, device), over_ranks(peak, device, dist.ReduceOp.MIN)
    return ("peak memory per rank, GiB", f"{hi:.2f}" if world == 1 else f"max {hi:.2f}, min {lo:.2f}")


def numel(params):
    return sum(p.numel() for p in params)  # a sharded DTensor reports its full size


def count(n):
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


@torch.no_grad()
def init_shards_(model):
    """Random values for the shards to_empty allocated: matrices N(0, 1/fan_in), vectors (norm scales) 1,
    biases 0, LoRA B 0 (peft's init: the adapted model starts as the base). Each rank fills only its shards."""
    for name, p in model.named_parameters():
        x = p.to_local() if hasattr(p, "to_local") else p
        if name.endswith("bias") or "lora_B" in name:
            x.zero_()
        elif p.ndim == 1:
            x.fill_(1.0)
        else:
            x.normal_(0.0, p.shape[1] ** -0.5)  # p.shape: the full (unsharded) shape


# -----------------------------------------------------------------------------
# a. rl_gen: one DiffusionNFT step of the SD3 generator


def part_generator(args, S, device, world):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from peft import LoraConfig
    from common import clone_weights, use_weights
    from rl_gen import LORA_TARGETS, kl_loss, nft_loss, ode_sample, rectified_flow_interp, velocity
    torch.manual_seed(0)
    with torch.device(device):  # fp32, as rl_gen trains it; bf16 compute comes from the FSDP policy
        tr = SD3Transformer2DModel(**S["sd3"])
    cfg, n_all = tr.config, numel(tr.parameters())
    # as rl_gen.make_policy: LoRA on the attention projections (B = 0: the policy starts as the base), FSDP2 per block, root
    tr.requires_grad_(False)
    tr.add_adapter(LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    tr.train()
    for block in tr.transformer_blocks:
        fully_shard(block, mp_policy=mixed_precision(device))
    fully_shard(tr, mp_policy=mixed_precision(device, cast_inputs=False))  # velocity keeps the timestep fp32
    dt = mixed_precision(device).param_dtype or torch.float32  # the compute dtype velocity casts the rest to
    params = [p for p in tr.parameters() if p.requires_grad]
    old, ref = clone_weights(params), clone_weights(params)  # the rollout policy and the frozen base (LoRA B = 0)
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-4)  # built after sharding: it holds the shards

    # SD3.5-Medium's scheduler (shift 3): its 10 + 1 noise levels, 1 -> 0, as rl_gen.noise_levels reads them
    (sched := FlowMatchEulerDiscreteScheduler(shift=3.0)).set_timesteps(10, device="cpu")
    levels = sched.sigmas.double()  # (11,)
    T = int(0.99 * 10)  # trained noise levels per sample (rl_gen --timestep-fraction 0.99)
    (C, H, W), Br, Bt = S["sd3_latent"], args.rollout_batch, args.train_batch
    emb = torch.randn(Br, S["sd3_text"], cfg.joint_attention_dim, device=device)  # CLIP-L/G + T5 hidden states
    pooled = torch.randn(Br, cfg.pooled_projection_dim, device=device)

    def rollout():
        with use_weights(tr, params, old):
            return ode_sample(lambda x, t: velocity(tr, x, t, emb, pooled, dt), torch.randn(Br, C, H, W, device=device), levels)[0]

    def train(x0):
        x0, e, p = x0[:Bt], emb[:Bt], pooled[:Bt]
        ts = torch.stack([levels[:-1][torch.randperm(len(levels) - 1)[:T]] for _ in range(Bt)]).float().to(device)  # (B, T)
        x_t = rectified_flow_interp(x0[:, None], torch.randn(Bt, T, C, H, W, device=device), ts[..., None, None, None])
        v_at = lambda i: velocity(tr, x_t[:, i], ts[:, i], e, p, dt)  # (B, C, H, W) at the i-th trained level
        with torch.no_grad():
            with use_weights(tr, params, old):
                v_old = [v_at(i) for i in range(T)]
            with use_weights(tr, params, ref):
                v_ref = [v_at(i) for i in range(T)]
        r = torch.rand(Bt, device=device)  # optimality probabilities (from the rewards in a real step)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(T):
            v = v_at(i)
            loss = nft_loss(v, v_old[i], x_t[:, i], x0, ts[:, i], r) + 1e-4 * kl_loss(v, v_ref[i])  # (B,)
            (loss.mean() / T).backward()
            total += loss.mean().item() / T
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return total

    reset_peak(device)
    for _ in range(args.repeats):
        t_roll, x0 = timed(rollout, device)
        t_train, loss = timed(lambda: train(x0), device)
    t_roll, t_train = over_ranks(t_roll, device), over_ranks(t_train, device)
    loss = over_ranks(loss, device, dist.ReduceOp.SUM) / world  # a NaN anywhere shows
    n = 48 * 16  # the paper's rollouts per step (48 prompts x 16), split over the ranks
    step = math.ceil(n / world / Br) * t_roll + math.ceil(n / world / Bt) * t_train
    tokens = (H // cfg.patch_size) * (W // cfg.patch_size)
    return [("model", f"{count(n_all)} params, LoRA {count(numel(params))}; {tokens} image + {S['sd3_text']} text tokens"),
            (f"rollout: s per batch of {Br} per rank, 10 ODE steps", f"{t_roll:.3f}"),
            ("rollout samples/s, all ranks", f"{Br * world / t_roll:.2f}"),
            (f"train: s per micro-batch of {Bt} per rank x {T} levels (old + base passes, fwd/bwd, AdamW)", f"{t_train:.3f}"),
            ("train samples/s, all ranks", f"{Bt * world / t_train:.2f}"),
            ("RL step of 48 x 16 rollouts, s (rollout + train, no reward)", f"{step:.1f}"),
            ("NFT + KL loss, mean over ranks (finite?)", f"{loss:.4g}"),
            memory_row(device, world)]

# -----------------------------------------------------------------------------
# b. train_reward: one SFT step of the Qwen3-VL critic


def critic_batch(cfg, S, B, device):
    """B sequences as train_reward.collate makes them: random text tokens with two images near the start
    (<vision_start>, image pads, <vision_end>) and the answer (the only labels) at the end."""
    v, L = cfg.vision_config, S["vl_seq"]
    side = S["vl_image"] // v.patch_size  # patches per image side (32 at 512 px)
    n_img = side * side // v.spatial_merge_size ** 2  # LLM tokens per image after the 2x2 merger (256)
    ids = torch.randint(0, min(S["vl_ids"].values()), (B, L))  # ordinary tokens only
    mm = torch.zeros(B, L, dtype=torch.int32)  # 1 marks image tokens (Qwen3-VL's 3-D rope needs it)
    pos = 8
    for _ in range(2):
        ids[:, pos], ids[:, pos + n_img + 1] = cfg.vision_start_token_id, cfg.vision_end_token_id
        ids[:, pos + 1:pos + 1 + n_img], mm[:, pos + 1:pos + 1 + n_img] = cfg.image_token_id, 1
        pos += n_img + 2 + 8
    assert pos < L - S["vl_answer"], "the images do not fit in the sequence"
    labels = torch.full_like(ids, -100)
    labels[:, -S["vl_answer"]:] = ids[:, -S["vl_answer"]:]
    patch = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, mm_token_type_ids=mm,
                 pixel_values=torch.randn(2 * B * side * side, patch), image_grid_thw=torch.tensor([[1, side, side]] * (2 * B)))
    return {k: x.to(device) for k, x in batch.items()}


def part_critic(args, S, device, world):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from train_reward import forward_loss, shard
    cfg = Qwen3VLConfig(text_config=S["vl_text"], vision_config=S["vl_vision"], tie_word_embeddings=False, **S["vl_ids"])
    torch.manual_seed(0)
    with torch.device(device):  # fp32 master weights, as train_reward.load_base (bf16 compute from the FSDP policy)
        model = Qwen3VLForConditionalGeneration(cfg)
    n_all = numel(model.parameters())
    model.config.use_cache = False
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})  # as --activation-checkpointing
    model.model.visual.requires_grad_(False)  # as train_reward's default --freeze-vision (LLaMA-Factory's)
    t_shard, model = timed(lambda: shard(model, device, world), device)  # FSDP2; rank 0's weights broadcast to all
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]  # after sharding: FSDP2 replaces them with DTensors
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    batch = critic_batch(cfg, S, args.sft_batch, device)
    n_tok = int((batch["labels"][:, 1:] != -100).sum()) * world  # answer tokens of the global batch

    def step():
        loss, _ = forward_loss(model, batch)  # summed cross-entropy over the answer tokens (train_reward.sft_loss)
        (loss * world / n_tok).backward()  # FSDP averages over ranks: this makes it the global token mean
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    reset_peak(device)
    for _ in range(args.repeats):
        t, loss = timed(step, device)
    t, loss = over_ranks(t, device), over_ranks(loss, device, dist.ReduceOp.SUM) / n_tok
    B, L = args.sft_batch, S["vl_seq"]
    return [("model", f"{count(n_all)} params, {count(numel(params))} trained; {B} x {L} tokens per rank, 2 images of "
                      f"{S['vl_image']} px and {S['vl_answer']} answer tokens each"),
            ("train_reward.shard (FSDP2 + broadcast of rank 0's weights), s", f"{over_ranks(t_shard, device):.1f}"),
            ("s per step (fwd/bwd with checkpointing, grad clip, AdamW)", f"{t:.3f}"),
            ("tokens/s, all ranks", f"{B * L * world / t:.0f}"),
            (f"loss per answer token (random init: about ln {cfg.text_config.vocab_size} = "
             f"{math.log(cfg.text_config.vocab_size):.1f})", f"{loss:.4g}"),
            memory_row(device, world)]

# -----------------------------------------------------------------------------
# c. rl_edit: the 20 B Qwen-Image transformer, meta-built, sharded, one NFT forward/backward with LoRA


def part_editor(args, S, device, world, batch, checkpointing):
    from diffusers import QwenImageTransformer2DModel
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope
    from torch.distributed.device_mesh import init_device_mesh
    from rl_edit import add_lora, predict_velocity
    from rl_gen import nft_loss, rectified_flow_interp
    t0 = time.perf_counter()
    with torch.device("meta"):  # shapes only: no rank ever holds the whole 40 GB
        tr = QwenImageTransformer2DModel(**S["qi"])
    for p in tr.parameters():
        p.data = p.data.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    # its RoPE tables are plain tensor attributes, not buffers, so to_empty would leave them on meta: rebuild them
    tr.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(tr.config.axes_dims_rope), scale_rope=True)
    cfg, n_all = tr.config, numel(tr.parameters())
    # as rl_edit.main: frozen base in the compute dtype, LoRA adapters in fp32, checkpointing, then FSDP2
    tr.requires_grad_(False)
    add_lora(tr, 32, 64)
    if checkpointing:
        tr.enable_gradient_checkpointing()
    for p in tr.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    mesh = init_device_mesh(device.type, (world,))
    for block in tr.transformer_blocks:
        fully_shard(block, mesh=mesh, mp_policy=mixed_precision(device))
    fully_shard(tr, mesh=mesh, mp_policy=mixed_precision(device))
    tr.to_empty(device=device)  # each rank allocates its shards only
    init_shards_(tr)
    tr.train()
    params = [p for p in tr.parameters() if p.requires_grad]
    t_build = over_ranks(time.perf_counter() - t0, device)

    (gh, gw), B = S["qi_grid"], batch
    x0, src, eps = (torch.randn(B, gh * gw, cfg.in_channels, device=device) for _ in range(3))  # packed latents (B, N, 64)
    t = torch.rand(B, device=device) * 0.98 + 0.01
    x_t = rectified_flow_interp(x0, eps, t)
    embeds = torch.randn(B, S["qi_text"], cfg.joint_attention_dim, device=device)  # Qwen2.5-VL's last hidden states
    mask = torch.ones(B, S["qi_text"], dtype=torch.bool, device=device)
    r = torch.rand(B, device=device)

    def fwd_bwd():
        v_of = lambda: predict_velocity(tr, x_t, src, t, embeds, mask, (gh, gw)).float()  # (B, N, 64): noisy tokens only
        with torch.no_grad():
            v_old = v_of()  # the old policy's pass (its weights would be swapped in)
        loss = nft_loss(v_of(), v_old, x_t, x0, t, r).mean()
        loss.backward()
        for p in params:
            p.grad = None
        return loss.item()

    reset_peak(device)
    for _ in range(args.repeats):
        t_step, loss = timed(fwd_bwd, device)
    t_step, loss = over_ranks(t_step, device), over_ranks(loss, device, dist.ReduceOp.SUM) / world
    return [("model", f"{count(n_all)} params, LoRA {count(numel(params))}; {B} x ({2 * gh * gw} image + "
                      f"{S['qi_text']} text) tokens per rank"),
            ("build on meta + shard + materialise, s", f"{t_build:.1f}"),
            ("s per old-policy pass + fwd/bwd", f"{t_step:.3f}"),
            ("NFT loss, mean over ranks (finite?)", f"{loss:.4g}"),
            memory_row(device, world)]

# -----------------------------------------------------------------------------
# the table


def write_table(rows, out, env):
    esc = lambda s: str(s).replace("|", "\\|")
    md = "\n".join(["| part | world size | card | metric | value |", "|---|---|---|---|---|"] +
                   [f"| {esc(r['part'])} | {r['world']} | {esc(r['card'])} | {esc(r['metric'])} | {esc(r['value'])} |"
                    for r in rows]) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(md)
    write_json(out / "gpu_check.json", {"env": env, "rows": rows})
    return md


def run_part(label, fn, rank, world, device):
    """fn() on every rank -> its rows, or one 'failed: ...' row if it raised on any rank. Never raises."""
    t0 = time.time()
    try:
        rows, err = fn(), None
    except Exception as e:  # e.g. torch.OutOfMemoryError: record it, free what the part held, go on
        rows, err = [], f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        print(f"rank {rank}: {label} failed: " + (traceback.format_exc() if rank == 0 else err), flush=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    errs = [None] * world
    dist.all_gather_object(errs, err)
    bad = [(r, e) for r, e in enumerate(errs) if e]
    if bad:
        rows = [("result", f"failed: {bad[0][1]}" + (f" (rank {bad[0][0]}; {len(bad)} of {world} ranks failed)" if world > 1 else ""))]
    print0(f"{label}: {'failed' if bad else 'done'} in {time.time() - t0:.1f} s")
    return rows, bool(bad)


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="toy sizes (a few layers, small widths): the CPU test of this script")
    ap.add_argument("--out", default=None, help="output folder (default runs/gpu_check, with --tiny runs/gpu_check_tiny)")
    ap.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"], help="which parts to run")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each measured step; the last is reported")
    # batch sizes per rank (defaults: the stage scripts')
    ap.add_argument("--rollout-batch", type=int, default=16, help="a: samples per sampler call (rl_gen --micro-batch)")
    ap.add_argument("--train-batch", type=int, default=8, help="a: samples per forward/backward (rl_gen --micro-batch)")
    ap.add_argument("--sft-batch", type=int, default=10, help="b: sequences per forward/backward (train_reward --micro-batch)")
    ap.add_argument("--edit-batch", type=int, default=8, help="c: edits per forward/backward with checkpointing (rl_edit --micro-batch)")
    ap.add_argument("--tests", default=None, help="result of the real-layout test tier, for the table (gpu_check.sh sets it)")
    return ap.parse_args(argv)


def main(args):
    rank, world, device = setup_dist()
    if device.type != "cuda" and not args.tiny:
        cleanup_dist()
        sys.exit("no CUDA GPU: the real sizes need GPUs (an 8 B model in fp32 is 35 GB); on a CPU run --tiny")
    S, out = (TINY if args.tiny else REAL), Path(args.out or ("runs/gpu_check_tiny" if args.tiny else "runs/gpu_check"))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    import diffusers, peft, transformers
    env = {"world": world, "card": card, "tiny": args.tiny, "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
           "backend": str(dist.get_backend()), "args": vars(args)}
    print0(f"gpu_check: world {world} on {card} ({device.type}, backend {env['backend']}), {'TINY' if args.tiny else 'real'} "
           f"sizes, parts {' '.join(args.parts)}, {args.repeats} repeats")
    table = [dict(part="real-layout tests", world=world, card=card, metric="pytest -q tests/test_real_layout.py",
                  value=args.tests)] if args.tests else []
    tag = " [tiny]" if args.tiny else ""
    parts = [("a", "a. rl_gen: SD3.5-Medium DiffusionNFT step, LoRA, 512 px", lambda: part_generator(args, S, device, world)),
             ("b", "b. train_reward: Qwen3-VL-8B SFT step, vision frozen", lambda: part_critic(args, S, device, world)),
             ("c", "c. rl_edit: Qwen-Image 20B LoRA, 1 edit, no checkpointing",
              lambda: part_editor(args, S, device, world, 1, False)),
             ("c", f"c. rl_edit: Qwen-Image 20B LoRA, {args.edit_batch} edits, checkpointing",
              lambda: part_editor(args, S, device, world, args.edit_batch, True))]
    n_failed = 0
    for key in args.parts:
        for label, fn in [(label + tag, fn) for k, label, fn in parts if k == key]:
            rows, failed = run_part(label, fn, rank, world, device)
            n_failed += failed
            table += [dict(part=label, world=world, card=card, metric=m, value=v) for m, v in rows]
            if rank == 0:
                md = write_table(table, out, env)
    if rank == 0:
        print("\n" + md + f"\nwrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'}", flush=True)
    cleanup_dist()
    sys.exit(1 if n_failed else 0)  # a failed part shows in the table and in the exit status


if __name__ == "__main__":
    main(get_args())
