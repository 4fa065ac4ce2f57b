"""Critic SFT (FIRM Sec 4.1): fine-tune an image-text-to-text model into a reward model (critic).

Plain next-token SFT on the curated records written by curate.py: the input is the image(s) plus
the scoring prompt (WITHOUT the difference report / analysis plan the teacher saw), the target is
the teacher's answer (reasoning, then the score). The loss covers the answer tokens only. The same
script trains the edit critic (execution + consistency records, original image first) and the gen
critic (instruction + quality records); only the data differs.

    python curate.py                                        # miniature data + tiny Qwen3-VL base
    python train_reward.py --preset mini --task vlm         # the base learns to see -> runs/mini/models/vlm-base
    python train_reward.py --preset mini --task edit        # -> runs/mini/models/edit-critic
    python train_reward.py --preset mini --task gen         # -> runs/mini/models/gen-critic
    python train_reward.py --preset mini --task edit --ablation direct   # critic on directly judged labels
    torchrun --standalone --nproc_per_node=2 train_reward.py --preset mini --task edit   # same run, 2 ranks
    torchrun --standalone --nproc_per_node=8 train_reward.py --model /ckpt/Qwen3-VL-8B-Instruct \\
        --train-file data/sft/edit_train.jsonl --val-file data/sft/edit_val.jsonl --out ckpt/edit-critic

Defaults are the paper's (FIRM-Edit-8B model card: lr 1e-5, cosine, warmup 0.1, 1 epoch, per-device
batch 10 x 2 accumulation x 8 GPUs = global batch 160, LLaMA-Factory's grad clip 1.0 and no weight
decay). Preset "mini" changes only what must differ for a randomly initialised 1 M-parameter critic
on one CPU core; every value it sets is printed at start and listed in PRESETS below. A random-init
critic trained on judging alone learns the label prior and invents what it "sees"; so in the miniature
world the base arrives with a vision tower pre-trained on the world (toy.pretrain_vision, run by
curate.py, as a real Qwen3-VL's vision encoder arrives pre-trained), the same script then trains it on
questions about the images (--task vlm: describe, what changed, what is asked; written by curate.py),
and the critics start from that.

Output (--out): a model directory that AutoModelForImageTextToText / AutoProcessor open directly
(safetensors, in the base model's dtype), train_reward.json (args, step, data, eval loss, val MAE),
metrics.jsonl (one row per step), loss.png. While training, --out/checkpoint holds the latest
checkpoint (model dir + full optimizer state as safetensors + trainer_state.json); --resume continues
from it with the identical data order, so a killed run loses only the steps since its last save.

Departures from the paper (which used LLaMA-Factory + DeepSpeed):
  1. Hand-written FSDP2: fully_shard on each decoder layer, on the vision tower, then on the root.
     Only rank 0 reads the checkpoint; the other ranks build an empty skeleton and receive their shards
     by broadcast (one host copy per node, not one per rank).
  2. The loss is the mean over ALL answer tokens of the global batch (sum / token count, counted
     across ranks and micro-batches), so 1 rank and N ranks give the same curve for the same global
     batch. LLaMA-Factory averages per micro-batch first, weighting short answers more.
  3. Warmup starts at lr/warmup_steps instead of 0 (the first step is not wasted).
  4. The target is the answer followed by the tokenizer's end-of-turn token; the prompt is exactly
     what the critic sees at inference (chat template with the generation prompt), so training and
     reward.py's inference see identical prompt tokens.
"""

import argparse
import json
import math
import os
import shutil
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh

from common import (DataError, MetricsLog, check_model_dir, cleanup_dist, die, every, fill_from_rank0, fsdp_shard,
                    full_state_of, keep_rows_through, load_image, load_on_rank0, optimizer_state, plot_curves, print0,
                    read_jsonl_resumable, read_manifest, recover_dir, replace_dir, run_stage, seed_everything,
                    set_optimizer_state, setup_dist, write_json, write_jsonl)
