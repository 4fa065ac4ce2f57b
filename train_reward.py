"""Critic SFT (FIRM Sec 4.1): fine-tune an image-text-to-text model into a reward model (critic).

Plain next-token SFT on the curated records written by curate.py: the input is the image(s) plus the scoring
prompt (WITHOUT the difference report / analysis plan the teacher saw), the target is the teacher's answer
(reasoning, then the score); the loss covers the answer tokens only. The same script trains the edit critic
(execution + consistency records, original image first) and the gen critic (instruction + quality records).

    torchrun --standalone --nproc_per_node=8 train_reward.py --model /ckpt/Qwen3-VL-8B-Instruct \\
        --train-file data/sft/edit_train.jsonl --val-file data/sft/edit_val.jsonl --out ckpt/edit-critic
    python train_reward.py --preset mini-vlm           # miniature world (see README): the tiny base learns to see
    python train_reward.py --preset mini-edit          # -> runs/mini/models/edit-critic (mini-gen: gen-critic)
    python train_reward.py --preset mini-edit-direct   # curation ablation: labels judged without report / plan
    torchrun --standalone --nproc_per_node=2 train_reward.py --preset mini-edit   # the same run on 2 ranks

Defaults are the paper's (FIRM-Edit-8B model card: lr 1e-5, cosine, warmup 0.1, 1 epoch, per-device batch
10 x 2 accumulation x 8 GPUs = global batch 160) and those of LLaMA-Factory, which trained it: grad clip 1.0, no weight
decay, the vision tower and its mergers (the projector) frozen, images within 768^2 pixels (reward.critic_image, as
the critic is scored), activation checkpointing. A preset
names one run of the miniature world; all of them are in PRESETS below, the one in use is printed at start, and
flags given explicitly win over it.

Output (--out): a model directory (safetensors, in the base model's dtype) that AutoModelForImageTextToText opens,
train_reward.json (args, step, data, eval loss, val MAE), metrics.jsonl (one row per step), loss.png. --out/checkpoint
holds the latest checkpoint while training; --resume continues from it with the identical data order.

Departures from the paper (which used LLaMA-Factory + DeepSpeed):
  1. Hand-written FSDP2: fully_shard on each decoder layer, on the vision tower, then on the root. Only rank 0
     reads the checkpoint; the other ranks build an empty skeleton and receive their shards by broadcast.
  2. The loss is the mean over ALL answer tokens of the global batch (sum / token count, counted across ranks
     and micro-batches), so 1 rank and N ranks give the same curve for the same global batch: what transformers'
     Trainer, under LLaMA-Factory, computes with average_tokens_across_devices (older versions: per micro-batch).
     No record is cut (LLaMA-Factory: cutoff_len 2048 tokens by default).
  3. Warmup starts at lr/warmup_steps instead of 0 (the first step is not wasted).
  4. The target is the answer followed by the tokenizer's end-of-turn token; the prompt is exactly what the
     critic sees at inference (chat template with the generation prompt), as reward.py builds it.
"""

import argparse
import math
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from common import (DataError, MetricsLog, check_model_dir, cleanup_dist, die, every, fill_from_rank0, find_checkpoint,
                    fsdp_shard, full_state_of, hf_config_dtype, keep_rows_through, load_hf_checkpoint, load_image,
                    load_on_rank0, local_param_bytes, parse_with_preset, plot_curves, preset_line, print0,
                    read_jsonl_resumable, read_manifest, run_stage, save_hf_checkpoint, save_hf_model, seed_everything,
                    setup_dist, write_json, write_jsonl)
from reward import IMAGE, N_SCORES, content_parts, critic_image, parse_score

# Qwen3-VL returns its per-image features as views; FSDP2 warns in case they are modified in place. We read only .logits.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

