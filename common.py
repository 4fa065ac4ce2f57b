"""Plumbing shared by every stage; nothing here is in the paper.

Process group (a world of one without torchrun), seeding, JSONL manifests that fail with
file:line:field, images that fail with the file name, safetensors + JSON sidecars, the
one-line-per-step metrics log and a dependency-free line plot for reward/loss curves.
"""

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, UnidentifiedImageError
from safetensors.torch import load_file, save_file

# -----------------------------------------------------------------------------
# distributed: one code path for `python x.py` and `torchrun x.py`


def setup_dist(threads=0):
    """Join torchrun's process group, or make a world of one. Returns (rank, world, device). threads: torch's CPU
    threads per rank (0 = torch's default).

    Without torchrun we still create a (single-process) group so that the collectives and the state-dict
    gathers run exactly as they do on many GPUs (fsdp_shard leaves one CPU process unsharded).
    """
    if threads:
        torch.set_num_threads(threads)
    if not dist.is_initialized():
        backend = process_group_backend(torch.cuda.is_available())
        timeout = datetime.timedelta(minutes=30)
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def process_group_backend(cuda):
    """NCCL for GPU tensors and gloo for CPU ones: NCCL has no CPU backend, and a collective on a CPU
    tensor under NCCL alone fails ("No backend type associated with device type cpu"), even in a world of one."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def every(step, interval):
    """True when `step` (1-based, steps done) is a multiple of `interval`; an interval of 0 (or None) means never."""
    return bool(interval) and step % interval == 0


def cleanup_dist():
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still writes (rank 0's final files)
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# big models on many ranks: rank 0 reads the checkpoint, the others build an empty skeleton, FSDP2 shards it,
# and the weights are broadcast into the shards. Host memory: one full copy per node instead of one per rank
# (a 20B editor + 7B encoder on 8 ranks: ~57 GB instead of ~460 GB).


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with their parameters on the meta device (no memory, no initialisation work). Buffers and
    plain tensor attributes (RoPE tables, which no state dict carries) are built for real, as on rank 0."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def load_on_rank0(load, build_empty, rank):
    """(model, full state dict): rank 0 runs `load()` (the checkpoint, on the CPU), the others `build_empty()` under
    parameters_on_meta. Apply the same changes on every rank (LoRA, dtypes), then shard, then fill_from_rank0."""
    if rank == 0:
        return load()
    with parameters_on_meta():
        return build_empty()


def full_state_of(model, rank):
    """Rank 0's full state dict (its tensors stay alive until the broadcast); {} elsewhere."""
    return {k: v for k, v in model.state_dict().items()} if rank == 0 else {}


def fill_from_rank0(model, full_state, device):
    """After fully_shard: broadcast rank 0's full state dict into every rank's shards. Collective.

    A rank holding meta parameters first allocates its (local, sharded) storage with to_empty, which keeps tied
    parameters tied (loading into meta parameters would replace each name with a parameter of its own); the
    buffers that to_empty would blank (RoPE tables: no state dict carries them) are kept as they were built."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    if any((p.to_local() if hasattr(p, "to_local") else p).is_meta for p in model.parameters()):
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        model.to_empty(device=device)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


# -----------------------------------------------------------------------------
# FSDP2: the shard recipe, parameter-value sets swapped in and out (old policy, EMA, frozen base), RL checkpoints
# with one optimizer-state format


def mixed_precision(device, cast_inputs=True):
    """bf16 compute with fp32 master weights and fp32 gradient reduction on GPU; plain fp32 on CPU. cast_inputs=False:
    the module's floating inputs arrive in the dtype its caller gives them, not cast to bf16 by FSDP."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=cast_inputs)
    return MixedPrecisionPolicy()


def fsdp_shard(root, blocks, device, mesh=None, mp=True, cast_root_inputs=True):
    """FSDP2 as the PyTorch examples do it: fully_shard each block (its parameters are gathered only while it runs),
    then the root (what is left: embeddings, heads). mp=False for frozen modules that already hold their dtype.
    cast_root_inputs=False leaves the root's inputs to its caller (rl_gen: SD3's timestep must stay fp32); the
    blocks still cast theirs.

    One process on the CPU has nothing to shard and no mixed precision to apply (mixed_precision: plain fp32), so
    there the module is left as it is, the single-process fallback: FSDP2's hooks would only cost time (a tiny
    critic's training step takes 1.28x as long under them, benchmarks/bench_fsdp_one_process.py). The sharded path
    runs under torchrun, in the 2-process tests too; on one GPU it still runs, for its bf16 compute."""
    from torch.distributed.fsdp import fully_shard
    if device.type == "cpu" and (mesh.size() if mesh is not None else dist.get_world_size()) == 1:
        return root
    kw = {"mesh": mesh} | ({"mp_policy": mixed_precision(device)} if mp else {})
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(root, **kw | ({"mp_policy": mixed_precision(device, cast_root_inputs)} if mp else {}))
    return root


def clone_weights(params):
    return [p.detach().clone() for p in params]


def reshard(model):
    """Drop every gathered (unsharded) copy so the next forward gathers the sharded values just written."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@contextlib.contextmanager
def use_weights(model, params, values):
    """Temporarily load another weight set (old policy, EMA, base) into the trainable parameters."""
    if values is None:
        yield
        return
    saved = clone_weights(params)
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)
    reshard(model)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
        reshard(model)


def _state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def full_weights(model, params, values=None):
    """The unsharded trainable weights {name: cpu tensor} on rank 0 ({} elsewhere); collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    names = {n for n, p in model.named_parameters() if p.requires_grad}  # not the (large, fixed) buffers
    options = _state_dict_options(cpu_offload=True, ignore_frozen_params=True)
    with use_weights(model, params, values):  # clone: on one CPU process the gathered tensors alias the params
        return {k: v.clone() for k, v in get_model_state_dict(model, options=options).items() if k in names}