from reward import IMAGE, N_SCORES, content_parts, parse_score

# Qwen3-VL returns its per-image features as views; FSDP2 warns in case they are modified in place.
# We read only .logits, out of place.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

# -----------------------------------------------------------------------------
# CLI. A preset sets defaults; any flag given explicitly still wins.

PRESETS = {
    # The miniature world: a 1 M-parameter Qwen3-VL (built by curate.py: random language model, vision tower
    # pre-trained on the world) first learns to describe the world's images (--task vlm), then to judge from
    # the reasoning in its targets. One epoch each
    # on one CPU core. Measured: lr 1e-3 beats 2e-3 and 3e-3; a global batch of 4 needs ~2.5x fewer samples than
    # 16 for the same progress at about the same cost per sample (a random-init model is far below its critical
    # batch size). The micro-batch is the global batch split over the ranks (no accumulation). Epochs per task:
    # the edit critic, which must compare two images, gets four (validation execution MAE 1.83 at 1 epoch and 1.63
    # at 2 on older data; 1.29 at 4 against 1.43 for the constant; its consistency MAE 0.59 against 1.02). The gen critic gets
    # two: one epoch gave bench MAE 1.17 from one seeing-stage base and 1.60 (worse than the constant's 1.41) from
    # another; two epochs from the second gave 1.13 (three: the same as two on validation).
    "mini": dict(model=None, data_dir="runs/mini/data/sft", out_root="runs/mini/models",
                 lr=1e-3, warmup_ratio=0.05, epochs=None, max_steps=None, global_batch=4, micro_batch=None,
                 weight_decay=0.0, eval_every=500, save_every=500, val_generate=100, threads=1),
}
MINI_EPOCHS = {"vlm": 1.0, "edit": 4.0, "gen": 2.0}


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="FIRM critic SFT (Sec 4.1)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="named defaults for a CPU run (see PRESETS)")
    # data and model
    ap.add_argument("--model", default=None, help="base model directory (Qwen3-VL / Qwen2.5-VL, or the tiny critic base)")
    ap.add_argument("--train-file", default=None, help="SFT JSONL {id, mode, score, images, messages} from curate.py")
    ap.add_argument("--val-file", default=None, help="held-out SFT JSONL for the eval loss and val MAE")
    ap.add_argument("--out", default=None, help="output model directory")
    ap.add_argument("--task", choices=["vlm", "edit", "gen"], default=None,
                    help="preset only: which model (picks data, base and --out); 'vlm' teaches the random-init base to see first")
    ap.add_argument("--ablation", choices=["none", "direct"], default="none",
                    help="preset only: 'direct' trains on the labels judged WITHOUT report/plan (curation ablation)")
    ap.add_argument("--data-dir", default=None, help="preset only: directory of {task}[_direct]_{train,val}.jsonl")
    ap.add_argument("--out-root", default=None, help="preset only: parent of the output model directory")
    ap.add_argument("--skip-bad-records", action="store_true",
                    help="drop records with missing images / empty answers (reported with their ids) instead of stopping")
    # optimisation (paper defaults)
    ap.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    ap.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup, fraction of all steps")
    ap.add_argument("--epochs", type=float, default=1.0, help="passes over the training set")
    ap.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    ap.add_argument("--global-batch", type=int, default=160, help="samples per optimizer step, all ranks together")
    ap.add_argument("--micro-batch", type=int, default=10,
                    help="samples per forward pass on one rank; accumulation fills the global batch (None in a preset: "
                         "the global batch split over the ranks)")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    ap.add_argument("--activation-checkpointing", action="store_true", help="recompute decoder activations in backward (saves memory)")
    ap.add_argument("--seed", type=int, default=42, help="data order and init seed")
    # evaluation, logging, checkpoints
    ap.add_argument("--eval-every", type=int, default=500, help="steps between held-out eval losses, and after the last (0 = after the last only)")
    ap.add_argument("--eval-batch", type=int, default=16, help="samples per eval forward pass on one rank")
    ap.add_argument("--val-generate", type=int, default=64, help="val records greedily decoded at the end for MAE / parse failures (0 = skip)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="tokens per decoded val answer")
    ap.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (--out/checkpoint; 0 = never: the final model only)")
    ap.add_argument("--resume", action="store_true", help="continue from --out/checkpoint if it exists")
    ap.add_argument("--stop-after", type=int, default=None, help="testing: exit after this many steps as if killed (no final save)")
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader processes decoding images")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank (default: torch's choice)")
    pre, _ = ap.parse_known_args(argv)
    if pre.preset:
        ap.set_defaults(**PRESETS[pre.preset])
    args = ap.parse_args(argv)
    if args.preset:
        if not args.task:
            ap.error("--preset needs --task vlm|edit|gen")
        name = args.task + ("_direct" if args.ablation == "direct" else "")
        args.epochs = args.epochs or MINI_EPOCHS[args.task]
        args.train_file = args.train_file or f"{args.data_dir}/{name}_train.jsonl"
        args.val_file = args.val_file or f"{args.data_dir}/{name}_val.jsonl"
        if args.task == "vlm":  # random init -> a base that describes images; the critics start from it
            args.model = args.model or f"{args.out_root}/critic-base"
            args.out = args.out or f"{args.out_root}/vlm-base"
            args.val_generate = 0  # its answers are descriptions, not scores
        else:
            args.model = args.model or f"{args.out_root}/vlm-base"
            args.out = args.out or f"{args.out_root}/{args.task}-critic" + ("-direct" if args.ablation == "direct" else "")
    for flag in ("model", "train_file", "out"):
        if not getattr(args, flag):
            ap.error(f"--{flag.replace('_', '-')} is required (or use --preset mini --task edit|gen)")
    return args