# -----------------------------------------------------------------------------
# CLI: defaults are the paper's; a preset names one whole run of the miniature world.
# The miniature world (toy/, run_mini.sh): a 1 M-parameter Qwen3-VL critic base whose vision tower is pre-trained on
# the world. Trained on judging alone it would learn the label prior, so mini-vlm first teaches it to answer questions
# about the world's images and the critics start from that; -direct is the curation ablation (labels judged WITHOUT
# report / plan). lr, batch and epochs were measured on one CPU core (NOTES.md); micro_batch None = global batch / ranks.
# mini-vlm's answers are descriptions, not scores: no val MAE (val_generate 0).
# The tiny critic trains its vision tower too (the miniature figures were measured so) and needs no checkpointing.
MINI = dict(lr=1e-3, warmup_ratio=0.05, global_batch=4, micro_batch=None, weight_decay=0.0, eval_every=500,
            save_every=500, val_generate=100, threads=1, freeze_vision=False, activation_checkpointing=False)
PRESETS = {
    "mini-vlm": dict(MINI, model="runs/mini/models/critic-base", out="runs/mini/models/vlm-base", epochs=1.0, val_generate=0,
                     train_file="runs/mini/data/sft/vlm_train.jsonl", val_file="runs/mini/data/sft/vlm_val.jsonl"),
    "mini-edit": dict(MINI, model="runs/mini/models/vlm-base", out="runs/mini/models/edit-critic", epochs=4.0,
                      train_file="runs/mini/data/sft/edit_train.jsonl", val_file="runs/mini/data/sft/edit_val.jsonl"),
    "mini-gen": dict(MINI, model="runs/mini/models/vlm-base", out="runs/mini/models/gen-critic", epochs=2.0,
                     train_file="runs/mini/data/sft/gen_train.jsonl", val_file="runs/mini/data/sft/gen_val.jsonl"),
    "mini-edit-direct": dict(MINI, model="runs/mini/models/vlm-base", out="runs/mini/models/edit-critic-direct", epochs=4.0,
                             train_file="runs/mini/data/sft/edit_direct_train.jsonl",
                             val_file="runs/mini/data/sft/edit_direct_val.jsonl"),
    "mini-gen-direct": dict(MINI, model="runs/mini/models/vlm-base", out="runs/mini/models/gen-critic-direct", epochs=2.0,
                            train_file="runs/mini/data/sft/gen_direct_train.jsonl",
                            val_file="runs/mini/data/sft/gen_direct_val.jsonl"),
}


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="FIRM critic SFT (Sec 4.1)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Data and model
    ap.add_argument("--model", default=None, help="base model directory (Qwen3-VL / Qwen2.5-VL, or the tiny critic base)")
    ap.add_argument("--train-file", default=None, help="SFT JSONL {id, mode, score, images, messages} from curate.py")
    ap.add_argument("--val-file", default=None, help="held-out SFT JSONL for the eval loss and val MAE")
    ap.add_argument("--out", default=None, help="output model directory")
    ap.add_argument("--skip-bad-records", action="store_true", help="drop bad records (reported with their ids) instead of stopping")
    # Optimisation (the paper's values)
    ap.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    ap.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup, fraction of all steps")
    ap.add_argument("--epochs", type=float, default=1.0, help="passes over the training set")
    ap.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    ap.add_argument("--global-batch", type=int, default=160, help="samples per optimizer step, all ranks together")
    ap.add_argument("--micro-batch", type=int, default=10, help="samples per forward pass on one rank; accumulation fills the global batch")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    ap.add_argument("--seed", type=int, default=42, help="data order and init seed")
    ap.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=True,
                    help="keep the vision tower and its merger (the projector) frozen, as LLaMA-Factory does by default")
    # Evaluation, logging, checkpoints (in optimizer steps)
    ap.add_argument("--eval-every", type=int, default=500, help="steps between held-out eval losses, and after the last (0 = after the last only)")
    ap.add_argument("--eval-batch", type=int, default=16, help="samples per eval forward pass on one rank")
    ap.add_argument("--val-generate", type=int, default=64, help="val records greedily decoded at the end for MAE / parse failures (0 = skip)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="tokens per decoded val answer")
    ap.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (--out/checkpoint; 0 = never: the final model only)")
    ap.add_argument("--resume", action="store_true", help="continue from --out/checkpoint if it exists")
    ap.add_argument("--stop-after", type=int, default=None, help="testing: exit after this many steps as if killed (no final save)")
    # Runtime
    ap.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="recompute decoder activations in backward (saves memory; LLaMA-Factory's default)")
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader processes decoding images")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank (default: torch's choice)")
    return parse_with_preset(ap, PRESETS, argv, required=("model", "train_file", "out"))


