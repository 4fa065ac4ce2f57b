"""Plumbing shared by every stage; nothing here is in the paper.

Process group (a world of one without torchrun), seeding, JSONL manifests that fail with
file:line:field, images that fail with the file name, safetensors + JSON sidecars, the
one-line-per-step metrics log and a dependency-free line plot for reward/loss curves.
"""

import contextlib
import datetime
import json
import math
import os
import random
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


def setup_dist():
    """Join torchrun's process group, or make a world of one. Returns (rank, world, device).

    Without torchrun we still create a (single-process) group so that FSDP2 and the
    collectives run exactly as they do on many GPUs: the tested path is the real path.
    """
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
        dist.barrier()
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
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for field in required:
                if field not in row:
                    raise DataError(f"{path}:{lineno}: missing field '{field}'")
            rows.append(row)
    return rows


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
    """Records of a partly written JSONL; a torn last line (killed mid-write) is dropped and truncated."""
    path = Path(path)
    if not path.is_file():
        return []
    rows, good_bytes = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
                good_bytes += len(line)
            except json.JSONDecodeError:
                break
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return rows


# -----------------------------------------------------------------------------
# images


def load_image(path, base=None):
    """Open an image as RGB; a missing or corrupt file raises DataError naming it."""
    path = Path(base) / path if base is not None else Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


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
    import shutil
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
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


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


def die(msg, code=2):
    """Exit with a message for the user (bad arguments, missing inputs), not a traceback."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)