def load_full_weights(model, params, state):
    """Write a full {name: tensor} into the sharded trainable params; returns a copy of the result."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(model, state, options=_state_dict_options(strict=False))
    reshard(model)
    return clone_weights(params)


def optimizer_state(model, opt):
    """The full optimizer state, flat for safetensors ({"<param fqn>::<key>": cpu tensor}), and its param groups, on
    rank 0 (({}, []) elsewhere: cpu_offload gathers to rank 0 only). Collective. The one format of every checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    osd = get_optimizer_state_dict(model, opt, options=_state_dict_options(cpu_offload=True))
    flat = {f"{fqn}::{k}": v.detach().cpu().contiguous() for fqn, st in osd.get("state", {}).items() for k, v in st.items()}
    return flat, osd.get("param_groups", [])


def set_optimizer_state(model, opt, flat, param_groups, strict=True):
    """The inverse of optimizer_state: every rank keeps its shard. strict=False lets parameters that never got a
    gradient (so have no AdamW state) through."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    nested = {}
    for key, v in flat.items():
        fqn, k = key.rsplit("::", 1)
        nested.setdefault(fqn, {})[k] = v
    set_optimizer_state_dict(model, opt, {"state": nested, "param_groups": param_groups},
                             options=_state_dict_options(strict=strict))


def save_checkpoint(out, model, params, opt, old, ema, step, rank):
    """RL: out/checkpoint/{policy,old,ema,optimizer}.safetensors + state.json, written under checkpoint.tmp and
    swapped in (replace_dir). Collective."""
    sets = {"policy": full_weights(model, params), "old": full_weights(model, params, old),
            "ema": full_weights(model, params, ema)}
    flat, groups = optimizer_state(model, opt)
    if rank == 0:
        tmp, final = Path(out) / "checkpoint.tmp", Path(out) / "checkpoint"
        shutil.rmtree(tmp, ignore_errors=True)
        for name, sd in sets.items():
            save_weights(tmp / f"{name}.safetensors", sd)
        save_weights(tmp / "optimizer.safetensors", flat)
        write_json(tmp / "state.json", {"step": step, "param_groups": groups})  # written last: marks it complete
        replace_dir(tmp, final)
    dist.barrier()  # no rank runs on (and may save again) before the checkpoint is in place


def find_checkpoint(out, rank, marker="state.json"):
    """out/checkpoint when a complete one exists (its `marker` file, written last, is there); after a kill in the
    middle of a save, rank 0 first puts the newest complete copy back in its place (recover_dir). Collective."""
    if rank == 0:
        recover_dir(Path(out) / "checkpoint", marker)
    dist.barrier()  # the other ranks look only after rank 0 has put it back
    ckpt = Path(out) / "checkpoint"
    return ckpt if (ckpt / marker).is_file() else None


def load_checkpoint(ckpt, model, params, opt, strict=True):
    """Every rank reads the full checkpoint and keeps its shard. Returns (step, old, ema)."""
    state = json.loads((ckpt / "state.json").read_text())
    old = load_full_weights(model, params, load_weights(ckpt / "old.safetensors"))
    ema = load_full_weights(model, params, load_weights(ckpt / "ema.safetensors"))
    load_full_weights(model, params, load_weights(ckpt / "policy.safetensors"))  # last: the model holds the policy
    set_optimizer_state(model, opt, load_weights(ckpt / "optimizer.safetensors"), state["param_groups"], strict)
    return state["step"], old, ema


def keep_rows_through(path, step):
    """On resume: drop the rows a killed run logged after its checkpoint's step (the rerun logs them again)."""
    write_jsonl(path, [r for r in read_jsonl_resumable(path) if r["step"] <= step])


# -----------------------------------------------------------------------------
# Hugging Face model directories from FSDP2-sharded models (train_reward.py): save, checkpoint, resume