# -----------------------------------------------------------------------------
# Data: SFT records -> (prompt tokens, answer tokens, images) -> right-padded batches, in a fixed order


def load_records(path, skip_bad=False):
    """An SFT file, checked up front (common.read_manifest: JSON, types, unique ids, finite scores; here: the conversation
    and that every image exists): a bad record stops the run at once, named by file, line and field (or is dropped)."""
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


def encode(record, processor, root):
    """One record -> {input_ids (L,), labels (L,) (make_labels), image tensors}: the prompt, then the answer."""
    try:
        images = [critic_image(load_image(p, root)) for p in record["images"]]
    except DataError as e:
        raise DataError(f"{record.get('_where', 'record ' + repr(record['id']))}: field 'images': {e}") from None
    enc = processor(text=[chat_prompt(processor, record["messages"][0]["content"])], images=images or None, return_tensors="pt")
    enc.pop("attention_mask")
    tok, answer = processor.tokenizer, record["messages"][1]["content"]
    answer_ids = torch.tensor(tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"])  # (A,)
    prompt_ids = enc.pop("input_ids")[0]  # (P,): text and image-placeholder tokens
    input_ids = torch.cat([prompt_ids, answer_ids])  # (L,) = (P + A,)
    sample = {"input_ids": input_ids, "labels": make_labels(input_ids, len(prompt_ids))}
    if "mm_token_type_ids" in enc:  # Qwen3-VL: which tokens are image tokens (for its 3D rope); (P,) -> (L,)
        sample["mm_token_type_ids"] = torch.cat([enc.pop("mm_token_type_ids")[0], torch.zeros_like(answer_ids)])
    sample.update(enc)  # pixel_values (n_patches, d), image_grid_thw (n_images, 3)
    return sample


def collate(samples, pad_id):
    """Right-pad encoded samples into one batch; padding is masked out of attention (mask 0) and loss (label IGNORE)."""
    B, L = len(samples), max(len(s["input_ids"]) for s in samples)
    batch = {"input_ids": torch.full((B, L), pad_id), "labels": torch.full((B, L), IGNORE),
             "attention_mask": torch.zeros(B, L, dtype=torch.long)}
    if any("mm_token_type_ids" in s for s in samples):
        batch["mm_token_type_ids"] = torch.zeros(B, L, dtype=torch.int32)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        for k in ("input_ids", "labels", "mm_token_type_ids"):
            if k in s:
                batch[k][i, :n] = s[k]  # (n,) into row i of (B, L)
        batch["attention_mask"][i, :n] = 1
    for k in ("pixel_values", "image_grid_thw"):  # all samples' images in sample order: (sum n_patches, d), (sum n_images, 3)
        if any(k in s for s in samples):
            batch[k] = torch.cat([s[k] for s in samples if k in s])
    return batch


def step_indices(step, n_train, global_batch, seed):
    """The record indices of optimizer step `step`'s global batch: a slice of a per-epoch permutation of the data.
    A pure function of (step, data size, batch, seed): the same for any world size and after a resume."""
    per_epoch = n_train // global_batch  # the incomplete last batch of an epoch is dropped
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[k * global_batch:(k + 1) * global_batch].tolist()


def rank_batches(start, total, n_train, args, rank, world):
    """This rank's micro-batches of record indices for steps start..total-1 (rank r: every world-th sample)."""
    for step in range(start, total):
        mine = step_indices(step, n_train, args.global_batch, args.seed)[rank::world]
        for j in range(0, len(mine), args.micro_batch):
            yield mine[j:j + args.micro_batch]


# -----------------------------------------------------------------------------
# The SFT objective (Sec 4.1), in the order it is computed: labels (prompt masked) -> answer positions -> summed
# answer-token loss -> one step's gradient, normalised by the GLOBAL answer-token count (departure 2).

IGNORE = -100  # the label of a token the loss skips (prompt, image tokens, padding): cross_entropy's ignore_index


def make_labels(input_ids, n_prompt):
    """(L,) token ids -> (L,) labels: each answer token is its own target; the n_prompt tokens before it are IGNORE."""
    labels = input_ids.clone()
    labels[:n_prompt] = IGNORE
    return labels


def answer_positions(labels):
    """(B, L) labels -> (B, L) bool: positions whose NEXT token is an answer token, the only logits the loss needs."""
    return F.pad(labels[:, 1:] != IGNORE, (0, 1), value=False)  # (B, L-1) shifted by one, padded back to (B, L)


def sft_loss(logits, labels, keep):
    """Summed next-token cross-entropy over the answer tokens: -sum_t log p(y_t | images, prompt, y_<t). logits: (n_keep, V)
    at the `keep` positions (answer_positions(labels)), labels: (B, L). A SUM: sft_step divides by the global count."""
    targets = labels[:, 1:][keep[:, :-1]]  # (n_keep,): the token after each kept position, in the same order
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def forward_loss(model, batch):
    """(summed answer-token loss, answer-token count) of one batch. Logits only at the answer positions
    (logits_to_keep): answers are short and prompts long, and (B, L, V) logits would dominate memory."""
    labels = batch["labels"]  # (B, L)
    keep = answer_positions(labels)  # (B, L) bool
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (n_keep, V): the kept positions, flattened
    return sft_loss(logits, labels, keep), int(keep.sum())


def sft_step(model, micro, world, device):
    """Backward of one optimizer step: the gradient of (sum of answer-token losses) / (answer tokens) over the
    GLOBAL batch, i.e. all ranks' micro-batches. Returns that mean loss (the same number on every rank), for the log."""
    # this rank's answer tokens, all its micro-batches together: a float scalar
    n_tok = torch.tensor(float(sum(int(answer_positions(b["labels"]).sum()) for b in micro)), device=device)
    # sync point: every rank must divide by the same GLOBAL count, or a token on a rank with short answers would weigh
    # more than one on a rank with long answers (and 1 rank and N ranks would train differently)
    dist.all_reduce(n_tok)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for b in micro:
        loss, _ = forward_loss(model, {k: v.to(device) for k, v in b.items()})  # summed over this micro-batch
        # FSDP2 averages gradients over the ranks (their sum / world) in each backward's reduce-scatter, so scaling
        # by world makes the accumulated gradient exactly d(global sum / n_tok)
        (loss * world / n_tok).backward()
        loss_sum += loss.detach().double()
    # sync point: the logged loss is the global sum over the global count, so rank 0 logs the whole batch's loss
    dist.all_reduce(loss_sum)
    return (loss_sum / n_tok.double()).item()


def lr_at(step, total, warmup, peak):
    """Linear warmup to `peak`, then cosine decay to 0 at `total` (the paper's cosine schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# Model: load, shard (FSDP2); saving and checkpoints are common.save_hf_model / save_hf_checkpoint


def load_base(path, rank, activation_checkpointing=False):
    """(model in train mode, processor). Only rank 0 reads the weights (common.load_on_rank0); they reach the other
    ranks' shards in shard(). fp32 master weights; on GPU the FSDP mixed-precision policy computes in bf16."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    check_model_dir(path)  # a local directory, never a hub download
    processor = AutoProcessor.from_pretrained(path)
    if processor.tokenizer.chat_template is None and getattr(processor, "chat_template", None):
        processor.tokenizer.chat_template = processor.chat_template
    config = AutoConfig.from_pretrained(path)
    model = load_on_rank0(lambda: AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32),
                          lambda: AutoModelForImageTextToText.from_config(config, dtype=torch.float32), rank)
    model.config.use_cache = False
    if activation_checkpointing:  # recompute each decoder layer's activations in backward
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), processor