# -----------------------------------------------------------------------------
# data: SFT records -> (prompt tokens, answer tokens, images)


def load_records(path, skip_bad=False):
    """Read and check an SFT file up front (common.read_manifest: JSON, field types, unique ids, finite scores; here:
    the conversation and that every image exists), so a bad record stops the run at once, named by file, line and
    field. --skip-bad-records drops (and counts) records whose conversation or images do not fit, instead."""
    path = Path(path)
    # curate.py writes sft/ beside the edit/ and gen/ image folders: the dataset is the folder above the SFT file
    rows = read_manifest(path, {"id": "id", "images": "images", "messages": "list", "mode": "str?", "score": "scores?"},
                         bound=path.parent.parent, images="unchecked", lines=True)
    problems, keep = [], []
    for lineno, r in rows:
        msgs = r["messages"]
        if (len(msgs) != 2 or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs)
                or msgs[0].get("role") != "user" or msgs[1].get("role") != "assistant"):
            problem = "field 'messages' must be [user, assistant] turns with string contents"
        elif not msgs[1]["content"].strip():
            problem = "field 'messages': empty assistant answer"
        elif msgs[0]["content"].count(IMAGE) != len(r["images"]):
            problem = f"field 'messages': {msgs[0]['content'].count(IMAGE)} {IMAGE} placeholders for {len(r['images'])} images"
        elif missing := [p for p in r["images"] if not (path.parent / p).is_file()]:
            problem = f"field 'images': image {path.parent / missing[0]} not found"
        else:
            keep.append(dict(r, _where=f"{path}:{lineno}"))  # for an image that fails to decode mid-run
            continue
        problems.append(f"{path}:{lineno}: {problem} (id {r['id']!r})")
    if problems:
        msg = f"{len(problems)} bad record(s) in {path}:\n  " + "\n  ".join(problems[:20])
        if not skip_bad:
            raise DataError(msg + "\n(fix the data, or pass --skip-bad-records to drop them)")
        print0("warning: dropping " + msg)
    return keep