def hf_config_dtype(path):
    """The dtype a model directory's config.json declares (a fine-tuned copy is saved in it); fp32 if none."""
    from transformers import AutoConfig
    dtype = getattr(AutoConfig.from_pretrained(path), "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def local_param_bytes(model):
    """Bytes of parameters this rank holds (its FSDP shards)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters())


def save_hf_model(model, processor, out, dtype, rank):
    """Gather the full state dict and write a model directory that from_pretrained opens, in `dtype`, on rank 0.
    Collective: the full state dict is all-gathered from the shards, so every rank must call this."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    sd = get_model_state_dict(model, options=_state_dict_options(cpu_offload=True))
    if rank == 0:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        tmp = Path(str(out) + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        # save_pretrained records the dtype of the (fp32 master) parameters; the weights on disk are `dtype`, and
        # from_pretrained / vLLM with dtype "auto" read this field: an 8B critic would otherwise load in fp32 (33 GB)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["dtype"] = str(dtype).removeprefix("torch.")
        write_json(tmp / "config.json", cfg)
        processor.save_pretrained(tmp)
        # `out` may also hold logs and the checkpoint, so the model moves in file by file: config.json goes first and
        # comes back last, so that a folder with a config.json always holds one whole model, even after a kill
        (Path(out) / "config.json").unlink(missing_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
            os.replace(f, Path(out) / f.name)
        tmp.rmdir()


def save_hf_checkpoint(out, model, opt, processor, step, state, rank):
    """out/checkpoint: an fp32 model directory (resume continues from the exact weights) + the optimizer state
    (optimizer_state's format) + trainer_state.json (`state`, step, param groups), written under checkpoint.tmp and
    swapped in (replace_dir). Collective."""
    tmp = Path(out) / "checkpoint.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()  # rank 0 has made the empty folder before any rank writes into it
    save_hf_model(model, processor, tmp, torch.float32, rank)
    flat, groups = optimizer_state(model, opt)
    if rank == 0:
        save_file(flat, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "trainer_state.json", dict(state, step=step, param_groups=groups))  # last: marks it complete
        replace_dir(tmp, Path(out) / "checkpoint")
    dist.barrier()  # no rank runs on (or exits) before the checkpoint is complete on disk


def load_hf_checkpoint(ckpt, model, opt, state):
    """The optimizer state of `ckpt` into opt (its weights were loaded as the model); returns its step. Refuses a
    checkpoint whose `state` (the settings the data order depends on) differs: resuming would change the order."""
    saved = json.loads((ckpt / "trainer_state.json").read_text())
    for k, v in state.items():
        if saved.get(k) != v:
            die(f"--resume: {k} was {saved.get(k)!r} in {ckpt}, now {v!r}; use the same settings or a new --out")
    set_optimizer_state(model, opt, load_file(str(ckpt / "optimizer.safetensors")), saved["param_groups"])
    return saved["step"]


# -----------------------------------------------------------------------------
# per-rank outputs that resume (bench.py): each rank appends each result as it is made; rank 0 merges; outputs are
# kept only while what made them (weights, flags) is unchanged

def fingerprint(path, *extra):
    """What saved outputs depend on: flags/specs (`extra`) and the sizes and times of the weight files at `path`."""
    p, parts = Path(path), [str(path), *extra]
    files = (sorted(p.glob("*.safetensors")) + sorted(p.glob("*/*.safetensors")) + [p / "config.json"] if p.is_dir()
             else [p] if p.is_file() else [])
    parts += [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def start_fresh_if_changed(out, fp, rank, what):
    """Rank 0 clears `out` if its outputs were made by another model or other flags; all ranks wait for it."""
    if rank == 0:
        meta = Path(out) / "run.json"
        if meta.is_file() and json.loads(meta.read_text()).get("fingerprint") != fp:
            print0(f"{what} changed since the saved outputs in {out}: starting over")
            shutil.rmtree(out)
        write_json(meta, {"fingerprint": fp})
    dist.barrier()  # no rank reads or appends to `out` before rank 0 has decided whether to clear it


def read_parts(files, key):
    """key -> record over the files of all ranks (the first record of a key wins; a torn last line is repaired)."""
    out = {}
    for f in files:
        for r in read_jsonl_resumable(f):
            out.setdefault(r[key], r)
    return out


# -----------------------------------------------------------------------------
# RL runs (rl_gen.py, rl_edit.py): per-sample seeds, the step's prompts, this rank's share, gathers, evaluation files.
# Everything a sample gets (prompt, noise, timesteps) is a function of (run seed, step, global index), never of
# the rank: the same run on 1 or 8 GPUs draws the same samples.


def sample_seed(seed, *ids):
    """A 63-bit seed from the run seed and global ids (step, sample index, "eval", ...)."""
    return random.Random(":".join(str(i) for i in (seed, *ids))).getrandbits(63)


def noise_like(shape, seeds, device):
    """One Gaussian tensor of `shape` per seed, stacked (len(seeds), *shape): the same sample gets the same noise
    on any rank and in any batch."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)


def step_prompts(n_prompts, per_step, step, seed):
    """Prompt indices of one RL step: consecutive slices of per-epoch shuffles (every prompt once per epoch)."""
    out, perms = [], {}
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(k, n_prompts)
        if epoch not in perms:
            perms[epoch] = random.Random(f"{seed}:epoch:{epoch}").sample(range(n_prompts), n_prompts)
        out.append(perms[epoch][i])
    return out


def rank_batches(keys, rank, world, size):
    """This rank's micro-batches of the n = len(keys) global samples: its contiguous slice [rank n / world,
    (rank + 1) n / world), grouped by keys[j] (one batch, one tensor shape: e.g. the working size), chunked to
    `size`. Returns [(global indices, real)]: padded with repeats of a batch (real=False) to the largest count over
    the ranks, because every FSDP forward is collective and all ranks must run as many."""
    plans = []
    for r in range(world):
        groups = {}
        for j in range(r * len(keys) // world, (r + 1) * len(keys) // world):
            groups.setdefault(keys[j], []).append(j)
        plans.append([g[i:i + size] for g in groups.values() for i in range(0, len(g), size)])
    mine = plans[rank]
    filler = next((p[0] for p in plans if p), [])  # a rank with no sample of its own repeats another rank's batch
    return [(b, True) for b in mine] + [(mine[0] if mine else filler, False)] * (max(map(len, plans)) - len(mine))


def all_gather_values(values, indices, n, device):
    """Every rank's values (floats or None) at their global indices -> the full list of n on every rank
    (None where no rank had a finite value). A sum-reduce of (value, present): no pickling, NCCL-friendly."""
    buf = torch.zeros(2, n, dtype=torch.float64, device=device)
    for j, v in zip(indices, values, strict=True):
        if v is not None and math.isfinite(v):
            buf[0, j], buf[1, j] = v, 1.0
    dist.all_reduce(buf)  # sync point: every rank needs every reward (group means, the global std)
    return [float(buf[0, j]) if buf[1, j] > 0 else None for j in range(n)]


def mean_or_none(values):
    ok = [v for v in values if v is not None]
    return sum(ok) / len(ok) if ok else None


def add_rl_args(ap, methods, reward="qma", fusions=("qma", "instruction"), rollout_steps=10, eval_steps=40, prompts_per_step=48,
                group_size=16, steps=600, lr=3e-4, eval_every=50, save_every=50):
    """The flags rl_gen.py and rl_edit.py share: one vocabulary, one meaning; each script passes its release's defaults
    (rl_gen: SD3.5-M, DiffusionNFT; rl_edit: FIRM-Reward's editing config). methods: reward.METHODS (common.py
    cannot import reward.py, which imports it)."""
    # reward
    ap.add_argument("--reward", default=reward, choices=fusions, help="fusion of the critic's scores (reward.py)")
    ap.add_argument("--reward-model", default=None, help="the critic (reward.open_critic): a model directory scored in "
                    "process, an OpenAI-compatible endpoint http://host:port/v1[#served name] (key from "
                    "$FIRM_CRITIC_API_KEY), or a Python factory module:name")
    ap.add_argument("--reward-method", default=methods[0], choices=methods,
                    help="greedy answer then parse (paper); 'soft': the same answer, each score its expectation under "
                    "the digit probabilities where the critic wrote it; 'expected': digit probabilities, reasoning skipped")
    ap.add_argument("--reward-batch", type=int, default=16, help="items per critic forward")
    ap.add_argument("--reward-max-new-tokens", type=int, default=None,
                    help="critic answer limit, tokens (default: the release's per-mode limit, reward.MAX_NEW_TOKENS)")
    ap.add_argument("--reward-prompt-file", default=None,
                    help="the critic's scoring templates, JSON {mode: template} (reward.load_prompts), for a critic "
                    "trained on other templates than reward.PROMPTS, e.g. the released FIRM-Edit-8B / FIRM-Gen-8B with the "
                    "release's; not used for --eval-judge")
    # rollout
    ap.add_argument("--prompts-per-step", type=int, default=prompts_per_step, help="prompt groups per RL step, all ranks")
    ap.add_argument("--group-size", type=int, default=group_size, help="samples per prompt (K); need not divide the ranks")
    ap.add_argument("--rollout-steps", type=int, default=rollout_steps, help="ODE sampler steps per rollout")
    ap.add_argument("--micro-batch", type=int, default=8, help="samples per forward, per rank (rollout and training)")
    # DiffusionNFT
    ap.add_argument("--nft-beta", type=float, default=1.0, help="NFT mixing coefficient beta of v+ / v- (NOT the KL weight)")
    ap.add_argument("--kl-weight", type=float, default=1e-4, help="weight of mse(v, v_base), the KL to the frozen base")
    ap.add_argument("--timestep-fraction", type=float, default=0.99, help="trained noise levels per sample = "
                    "int(fraction x rollout steps), >= 1")
    # optimisation
    ap.add_argument("--steps", type=int, default=steps, help="RL steps, one optimizer step each")
    ap.add_argument("--lr", type=float, default=lr, help="AdamW learning rate")
    ap.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    ap.add_argument("--lora-rank", type=int, default=32, help="LoRA rank on the attention projections")
    ap.add_argument("--lora-alpha", type=float, default=64, help="LoRA alpha (scale = alpha / rank)")
    ap.add_argument("--full-finetune", action="store_true", help="train every transformer weight instead of LoRA")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                    help="recompute each transformer block in backward (less memory)")
    # evaluation, checkpoints
    ap.add_argument("--eval-every", type=int, default=eval_every, help="steps between held-out evaluations of the EMA "
                    "weights, also before the first and after the last (0 = never)")
    ap.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts per evaluation (one sample each)")
    ap.add_argument("--eval-steps", type=int, default=eval_steps, help="ODE sampler steps per evaluation sample")
    ap.add_argument("--eval-judge", default=None, help="an independent judge of the held-out samples, any critic spec "
                    "(reward.open_critic), fused as the paper does (QMA / CME)")
    ap.add_argument("--grid-prompts", type=int, default=6, help="held-out prompts in samples_grid.png")
    ap.add_argument("--save-every", type=int, default=save_every, help="steps between checkpoints, and after the last")
    ap.add_argument("--resume", action="store_true", help="continue from --out/checkpoint if it exists")
    ap.add_argument("--stop-after", type=int, default=None, help="testing: exit after this many steps, as if killed")
    ap.add_argument("--seed", type=int, default=0, help="prompt order, noise, trained noise levels, LoRA init")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per rank (0 = torch's default)")


def parse_with_preset(ap, presets, argv=None, required=()):
    """Parse argv with --preset NAME's values as the defaults (flags given explicitly still win); the `required`
    destinations must then be set, by a flag or by the preset."""
    ap.add_argument("--preset", choices=sorted(presets), default=None, help="a named small setting (see PRESETS)")
    pre, _ = ap.parse_known_args(argv)
    if pre.preset:
        ap.set_defaults(**presets[pre.preset])
    args = ap.parse_args(argv)
    for dest in required:
        if not getattr(args, dest):
            ap.error(f"--{dest.replace('_', '-')} is required (or --preset {' / '.join(presets)})")
    return args


def preset_line(args, presets):
    """"preset NAME: k=v, ..." with the values in effect: a flag given beside --preset shows as k=v (preset: p), so a
    log never names the preset's output directory for a run that wrote elsewhere."""
    def shown(k, v):
        now = getattr(args, k)
        return f"{k}={now}" if now == v else f"{k}={now} (preset: {v})"
    return f"preset {args.preset}: " + ", ".join(shown(k, v) for k, v in presets[args.preset].items())


@torch.no_grad()
def evaluate_rl(draw, scorers, keys, step, out, grid_rows, micro_batch, rank, world, device):
    """Held-out evaluation of the weights now in the model, spread over the ranks like a rollout.

    draw(indices) -> PIL images of those held-out prompts (fixed seeds; collective forward passes); scorers:
    {name: score(indices, images) -> values in [0, 1] or None}, each rank scoring its own images; keys: one per
    held-out prompt, as for rank_batches. The first grid_rows images are saved as samples/step{step}_{i}.png (each
    rank writes its own). Returns {"eval_<name>": mean, "eval_<name>_fail": how many got no value}.
    """
    mine, images = [], []
    for b, real in rank_batches(keys, rank, world, micro_batch):
        drawn = draw(b)  # a dummy batch is drawn too: the forward passes are collective
        if real:
            mine, images = mine + b, images + drawn
    for j, im in zip(mine, images):
        if j < grid_rows:
            im.save(Path(out) / "samples" / f"step{step:05d}_{j:03d}.png")
    m = {}
    for name, score in scorers.items():
        values = all_gather_values(score(mine, images), mine, len(keys), device)
        m[f"eval_{name}"] = mean_or_none(values)
        m[f"eval_{name}_fail"] = sum(v is None for v in values)
    return m


def peak_memory_over_ranks(device):
    """(min, max) over the ranks of each rank's peak memory in GiB: the GPU's allocator, or the process's RSS."""
    gb = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30  # Linux ru_maxrss: KiB
    t = torch.tensor([gb, -gb], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # sync point: the log shows the largest and smallest rank
    return round(-float(t[1]), 3), round(float(t[0]), 3)


def reward_stats(rewards):
    """The log's view of a step's gathered rewards: mean, std and how many failed."""
    ok = [x for x in rewards if x is not None]
    mean = mean_or_none(ok)
    return {"reward": mean, "reward_std": (sum((x - mean) ** 2 for x in ok) / len(ok)) ** 0.5 if ok else None,
            "reward_fail": len(rewards) - len(ok)}


def held_out_summary(evals):
    """One line: the held-out numbers of the first and last evaluation (eval.jsonl rows)."""
    if not evals:
        return "no held-out evaluation"
    a, b = evals[0], evals[-1]
    return f"held-out, step {a['step']} -> {b['step']}: " + ", ".join(
        f"{k} {a[k]:.3f} -> {b[k]:.3f}" for k in a if k.startswith("eval_") and isinstance(a[k], float) and isinstance(b.get(k), float))


def rl_sidecar(out, args):
    """What travels with the saved policy: the base model, the run's flags, the first and last held-out evaluation."""
    evals = read_jsonl_resumable(Path(out) / "eval.jsonl")
    return {"base_model": str(args.model), "step": args.steps, "weights": "EMA", "args": vars(args),
            "eval_before": evals[0] if evals else None, "eval_after": evals[-1] if evals else None}


class RLRun:
    """The bookkeeping both RL scripts share, so that their mains show the paper's steps and little else: resume, one
    log line per step, held-out evaluations (eval.jsonl), checkpoints, pictures, --stop-after and the final save."""

    def __init__(self, args, model, params, opt, rank, device, title, n_grid, first_column=None):
        self.args, self.model, self.params, self.opt, self.rank, self.device = args, model, params, opt, rank, device
        self.out, self.title, self.n_grid, self.first_column = Path(args.out), title, n_grid, first_column
        self.log = MetricsLog(self.out / "metrics.jsonl", rank == 0)
        self.elog = MetricsLog(self.out / "eval.jsonl", rank == 0)

    def resume(self, old, ema, strict=True):
        """From out/checkpoint with --resume, else fresh. Returns (start step, old, ema). The logs keep only the rows
        the checkpoint covers (the rerun logs the rest again); a fresh start clears old samples."""
        out, start = self.out, 0
        ckpt = find_checkpoint(out, self.rank) if self.args.resume else None
        if ckpt is not None:
            start, old, ema = load_checkpoint(ckpt, self.model, self.params, self.opt, strict)
            print0(f"resumed from {ckpt} after step {start}")
        if self.rank == 0:
            (out / "samples").mkdir(parents=True, exist_ok=True)
            for name in ("metrics.jsonl", "eval.jsonl"):
                keep_rows_through(out / name, start if ckpt is not None else -1)
            if ckpt is None:
                for p in (out / "samples").glob("*.png"):
                    p.unlink()
        dist.barrier()  # no rank logs or samples before rank 0 has tidied the output directory
        return start, old, ema

    def log_step(self, step, rewards, nft, t0, t1, t2):
        """metrics.jsonl's row of a step: the gathered rewards, the update's numbers, the time of each phase, memory."""
        mem_min, mem_max = peak_memory_over_ranks(self.device)
        self.log.log(step + 1, **reward_stats(rewards), **nft, t_rollout=round(t1 - t0, 3), t_reward=round(t2 - t1, 3),
                     t_train=round(time.time() - t2, 3), mem_gb_min=mem_min, mem_gb_max=mem_max)

    def end_step(self, step, start, old, ema, evaluate):
        """After a step: evaluate and checkpoint when due (and after the last step, so that --resume after the end is
        a no-op). Returns True when --stop-after says to stop here, as if killed."""
        args, done = self.args, step + 1
        if evaluate and (every(done, args.eval_every) or done == args.steps):
            self.elog.log(done, **evaluate(done))
        if every(done, args.save_every) or done == args.steps:
            save_checkpoint(self.out, self.model, self.params, self.opt, old, ema, done, self.rank)
            if self.rank == 0:
                write_rl_pictures(self.out, self.n_grid, self.title, self.first_column)
        if args.stop_after is not None and done >= start + args.stop_after:
            print0(f"stopping after {args.stop_after} steps (--stop-after), as if killed")
            return True
        return False

    def finish(self, save, what):
        """save(sidecar) writes the policy (collective; the sidecar is rank 0's, None elsewhere); rank 0 draws the
        pictures and prints the held-out summary."""
        save(rl_sidecar(self.out, self.args) if self.rank == 0 else None)  # only rank 0 writes the sidecar
        if self.rank == 0:
            write_rl_pictures(self.out, self.n_grid, self.title, self.first_column)
            print0(held_out_summary(read_jsonl_resumable(self.out / "eval.jsonl")))
            print0(f"wrote {self.out}: {what}, metrics.jsonl, eval.jsonl, reward_curve.png, samples_grid.png")


def write_rl_pictures(out, n_rows, title, first_column=None):
    """samples_grid.png (rows: held-out prompts; columns: first_column[i] if given, e.g. the edit's source, then
    the evaluations in step order) and reward_curve.png (training reward; held-out reward and judge)."""
    out = Path(out)
    steps = sorted({int(p.name[4:9]) for p in (out / "samples").glob("step*_*.png")})
    rows = []
    for i in range(n_rows):
        row = ([first_column[i]] if first_column else []) + [
            load_image(f) for s in steps if (f := out / "samples" / f"step{s:05d}_{i:03d}.png").is_file()]
        if row:
            rows.append([im.resize((max(im.width, 96), max(im.height, 96)), Image.NEAREST) for im in row])
    if rows:
        image_grid(rows).save(out / "samples_grid.png")
    train, ev = read_jsonl_resumable(out / "metrics.jsonl"), read_jsonl_resumable(out / "eval.jsonl")
    series = {"train reward": [(r["step"], r["reward"]) for r in train],
              "held-out reward": [(r["step"], r["eval_reward"]) for r in ev],
              "held-out judge": [(r["step"], r.get("eval_judge")) for r in ev]}
    plot_curves(out / "reward_curve.png", {k: v for k, v in series.items() if any(y is not None for _, y in v)},
                title=f"{title}; grid columns: steps {steps}")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# JSONL manifests


class DataError(ValueError):
    """Bad input data; the message names the file, line and field."""


def read_jsonl(path, required=()):
    """Read a JSONL file into a list of dicts; every record must have the `required` fields."""
    return [row for _, row in read_jsonl_lines(path, required)]


def read_jsonl_lines(path, required=()):
    """(line number, record) of a JSONL file: JSON objects, each with the `required` fields, else DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({getattr(e, 'msg', 'nested too deeply')})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for field in required:
                if field not in row:
                    raise DataError(f"{path}:{lineno}: missing field '{field}'")
            rows.append((lineno, row))
    return rows


# Field kinds of read_manifest: (what the error says is expected, test). "?" after a kind: may be absent or null.
def read_records(path):
    """(line number, record) of a JSONL file, or of a JSON list (line = index + 1)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        return read_jsonl_lines(path)
    try:
        rows = list(enumerate(json.loads(text), 1))
    except (json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{path}: not a valid JSON list ({getattr(e, 'msg', 'nested too deeply')})") from None
    for n, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {n}: expected a JSON object, got {type(row).__name__}")
    return rows


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


FIELD_KINDS = {
    "id": ("a string or integer id", lambda v: isinstance(v, str) and v != "" or isinstance(v, int) and not isinstance(v, bool)),
    "text": ("a non-empty string", lambda v: isinstance(v, str) and v.strip() != ""),
    "str": ("a string", lambda v: isinstance(v, str)),
    "number": ("a finite number", _finite),
    "scores": ("a finite number or a non-empty list of them", lambda v: _finite(v) or isinstance(v, list) and v != []
               and all(map(_finite, v))),
    "dict": ("a JSON object", lambda v: isinstance(v, dict)),
    "list": ("a JSON list", lambda v: isinstance(v, list)),
    "image": ("an image path (a non-empty string)", lambda v: isinstance(v, str) and v.strip() != ""),
    "images": ("a list of image paths (strings)", lambda v: isinstance(v, list) and all(isinstance(p, str) and p.strip()
                                                                                         for p in v)),
}


def read_manifest(path, fields, unique="id", base=None, bound=None, images="exist", allow_empty=False, lines=False):
    """The records of a JSONL manifest, all checked before any work starts: a long run must not stop (or pay a
    judge again) at record 9000 over record 9000's typo. Raises DataError naming file, line and field.

    fields: {name: kind}, kinds in FIELD_KINDS ("text", "number", "image", ...); a kind ending in "?" may be absent
        or null. Extra fields pass unchecked.
    unique: the field that must not repeat where it is given (None: no check). allow_empty: an empty file is fine.
    lines=True: (line number, record) pairs, for the caller's own checks to name the line too.
    Image fields: paths relative to `base` (default: the manifest's folder) or absolute. images="exist": every image
        must exist; "decode": and decode (a corrupt PNG is found now, not after hours of work); "unchecked": the
        caller checks them itself.
        A manifest may name images outside its dataset, the folder `bound` (default: base): an absolute path, or ".."
        leading out. Image stores are often shared, so this is allowed; but a manifest from elsewhere can name any
        file on the machine (and a remote judge would be sent it), so such paths are counted and printed.
    """
    path = Path(path)
    base = Path(base) if base is not None else path.parent
    bound = Path(bound) if bound is not None else base
    rows, seen, paths = [], {}, []
    for lineno, row in read_jsonl_lines(path):
        where = f"{path}:{lineno}"
        named = [(name, image) for name, kind in fields.items() for image in check_field(row, name, kind, where)]
        for name, image in named:  # after every field's type: a missing field is named before a missing image
            if images != "unchecked":
                check_image(base / image, images == "decode", f"{where}: field '{name}'")
            paths.append(base / image)
        if unique is not None and row.get(unique) is not None:
            key = str(row.get(unique))
            if key in seen:
                raise DataError(f"{where}: field '{unique}': duplicate {row.get(unique)!r} (first on line {seen[key]})")
            seen[key] = lineno
        rows.append((lineno, row) if lines else row)
    if not rows and not allow_empty:
        raise DataError(f"{path}: no records")
    note_outside(path, paths, bound)
    return rows


def check_field(row, name, kind, where):
    """DataError unless row[name] is of `kind` (FIELD_KINDS; "?" = may be absent or null). Returns the image paths
    it holds (kinds "image" / "images"), [] otherwise."""
    optional, kind = kind.endswith("?"), kind.rstrip("?")
    value = row.get(name)
    if value is None:
        if optional:
            return []
        raise DataError(f"{where}: missing field '{name}'" if name not in row else f"{where}: field '{name}' is null")
    expected, ok = FIELD_KINDS[kind]
    if not ok(value):
        raise DataError(f"{where}: field '{name}' must be {expected}, got {_show(value)}")
    return [value] if kind == "image" else value if kind == "images" else []


def _show(value):
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return f"{type(value).__name__} {text[:60]}"


def note_outside(manifest, images, bound):
    """Count and print the image paths that lead outside the folder `bound` (absolute, or '..' leading out)."""
    inside = os.path.normpath(os.path.abspath(bound)) + os.sep
    outside = [p for p in images if not os.path.normpath(os.path.abspath(p)).startswith(inside)]
    if outside:
        print0(f"note: {manifest}: {len(outside)} image path(s) lead outside {bound}, e.g. {str(outside[0])!r}")
    return len(outside)


def check_image(path, decode, where):
    """DataError (starting with `where`) unless the image file exists and, with decode=True, its structure and checksums
    are intact (PIL's verify, without decoding the pixels)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{where}: image {path} not found")
    if decode:
        try:
            with Image.open(path) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{where}: image {path} cannot be read ({e})") from None


def write_jsonl(path, rows):
    """Write atomically (temp file + rename) so a killed run never leaves half a manifest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def append_jsonl(path, row):
    """Append one record and flush: the unit of progress for resumable loops."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()


def read_jsonl_resumable(path):
    """The records of a JSONL that a killed run may have been appending to (append_jsonl), to resume from.

    Only the LAST line can be torn by a kill (no newline after it, not valid JSON): it is cut off and reported.
    A bad line anywhere else is damage, not an interrupted write: DataError naming file and line, and the file is
    left exactly as it is (resuming would judge, and pay for, everything after it again).
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")  # the last element: what follows the last newline ("" for a complete file)
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            if lineno == len(lines):  # torn: a write that the kill interrupted
                with open(path, "r+b") as f:
                    f.truncate(len(data) - len(line))
                print(f"note: {path}: dropped a torn last line ({len(line)} bytes, an interrupted write)", flush=True)
                break
            raise DataError(f"{path}:{lineno}: not valid JSON; the file is left as it is: repair or remove that line "
                            "(only a torn last line, an interrupted write, is dropped on resume)") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    else:
        if lines[-1].strip():  # a complete last record without its newline: the next append must not join it
            with open(path, "ab") as f:
                f.write(b"\n")
    return rows


# -----------------------------------------------------------------------------
# directories written whole: under a temporary name, renamed when complete


def replace_dir(tmp, final):
    """Put the complete directory `tmp` in place of `final`: final -> final.old, tmp -> final, then drop final.old.
    A kill at any moment leaves a complete copy under one of the three names; recover_dir puts it back."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final, marker):
    """After a kill while saving: make `final` the newest complete copy (one holding `marker`, the file written last)
    of final.tmp, final, final.old. Returns final, or None when there is no complete copy. Rank 0 only."""
    final = Path(final)
    tmp, old = (final.with_name(final.name + s) for s in (".tmp", ".old"))
    if (tmp / marker).is_file():  # complete but not yet in place: killed after writing it, it is the newest
        replace_dir(tmp, final)
    if (old / marker).is_file() and not (final / marker).is_file():  # killed between the two renames of a swap
        shutil.rmtree(final, ignore_errors=True)
        os.replace(old, final)
    return final if (final / marker).is_file() else None


def check_model_dir(path, what="--model", marker="config.json"):
    """A local model directory, checked: paths are never taken for hub ids (no silent download, no hub error)."""
    path = Path(path)
    if not (path / marker).is_file():
        raise DataError(f"{what} {path}: " + ("no such directory" if not path.exists() else f"not a model directory "
                        f"(no {marker})") + "; models are local directories (download hub checkpoints first)")
    return path


# -----------------------------------------------------------------------------
# images


def load_image(path, base=None):
    """Open an image as RGB; a missing or corrupt file raises DataError naming it."""
    path = Path(base) / path if base is not None else Path(path)
    if not path.is_file():
        raise DataError(f"image {path} not found")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"image {path} cannot be read ({e})") from None


def image_grid(rows, pad=2, bg=(255, 255, 255)):
    """Paste a list of rows of PIL images into one picture (rows may have different lengths)."""
    w = max(im.width for row in rows for im in row)
    h = max(im.height for row in rows for im in row)
    ncol = max(len(row) for row in rows)
    grid = Image.new("RGB", (ncol * (w + pad) + pad, len(rows) * (h + pad) + pad), bg)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def tensor_to_pil(x):
    """(3, H, W) tensor in [-1, 1] -> PIL image."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(x)


def pil_to_tensor(im):
    """PIL image -> (3, H, W) float tensor in [-1, 1]."""
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


# -----------------------------------------------------------------------------
# weights + sidecars, metrics


def save_weights(path, tensors, sidecar=None):
    """safetensors file + `<path>.json` sidecar (args, step, metrics, base model). Never pickle."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    if sidecar is not None:
        write_json(path.with_suffix(".json"), sidecar)


def save_diffusers_model(out_dir, model, state_dict, dtype, max_shard_size="5GB"):
    """A diffusers model folder that from_pretrained opens: `model`'s config + the full `state_dict` in `dtype`
    (the base checkpoint's, not the fp32 master weights: a 20B transformer is 40 GB, not 80), in safetensors
    shards of at most max_shard_size with diffusers' index file. Written under a temporary name, then renamed."""
    from huggingface_hub import split_torch_state_dict_into_shards
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_config(tmp)
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
    split = split_torch_state_dict_into_shards(sd, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: sd[n] for n in names}, str(tmp / filename))
    if split.is_sharded:
        write_json(tmp / "diffusion_pytorch_model.safetensors.index.json",
                   {"metadata": split.metadata, "weight_map": split.tensor_to_filename})
    replace_dir(tmp, out_dir)


def save_lora_files(pipeline_cls, out_dir, lora, metadata, sidecar):
    """A diffusers LoRA in out_dir (pytorch_lora_weights.safetensors, which pipe.load_lora_weights(out_dir) reads,
    + a .json sidecar). out_dir also holds the run's logs, so the files are written in a temporary folder and moved
    in, the weights last: where they are, they are whole."""
    out_dir = Path(out_dir)
    tmp = out_dir / "lora.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline_cls.save_lora_weights(tmp, transformer_lora_layers=lora, transformer_lora_adapter_metadata=metadata)
    write_json(tmp / "pytorch_lora_weights.json", sidecar)
    for name in ("pytorch_lora_weights.json", "pytorch_lora_weights.safetensors"):
        os.replace(tmp / name, out_dir / name)
    shutil.rmtree(tmp)


def load_weights(path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: weights file not found")
    return load_file(str(path))


def write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class MetricsLog:
    """One fixed-format line per step on stdout and the same numbers appended to metrics.jsonl."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled, self.t0 = Path(path), enabled, time.time()

    def log(self, step, **metrics):
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time() - self.t0, 2), **metrics}
        append_jsonl(self.path, row)
        parts = [f"step {step:5d}"] + [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
        print(" | ".join(parts), flush=True)


def plot_curves(path, series, title="", xlabel="step"):
    """Line plot to PNG with PIL only. `series` maps a label to a list of (x, y) points."""
    W, H, L, R, T, B = 640, 400, 60, 150, 30, 40
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    pts = [p for s in series.values() for p in s if p[1] is not None and math.isfinite(p[1])]
    if not pts:
        d.text((L, H // 2), "no data", fill="black")
        im.save(path)
        return
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)
    sx = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)
    sy = lambda y: H - B - (y - y0) / (y1 - y0) * (H - T - B)
    d.rectangle([L, T, W - R, H - B], outline="black")
    for i in range(5):  # y ticks
        y = y0 + (y1 - y0) * i / 4
        d.line([L - 4, sy(y), L, sy(y)], fill="black")
        d.text((4, sy(y) - 6), f"{y:.3g}", fill="black")
    d.text((L, H - B + 8), f"{x0:g}", fill="black")
    d.text((W - R - 30, H - B + 8), f"{x1:g}", fill="black")
    d.text(((W - R) // 2, H - 16), xlabel, fill="black")
    d.text((L, 8), title, fill="black")
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    for i, (label, s) in enumerate(series.items()):
        s = [p for p in s if p[1] is not None and math.isfinite(p[1])]
        color = palette[i % len(palette)]
        if len(s) > 1:
            d.line([(sx(x), sy(y)) for x, y in s], fill=color, width=2)
        elif s:
            d.ellipse([sx(s[0][0]) - 2, sy(s[0][1]) - 2, sx(s[0][0]) + 2, sy(s[0][1]) + 2], fill=color)
        d.text((W - R + 8, T + 16 * i), label, fill=color)
    im.save(path)


def confusion_png(path, title, conf):
    """Panels of human (rows) x predicted (columns, last = no score); shade = share of the row."""
    c, pad = 30, 40
    im = Image.new("RGB", (len(conf) * (6 * c + 2 * pad) + pad, 5 * c + 3 * pad), "white")
    d = ImageDraw.Draw(im)
    d.text((pad, 6), title + "   (rows: human 1-5, columns: predicted 1-5, x = no score)", fill="black")
    for k, (split, m) in enumerate(conf.items()):
        x0, y0 = pad + k * (6 * c + 2 * pad), 2 * pad
        d.text((x0, y0 - 16), split, fill="black")
        for col in range(6):
            d.text((x0 + col * c + 11, y0 + 5 * c + 4), "x" if col == 5 else str(col + 1), fill="black")
        for r in range(5):
            d.text((x0 - 12, y0 + r * c + 9), str(r + 1), fill="black")
            for col in range(6):
                share = m[r][col] / max(1, sum(m[r]))  # no score in red, scores in blue
                shade = (255, int(255 - 180 * share), int(255 - 180 * share)) if col == 5 else \
                        (int(255 - 200 * share), int(255 - 140 * share), 255)
                box = [x0 + col * c, y0 + r * c, x0 + (col + 1) * c - 1, y0 + (r + 1) * c - 1]
                d.rectangle(box, fill=shade, outline=(0, 160, 0) if col == r else (200, 200, 200))
                d.text((box[0] + 4, box[1] + 9), str(m[r][col]), fill="black")
    im.save(path)


def die(msg, code=2):
    """Exit with a message for the user (bad arguments, missing inputs), not a traceback."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def run_stage(main, *args):
    """A stage's entry point: bad input (DataError, whose message names file, line and field) ends the run with
    that message and exit status 2, not a traceback."""
    try:
        main(*args)
    except DataError as e:
        die(str(e))