def shard(model, device, world):
    """FSDP2 as in torchtitan: each decoder layer, the vision tower, then the root (embeddings, head); then rank 0's
    weights are broadcast into every rank's shards (a collective: every rank calls it at the same point)."""
    full = full_state_of(model, dist.get_rank())
    mesh = init_device_mesh(device.type, (world,))
    fsdp_shard(model, [*model.model.language_model.layers, model.model.visual], device, mesh)
    fill_from_rank0(model, full, device)
    return model


# -----------------------------------------------------------------------------
# Evaluation: held-out loss (all ranks); greedy answers -> MAE (rank 0, on the saved model)


@torch.no_grad()
def eval_loss(model, processor, records, pad_id, args, rank, world, device):
    """Mean answer-token loss over the val set. Every rank runs the same number of forwards (FSDP)."""
    model.eval()
    n, per_round, root = len(records), world * args.eval_batch, Path(args.val_file).parent
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, answer tokens) on the device: NCCL
    for start in range(0, n, per_round):
        idx = list(range(start + rank * args.eval_batch, min(start + (rank + 1) * args.eval_batch, n)))
        # an idle rank still runs a forward: FSDP2 all-gathers each layer's weights, and every rank must join in
        batch = collate([encode(records[i], processor, root) for i in (idx or [0])], pad_id)
        loss, k = forward_loss(model, {k: v.to(device) for k, v in batch.items()})
        if idx:
            total += torch.tensor([loss.item(), k], dtype=torch.float64, device=device)
    dist.all_reduce(total)  # sync point: the val loss is a mean over every rank's answer tokens
    model.train()
    return (total[0] / total[1]).item()