def chat_prompt(processor, user_turn):
    """A record's user turn ("...<image><image>...", curate.py) -> the chat-template prompt text, generation
    prompt included. reward.Critic builds the same text at inference, so training and scoring see the same tokens."""
    return processor.apply_chat_template([{"role": "user", "content": content_parts(user_turn)}],
                                         add_generation_prompt=True, tokenize=False)


def make_labels(input_ids, n_prompt):
    """SFT labels: the answer tokens; everything before them (prompt, image tokens) is -100."""
    labels = input_ids.clone()
    labels[:n_prompt] = -100
    return labels


def encode(record, processor, root):
    """One record -> token ids, labels, image tensors. Prompt = chat template + generation prompt."""
    try:
        images = [load_image(p, root) for p in record["images"]]
    except DataError as e:
        raise DataError(f"{record.get('_where', 'record ' + repr(record['id']))}: field 'images': {e}") from None
    user, answer = record["messages"][0]["content"], record["messages"][1]["content"]
    prompt = chat_prompt(processor, user)
    enc = processor(text=[prompt], images=images or None, return_tensors="pt")
    tok = processor.tokenizer
    answer_ids = torch.tensor(tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"])
    prompt_ids = enc.pop("input_ids")[0]
    enc.pop("attention_mask")
    input_ids = torch.cat([prompt_ids, answer_ids])
    sample = {"input_ids": input_ids, "labels": make_labels(input_ids, len(prompt_ids))}
    if "mm_token_type_ids" in enc:  # Qwen3-VL: which tokens are image tokens (for its 3D rope)
        sample["mm_token_type_ids"] = torch.cat([enc.pop("mm_token_type_ids")[0], torch.zeros_like(answer_ids)])
    sample.update(enc)  # pixel_values (n_patches, d), image_grid_thw (n_images, 3)
    return sample


def collate(samples, pad_id):
    """Right-pad a list of encoded samples into one batch; padding is masked out of attention and loss."""
    B, L = len(samples), max(len(s["input_ids"]) for s in samples)
    batch = {"input_ids": torch.full((B, L), pad_id), "labels": torch.full((B, L), -100),
             "attention_mask": torch.zeros(B, L, dtype=torch.long)}
    if any("mm_token_type_ids" in s for s in samples):
        batch["mm_token_type_ids"] = torch.zeros(B, L, dtype=torch.int32)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        for k in ("input_ids", "labels", "mm_token_type_ids"):
            if k in s:
                batch[k][i, :n] = s[k]
        batch["attention_mask"][i, :n] = 1
    for k in ("pixel_values", "image_grid_thw"):  # images of all samples, in sample order (text-only ones have none)
        if any(k in s for s in samples):
            batch[k] = torch.cat([s[k] for s in samples if k in s])
    return batch


class SFTData(torch.utils.data.Dataset):
    def __init__(self, records, processor, root):
        self.records, self.processor, self.root = records, processor, root

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return encode(self.records[i], self.processor, self.root)


def step_indices(step, n_train, global_batch, seed):
    """The global batch of optimizer step `step`: a slice of a per-epoch permutation of the data.

    A pure function of (step, data size, batch, seed): the same for any world size and after a resume.
    """
    per_epoch = n_train // global_batch  # the incomplete last batch of an epoch is dropped
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[k * global_batch:(k + 1) * global_batch].tolist()


class StepSampler:
    """Yields this rank's micro-batches for steps start..total-1 (rank r takes every world-th sample)."""

    def __init__(self, start, total, n_train, args, rank, world):
        self.start, self.total, self.n, self.args, self.rank, self.world = start, total, n_train, args, rank, world

    def __iter__(self):
        for step in range(self.start, self.total):
            mine = step_indices(step, self.n, self.args.global_batch, self.args.seed)[self.rank::self.world]
            for j in range(0, len(mine), self.args.micro_batch):
                yield mine[j:j + self.args.micro_batch]

    def __len__(self):
        return (self.total - self.start) * self.args.global_batch // (self.world * self.args.micro_batch)


# -----------------------------------------------------------------------------
# the objective and the schedule


def answer_positions(labels):
    """(B, L) bool: positions whose NEXT token is an answer token (the logits the loss needs)."""
    return F.pad(labels[:, 1:] != -100, (0, 1), value=False)


def sft_loss(logits, labels, keep):
    """Summed next-token cross-entropy over answer tokens: -sum_t log p(y_t | images, prompt, y_<t).

    logits: (n_keep, V) at the `keep` positions (or (B, L, V) for all positions); labels: (B, L).
    Returns the SUM; the caller divides by the global answer-token count.
    """
    if logits.dim() == 3:
        logits = logits[keep]
    targets = labels[:, 1:][keep[:, :-1]]
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def forward_loss(model, batch):
    """Model forward computing logits only where the loss needs them (answers are short, prompts long)."""
    labels = batch["labels"]
    keep = answer_positions(labels)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (n_keep, V)
    return sft_loss(logits, labels, keep), int(keep.sum())


def lr_at(step, total, warmup, peak):
    """Linear warmup to `peak`, then cosine decay to 0 at `total` (the paper's cosine schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# model: load, shard (FSDP2), save


def load_base(path, rank):
    """(model, processor, dtype of the checkpoint). Only rank 0 reads the weights (common.load_on_rank0); they reach
    the other ranks' shards in shard(). fp32 master weights; on GPU the FSDP mixed-precision policy computes in bf16."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    check_model_dir(path)  # a local directory, never a hub download
    processor = AutoProcessor.from_pretrained(path)
    if processor.tokenizer.chat_template is None and getattr(processor, "chat_template", None):
        processor.tokenizer.chat_template = processor.chat_template
    config = AutoConfig.from_pretrained(path)
    save_dtype = getattr(config, "dtype", None) or torch.float32
    save_dtype = getattr(torch, save_dtype) if isinstance(save_dtype, str) else save_dtype
    model = load_on_rank0(lambda: AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32),
                          lambda: AutoModelForImageTextToText.from_config(config, dtype=torch.float32), rank)
    return model, processor, save_dtype