@torch.no_grad()
def val_mae(saved, records, train_records, args):
    """Greedy answers of the saved critic to `records` (left padding, KV cache, as at inference); per mode: n, parse
    failures, the MAE of the scores that parsed and that of the constant predictor (the training set's mean score
    per mode, rounded; 3 for a mode it lacks). Writes val_answers.jsonl beside the model."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(saved, dtype=dtype).to(device).eval()
    processor, root, answers = AutoProcessor.from_pretrained(saved), Path(args.val_file).parent, []
    processor.tokenizer.padding_side = "left"  # every row's last position is its last prompt token
    for i in range(0, len(records), args.eval_batch):
        chunk = records[i:i + args.eval_batch]
        images = [[critic_image(load_image(p, root)) for p in r["images"]] for r in chunk]
        batch = processor(text=[chat_prompt(processor, r["messages"][0]["content"]) for r in chunk],
                          images=images if any(images) else None, padding=True, return_tensors="pt").to(device)
        new = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)[:, batch["input_ids"].shape[1]:]
        answers += processor.tokenizer.batch_decode(new, skip_special_tokens=True)  # new: (B, <= max_new_tokens)
    write_jsonl(Path(saved) / "val_answers.jsonl", [{"id": r["id"], "score": r["score"], "answer": a}
                                                    for r, a in zip(records, answers)])
    truth = [r["score"] if isinstance(r["score"], list) else [r["score"]] for r in records]  # a lone score may be bare
    out = {}
    for m in sorted({r["mode"] for r in records}):
        train = [r["score"] if isinstance(r["score"], list) else [r["score"]] for r in train_records if r["mode"] == m]
        constant = [round(sum(col) / len(col)) for col in zip(*train)] if train else None
        mine = [(t, parse_score(a, N_SCORES.get(m, len(t)), m)) for r, t, a in zip(records, truth, answers) if r["mode"] == m]
        ok = [(t, p.scores) for t, p in mine if p.ok]

        def mae(pred):  # mean over the parsed answers of the mean absolute error over the mode's scores
            return sum(sum(abs(a - b) for a, b in zip(pred(t, s), t)) / len(t) for t, s in ok) / max(len(ok), 1)
        out[m] = {"n": len(mine), "parse_failures": len(mine) - len(ok), "mae": mae(lambda t, s: s),
                  "constant_mae": mae(lambda t, s: constant or [3] * len(t)), "constant": constant}
        print(f"val {m:<12} n={len(mine):<4} MAE {out[m]['mae']:.3f} (constant {constant}: {out[m]['constant_mae']:.3f}), "
              f"parse failures {out[m]['parse_failures']}")
    return out


# -----------------------------------------------------------------------------


def main(args):
    # Setup: the process group (a world of one without torchrun), seeds, threads
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_dist()
    seed_everything(args.seed)
    said = preset_line(args, PRESETS) if args.preset else None  # the flags as given, before any is derived below
    out, t_start = Path(args.out), time.time()
    ckpt = out / "checkpoint"  # the latest checkpoint, while training

    # Data: every record checked before any work; step -> samples is fixed by (step, data size, global batch, seed)
    train_records = load_records(args.train_file, args.skip_bad_records)
    val_records = load_records(args.val_file, args.skip_bad_records) if args.val_file else []
    if args.micro_batch is None:
        args.micro_batch = max(1, args.global_batch // world)
    if args.global_batch % (world * args.micro_batch):
        die(f"--global-batch {args.global_batch} must be a multiple of world size x --micro-batch = {world} x {args.micro_batch}")
    accum = args.global_batch // (world * args.micro_batch)  # micro-batches per rank per optimizer step
    per_epoch = len(train_records) // args.global_batch
    if per_epoch == 0:
        die(f"{args.train_file}: {len(train_records)} records, fewer than one global batch ({args.global_batch})")
    total = args.max_steps or max(1, int(args.epochs * per_epoch))
    warmup = int(args.warmup_ratio * total)

    # Model: rank 0 reads the weights, FSDP2 shards them (departure 1). A checkpoint is itself a model directory.
    resume = args.resume and find_checkpoint(out, rank, "trainer_state.json") is not None  # after a kill mid-save too
    model, processor = load_base(ckpt if resume else args.model, rank, args.activation_checkpointing)
    model.model.visual.requires_grad_(not args.freeze_vision)
    save_dtype = hf_config_dtype(args.model)  # the final model keeps the BASE model's dtype (a checkpoint is fp32)
    n_params, full_bytes = sum(p.numel() for p in model.parameters()), sum(p.numel() * p.element_size() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model = shard(model, device, world)
    pad_id = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else processor.tokenizer.eos_token_id

    # Optimizer (lr 1e-5, no weight decay in the paper) AFTER sharding: it must hold the sharded (DTensor) parameters
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    state = {"train_file": str(args.train_file), "n_train": len(train_records), "global_batch": args.global_batch,
             "seed": args.seed, "total_steps": total,  # the data order depends on these: a resume must not change them
             "freeze_vision": args.freeze_vision}  # and the optimizer's parameters on this
    start = load_hf_checkpoint(ckpt, model, opt, state) if resume else 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if resume:  # drop rows logged after the checkpoint: the rerun logs them again
            keep_rows_through(out / "metrics.jsonl", start)
        else:
            (out / "metrics.jsonl").unlink(missing_ok=True)

    # Say what will happen, once
    if said:
        print0(said)
    print0(f"model {args.model}: {n_params / 1e6:.2f} M params, {n_trained / 1e6:.2f} M trained"
           f"{' (vision tower frozen)' if args.freeze_vision else ''}; parameters per rank {local_param_bytes(model) / 2**20:.2f} MiB "
           f"of {full_bytes / 2**20:.2f} MiB (world {world}, device {device})")
    print0(f"train {len(train_records)} records ({args.train_file}), val {len(val_records)}; {total} steps of "
           f"{args.global_batch} samples = {world} ranks x {args.micro_batch} x {accum} accumulation; "
           f"{per_epoch} steps per epoch; warmup {warmup} steps; lr {args.lr:g} cosine -> 0")
    if resume:
        print0(f"resuming from {ckpt} at step {start}")

    # Loop: one optimizer step per global batch, each rank's share in `accum` micro-batches
    root = Path(args.train_file).parent  # image paths are relative to the SFT file
    batches = iter(torch.utils.data.DataLoader(  # records -> encoded, padded batches (in workers if --num-workers)
        train_records, batch_sampler=rank_batches(start, total, len(train_records), args, rank, world),
        collate_fn=lambda recs: collate([encode(r, processor, root) for r in recs], pad_id), num_workers=args.num_workers))
    log = MetricsLog(out / "metrics.jsonl", enabled=rank == 0)
    rows = read_jsonl_resumable(out / "metrics.jsonl") if rank == 0 else []  # the rows kept from before a resume
    curves = {"train loss": [(r["step"], r["loss"]) for r in rows if "loss" in r],
              "val loss": [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]}
    last_val, t0 = None, time.time()
    for step in range(start, total):
        lr = lr_at(step, total, warmup, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        train_loss = sft_step(model, [next(batches) for _ in range(accum)], world, device)
        # the norm of the WHOLE gradient: each rank holds a shard, so the sharded norms are combined across ranks
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        metrics = {"loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                   "samples_per_s": round(args.global_batch * (done - start) / (time.time() - t0), 2)}
        if val_records and (every(done, args.eval_every) or done == total):
            last_val = metrics["val_loss"] = eval_loss(model, processor, val_records, pad_id, args, rank, world, device)
            curves["val loss"].append((done, last_val))
        log.log(done, **metrics)
        curves["train loss"].append((done, train_loss))
        if every(done, args.save_every) and done < total:
            save_hf_checkpoint(out, model, opt, processor, done, state, rank)
            if rank == 0:
                plot_curves(out / "loss.png", curves, title=f"critic SFT: {out.name}")
        if args.stop_after and done >= args.stop_after:
            print0(f"--stop-after {args.stop_after}: stopping as if killed (last checkpoint is kept)")
            cleanup_dist()
            return

    # Save: the model directory (all ranks gather), then on rank 0 its sidecar, the curve and a quick val MAE
    save_hf_model(model, processor, out, save_dtype, rank)
    summary = {"args": vars(args), "step": total, "base_model": str(args.model), "world_size": world,
               "data": {"train": str(args.train_file), "n_train": len(train_records), "val": str(args.val_file),
                        "n_val": len(val_records)},
               "eval_loss": last_val, "train_loss": curves["train loss"][-1][1] if curves["train loss"] else None,
               "param_bytes_per_rank": local_param_bytes(model), "param_bytes_full": full_bytes,
               "train_seconds": round(time.time() - t0, 1)}
    if rank == 0:
        plot_curves(out / "loss.png", curves, title=f"critic SFT: {out.name}")
        if args.val_generate and val_records:
            t1 = time.time()
            summary["val_mae"] = val_mae(out, val_records[:args.val_generate], train_records, args)
            print(f"val decoding took {time.time() - t1:.1f} s")
        summary["seconds"] = round(time.time() - t_start, 1)
        write_json(out / "train_reward.json", summary)
        shutil.rmtree(ckpt, ignore_errors=True)  # the finished model replaces it
        print(f"saved {out} ({summary['seconds']} s)")
    cleanup_dist()


if __name__ == "__main__":
    run_stage(main, get_args())