def shard(model, device, world):
    """FSDP2 as in torchtitan: each decoder layer, the vision tower, then the root (embeddings, head); then rank 0's
    weights are broadcast into every rank's shards."""
    full = full_state_of(model, dist.get_rank())
    mesh = init_device_mesh(device.type, (world,))
    fsdp_shard(model, [*model.model.language_model.layers, model.model.visual], device, mesh)
    fill_from_rank0(model, full, device)
    return model


def local_param_bytes(model):
    """Bytes of parameters this rank holds (its FSDP shards)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters())


def save_model(model, processor, out, save_dtype, rank):
    """Gather the full state dict (all ranks take part) and write an HF model directory on rank 0."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        sd = {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in sd.items()}
        tmp = Path(str(out) + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        # save_pretrained records the dtype of the (fp32 master) parameters; the weights on disk are save_dtype, and
        # from_pretrained / vLLM with dtype "auto" read this field: an 8B critic would otherwise load in fp32 (33 GB)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["dtype"] = str(save_dtype).removeprefix("torch.")
        write_json(tmp / "config.json", cfg)
        processor.save_pretrained(tmp)
        # --out also holds logs and the checkpoint, so the model moves in file by file: config.json goes first and
        # comes back last, so that a folder with a config.json always holds one whole model, even after a kill
        (Path(out) / "config.json").unlink(missing_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
            os.replace(f, Path(out) / f.name)
        tmp.rmdir()


def save_checkpoint(model, opt, processor, out, step, state, save_dtype, rank):
    """out/checkpoint: model dir + full optimizer state (safetensors) + trainer_state.json. Atomic swap."""
    ckpt, tmp = Path(out) / "checkpoint", Path(out) / "checkpoint.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    save_model(model, processor, tmp, torch.float32, rank)  # fp32: resume continues from the exact weights
    flat, groups = optimizer_state(model, opt)
    if rank == 0:
        save_file(flat, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "trainer_state.json", dict(state, step=step, param_groups=groups))  # last: marks it complete
        replace_dir(tmp, ckpt)
    dist.barrier()


def load_optimizer(model, opt, ckpt):
    state = json.loads((ckpt / "trainer_state.json").read_text())
    set_optimizer_state(model, opt, load_file(str(ckpt / "optimizer.safetensors")), state["param_groups"])


# -----------------------------------------------------------------------------
# evaluation: held-out loss (all ranks), greedy answers -> MAE (rank 0, on the saved model)


@torch.no_grad()
def eval_loss(model, data, pad_id, args, rank, world, device):
    """Mean answer-token loss over the val set. Every rank runs the same number of forwards (FSDP)."""
    model.eval()
    n, per_round = len(data), world * args.eval_batch
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, answer tokens) on the device: NCCL
    for start in range(0, n, per_round):
        idx = list(range(start + rank * args.eval_batch, min(start + (rank + 1) * args.eval_batch, n)))
        batch = collate([data[i] for i in (idx or [0])], pad_id)  # an idle rank still joins the forward
        loss, k = forward_loss(model, {k: v.to(device) for k, v in batch.items()})
        if idx:
            total += torch.tensor([loss.item(), k], dtype=torch.float64, device=device)
    dist.all_reduce(total)  # sync point: the val loss is a mean over every rank's answer tokens
    model.train()
    return (total[0] / total[1]).item()


@torch.no_grad()
def greedy_answers(model, processor, records, root, batch_size, max_new_tokens):
    """Greedy decoding of each record's prompt (left padding, KV cache), like the critic at inference."""
    tok = processor.tokenizer
    tok.padding_side, answers = "left", []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        prompts = [chat_prompt(processor, r["messages"][0]["content"]) for r in chunk]
        images = [[load_image(p, root) for p in r["images"]] for r in chunk]
        batch = processor(text=prompts, images=images if any(images) else None, padding=True, return_tensors="pt")
        out = model.generate(**batch.to(model.device), max_new_tokens=max_new_tokens, do_sample=False)
        answers += tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    tok.padding_side = "right"
    return answers


def val_mae(saved, records, root, train_records, args):
    """Val MAE per mode vs the constant predictor (training-set mean score, rounded), parse failures."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(saved, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(saved)
    answers = greedy_answers(model, processor, records, root, args.eval_batch, args.max_new_tokens)
    totals = defaultdict(list)
    for r in train_records:
        totals[r["mode"]].append(r["score"] if isinstance(r["score"], list) else [r["score"]])
    constant = {m: [round(sum(col) / len(col)) for col in zip(*rows)] for m, rows in totals.items()}
    result = defaultdict(lambda: {"n": 0, "parse_failures": 0, "abs_err": 0.0, "const_abs_err": 0.0})
    for r, text in zip(records, answers):
        m, truth = r["mode"], (r["score"] if isinstance(r["score"], list) else [r["score"]])
        res = result[m]
        res["n"] += 1
        parsed = parse_score(text, N_SCORES.get(m, len(truth)), m)
        if not parsed.ok:
            res["parse_failures"] += 1
            continue
        res["abs_err"] += sum(abs(a - b) for a, b in zip(parsed.scores, truth)) / len(truth)
        res["const_abs_err"] += sum(abs(a - b) for a, b in zip(constant.get(m, [3] * len(truth)), truth)) / len(truth)
    out = {}
    for m, res in sorted(result.items()):
        ok = res["n"] - res["parse_failures"]
        out[m] = {"n": res["n"], "parse_failures": res["parse_failures"], "mae": res["abs_err"] / max(ok, 1),
                  "constant_mae": res["const_abs_err"] / max(ok, 1), "constant": constant.get(m)}
    return out, answers


# -----------------------------------------------------------------------------


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_dist()
    seed_everything(args.seed)
    out = Path(args.out)
    t_start = time.time()

    # ---- data
    train_records = load_records(args.train_file, args.skip_bad_records)
    val_records = load_records(args.val_file, args.skip_bad_records) if args.val_file else []
    if args.micro_batch is None:
        args.micro_batch = max(1, args.global_batch // world)
    if args.global_batch % (world * args.micro_batch):
        die(f"--global-batch {args.global_batch} must be a multiple of world size x --micro-batch = {world} x {args.micro_batch}")
    accum = args.global_batch // (world * args.micro_batch)
    per_epoch = len(train_records) // args.global_batch
    if per_epoch == 0:
        die(f"{args.train_file}: {len(train_records)} records, fewer than one global batch ({args.global_batch})")
    total = args.max_steps or max(1, int(args.epochs * per_epoch))
    warmup = int(args.warmup_ratio * total)

    # ---- model (resume: the checkpoint directory is itself a model directory)
    ckpt = out / "checkpoint"
    if args.resume and rank == 0:  # a kill in the middle of a save: put the newest complete copy back in its place
        recover_dir(ckpt, "trainer_state.json")
    dist.barrier()
    resume = args.resume and (ckpt / "trainer_state.json").is_file()
    model, processor, save_dtype = load_base(ckpt if resume else args.model, rank)
    if resume:  # the checkpoint is fp32; the final model keeps the BASE model's dtype
        from transformers import AutoConfig
        save_dtype = getattr(AutoConfig.from_pretrained(args.model), "dtype", None) or torch.float32
    model.config.use_cache = False
    if args.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in model.parameters())
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model = shard(model, device, world)
    model.train()
    # optimizer AFTER sharding: it must hold the sharded (DTensor) parameters
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    start = 0
    state = {"train_file": str(args.train_file), "n_train": len(train_records), "global_batch": args.global_batch,
             "seed": args.seed, "total_steps": total}
    if resume:
        saved = json.loads((ckpt / "trainer_state.json").read_text())
        for k, v in state.items():  # the data order depends on these: refuse to silently change it
            if saved.get(k) != v:
                die(f"--resume: {k} was {saved.get(k)!r} in {ckpt}, now {v!r}; use the same settings or a new --out")
        load_optimizer(model, opt, ckpt)
        start = saved["step"]
    pad_id = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else processor.tokenizer.eos_token_id

    # ---- say what will happen, once
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path = out / "metrics.jsonl"
        if resume:  # drop rows logged after the checkpoint: the rerun logs them again
            keep_rows_through(metrics_path, start)
        elif metrics_path.exists():
            metrics_path.unlink()
    if args.preset:
        print0(f"preset {args.preset}: " + ", ".join(f"{k}={v}" for k, v in PRESETS[args.preset].items()))
    print0(f"model {args.model}: {n_params / 1e6:.2f} M params; parameters per rank {local_param_bytes(model) / 2**20:.2f} MiB "
           f"of {full_bytes / 2**20:.2f} MiB (world {world}, device {device})")
    print0(f"train {len(train_records)} records ({args.train_file}), val {len(val_records)}; {total} steps of "
           f"{args.global_batch} samples = {world} ranks x {args.micro_batch} x {accum} accumulation; "
           f"{per_epoch} steps per epoch; warmup {warmup} steps; lr {args.lr:g} cosine -> 0")
    if resume:
        print0(f"resuming from {ckpt} at step {start}")

    # ---- training loop
    train_set = SFTData(train_records, processor, Path(args.train_file).parent)
    val_set = SFTData(val_records, processor, Path(args.val_file).parent) if val_records else None
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=StepSampler(start, total, len(train_records), args, rank, world),
                                         collate_fn=lambda s: collate(s, pad_id), num_workers=args.num_workers)
    batches = iter(loader)
    log = MetricsLog(out / "metrics.jsonl", enabled=rank == 0)
    losses = [(r["step"], r["loss"]) for r in read_jsonl_resumable(out / "metrics.jsonl") if "loss" in r] if rank == 0 else []
    val_losses = [(r["step"], r["val_loss"]) for r in read_jsonl_resumable(out / "metrics.jsonl") if "val_loss" in r] if rank == 0 else []
    last_val = None
    t0 = time.time()
    for step in range(start, total):
        lr = lr_at(step, total, warmup, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        micro = [next(batches) for _ in range(accum)]
        # the loss is a mean over the answer tokens of the WHOLE global batch (all ranks, all micro-batches)
        n_tok = torch.tensor(float(sum(int(answer_positions(b["labels"]).sum()) for b in micro)), device=device)
        dist.all_reduce(n_tok)  # sync point: every rank normalises by the global answer-token count
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for b in micro:
            loss, _ = forward_loss(model, {k: v.to(device) for k, v in b.items()})
            # FSDP averages gradients over ranks, so scale by world to get d(sum / n_tok)
            (loss * world / n_tok).backward()
            loss_sum += loss.detach().double()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.all_reduce(loss_sum)
        train_loss = (loss_sum / n_tok.double()).item()
        done = step + 1
        metrics = {"loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                   "samples_per_s": round(args.global_batch * (done - start) / (time.time() - t0), 2)}
        if val_set is not None and (every(done, args.eval_every) or done == total):
            last_val = metrics["val_loss"] = eval_loss(model, val_set, pad_id, args, rank, world, device)
            val_losses.append((done, last_val))
        log.log(done, **metrics)
        losses.append((done, train_loss))
        if every(done, args.save_every) and done < total:
            save_checkpoint(model, opt, processor, out, done, state, save_dtype, rank)
            if rank == 0:
                plot_curves(out / "loss.png", {"train loss": losses, "val loss": val_losses}, title=f"critic SFT: {out.name}")
        if args.stop_after and done >= args.stop_after:
            print0(f"--stop-after {args.stop_after}: stopping as if killed (last checkpoint is kept)")
            cleanup_dist()
            return

    # ---- save: the model directory, then its sidecar, curve and a quick val MAE on rank 0
    save_model(model, processor, out, save_dtype, rank)
    summary = {"args": vars(args), "step": total, "base_model": str(args.model), "world_size": world,
               "data": {"train": str(args.train_file), "n_train": len(train_records), "val": str(args.val_file),
                        "n_val": len(val_records)},
               "eval_loss": last_val, "train_loss": losses[-1][1] if losses else None,
               "param_bytes_per_rank": local_param_bytes(model), "param_bytes_full": full_bytes,
               "train_seconds": round(time.time() - t0, 1)}
    if rank == 0:
        plot_curves(out / "loss.png", {"train loss": losses, "val loss": val_losses}, title=f"critic SFT: {out.name}")
        if args.val_generate and val_records:
            t1 = time.time()
            subset = val_records[:args.val_generate]
            maes, answers = val_mae(out, subset, Path(args.val_file).parent, train_records, args)
            summary["val_mae"] = maes
            write_jsonl(out / "val_answers.jsonl", [{"id": r["id"], "score": r["score"], "answer": a} for r, a in zip(subset, answers)])
            for m, v in maes.items():
                print(f"val {m:<12} n={v['n']:<4} MAE {v['mae']:.3f} (constant {v['constant']}: {v['constant_mae']:.3f}), "
                      f"parse failures {v['parse_failures']}")
            print(f"val decoding took {time.time() - t1:.1f} s")
        summary["seconds"] = round(time.time() - t_start, 1)
        write_json(out / "train_reward.json", summary)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)  # the finished model replaces it
        print(f"saved {out} ({summary['seconds']} s)")
    cleanup_dist()


if __name__ == "__main__":
    run_stage(main, get_args())
