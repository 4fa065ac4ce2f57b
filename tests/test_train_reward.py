"""train_reward.py: answer-only loss, normalisation by the global answer-token count, padding, bad records, presets,
FSDP2 under torchrun (save/reload), resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reward
import train_reward as tr
from common import DataError, load_image, read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def small_split(mini_data, tmp_path, name, n, kind="edit"):
    """The first n records of a curated SFT file, with absolute image paths, in tmp_path."""
    rows = read_jsonl(mini_data / "sft" / f"{kind}_train.jsonl")[:n]
    for r in rows:
        r["images"] = [str((mini_data / "sft" / p).resolve()) for p in r["images"]]
    write_jsonl(tmp_path / name, rows)
    return tmp_path / name


def run_args(critic_base, train, val, out, *extra):
    return tr.get_args(["--model", str(critic_base), "--train-file", str(train), "--val-file", str(val), "--out", str(out),
                        "--lr", "1e-3", "--global-batch", "4", "--micro-batch", "2", "--eval-batch", "4", "--threads", "1",
                        "--val-generate", "0", *extra])


def losses(out):
    return {r["step"]: r["loss"] for r in read_jsonl(Path(out) / "metrics.jsonl")}


@pytest.fixture(scope="module")
def tiny(critic_base):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    return AutoModelForImageTextToText.from_pretrained(critic_base).eval(), AutoProcessor.from_pretrained(critic_base)


# -----------------------------------------------------------------------------
# the objective


def test_answer_only_loss_ignores_prompt_tokens_and_matches_hand_computed_value():
    torch.manual_seed(0)
    V, L, n_prompt = 11, 12, 8
    ids, logits = torch.randint(0, V, (L,)), torch.randn(1, L, V)

    def loss_of(ids):
        labels = tr.make_labels(ids, n_prompt)[None]
        keep = tr.answer_positions(labels)
        return tr.sft_loss(logits[keep], labels, keep).item()

    base = loss_of(ids)
    logp = torch.log_softmax(logits[0], -1)
    assert base == pytest.approx(-sum(logp[t - 1, ids[t]].item() for t in range(n_prompt, L)), rel=1e-6)
    for pos in (0, 3, n_prompt - 1):  # a prompt token's label: no effect
        changed = ids.clone()
        changed[pos] = (ids[pos] + 1) % V
        assert loss_of(changed) == pytest.approx(base, abs=0)
    for pos in (n_prompt, L - 1):  # an answer token's label: the loss moves
        changed = ids.clone()
        changed[pos] = (ids[pos] + 1) % V
        assert loss_of(changed) != pytest.approx(base, rel=1e-6)


def test_encoded_record_masks_prompt_and_image_tokens_and_keeps_the_inference_prompt(mini_data, tiny):
    _, processor = tiny
    rec = read_jsonl(mini_data / "sft/edit_train.jsonl")[0]
    s = tr.encode(rec, processor, mini_data / "sft")
    answer_ids = s["input_ids"][s["labels"] != -100]
    assert processor.tokenizer.decode(answer_ids) == rec["messages"][1]["content"] + processor.tokenizer.eos_token
    n_prompt = int((s["labels"] == -100).sum())
    assert (s["labels"][:n_prompt] == -100).all() and (s["labels"][n_prompt:] != -100).all()
    # the prompt part is token for token what the critic is given at inference (generation prompt included)
    prompt = tr.chat_prompt(processor, rec["messages"][0]["content"])
    assert prompt.endswith("<|im_start|>assistant\n") and prompt.count("<|vision_start|>") == 2
    images = [load_image(p, mini_data / "sft") for p in rec["images"]]
    at_inference = processor(text=[prompt], images=images, return_tensors="pt")["input_ids"][0]
    assert s["input_ids"][:n_prompt].tolist() == at_inference.tolist()
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (s["input_ids"] == image_token).sum() == (s["mm_token_type_ids"] == 1).sum() > 0
    assert s["image_grid_thw"].shape == (2, 3)


def test_training_sees_images_as_the_critic_does_at_inference(mini_data, tiny, tmp_path):
    _, processor = tiny
    rec = dict(read_jsonl(mini_data / "sft/edit_train.jsonl")[0])
    big = load_image(rec["images"][0], mini_data / "sft").resize((1200, 900))
    big.save(tmp_path / "big.png")
    rec["images"] = [str(tmp_path / "big.png"), str(mini_data / "sft" / rec["images"][1])]
    seen = []

    class Recording:  # the processor, recording the images it is given
        def __getattr__(self, name):
            return getattr(processor, name)

        def __call__(self, **kw):
            seen.extend(im.size for im in kw["images"])
            return processor(**kw)
    tr.encode(rec, Recording(), mini_data / "sft")
    assert seen[0] == reward.critic_image(big).size == (886, 665)  # within 768^2 pixels, as reward.Critic scores it


def test_training_chat_is_the_one_the_critic_builds_at_inference(tiny):
    from reward import build_prompt, critic_messages
    _, processor = tiny
    for mode, n, text in [("execution", 2, "Remove the red circle."), ("consistency", 2, "Make the sky blue."),
                          ("instruction", 1, "A green square."), ("quality", 1, "")]:
        record_turn = build_prompt(mode, text)  # what curate.py writes: the images marked after the text
        assert record_turn.count("<image>") == n and text in record_turn.split("<image>")[0]
        inference = processor.apply_chat_template(critic_messages(mode, text), add_generation_prompt=True, tokenize=False)
        assert tr.chat_prompt(processor, record_turn) == inference


def test_right_padding_leaves_each_samples_loss_unchanged(mini_data, tiny):
    model, processor = tiny
    recs = read_jsonl(mini_data / "sft/gen_train.jsonl")[:2]  # instruction (long answer) + quality (short)
    a, b = (tr.encode(r, processor, mini_data / "sft") for r in recs)
    assert len(a["input_ids"]) != len(b["input_ids"])
    pad = processor.tokenizer.pad_token_id
    batch = tr.collate([a, b], pad)
    short = 0 if len(a["input_ids"]) < len(b["input_ids"]) else 1
    assert (batch["labels"][short, min(len(a["input_ids"]), len(b["input_ids"])):] == -100).all()
    with torch.no_grad():
        both, n_both = tr.forward_loss(model, batch)
        one = [tr.forward_loss(model, tr.collate([s], pad)) for s in (a, b)]
    assert n_both == one[0][1] + one[1][1]
    assert both.item() == pytest.approx(one[0][0].item() + one[1][0].item(), rel=1e-4)


def test_a_text_only_record_batches_with_image_records(mini_data, tiny):
    model, processor = tiny
    rec = read_jsonl(mini_data / "sft/edit_train.jsonl")[0]
    text_only = dict(rec, images=[], messages=[{"role": "user", "content": rec["messages"][0]["content"].replace("<image>", "")},
                                               rec["messages"][1]])
    a, b = tr.encode(rec, processor, mini_data / "sft"), tr.encode(text_only, processor, mini_data / "sft")
    assert "pixel_values" not in b
    pad = processor.tokenizer.pad_token_id
    batch = tr.collate([b, a], pad)
    assert torch.equal(batch["pixel_values"], a["pixel_values"]) and torch.equal(batch["image_grid_thw"], a["image_grid_thw"])
    with torch.no_grad():
        both, n_both = tr.forward_loss(model, batch)
        one = [tr.forward_loss(model, tr.collate([s], pad)) for s in (b, a)]
    assert n_both == one[0][1] + one[1][1]
    assert both.item() == pytest.approx(one[0][0].item() + one[1][0].item(), rel=1e-4)


def test_micro_batches_give_the_gradient_of_one_batch_normalised_by_all_their_answer_tokens(mini_data, tiny):
    import copy
    from common import cleanup_dist, setup_dist
    model, processor = copy.deepcopy(tiny[0]), tiny[1]
    recs = read_jsonl(mini_data / "sft/gen_train.jsonl")[:3]  # answers of different lengths
    samples = [tr.encode(r, processor, mini_data / "sft") for r in recs]
    pad = processor.tokenizer.pad_token_id
    setup_dist()  # a world of one: sft_step's all_reduce is the identity
    try:
        grads, losses = [], []
        for micro in ([tr.collate(samples, pad)], [tr.collate(samples[:1], pad), tr.collate(samples[1:], pad)]):
            losses.append(tr.sft_step(model, micro, 1, torch.device("cpu")))
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
            model.zero_grad(set_to_none=True)
    finally:
        cleanup_dist()
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert len(grads[0]) == len(grads[1]) > 0 and all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(*grads))
    # the logged loss is the sum over all answer tokens divided by their count (not a mean of per-micro-batch means)
    with torch.no_grad():
        per_sample = [tr.forward_loss(model, tr.collate([s], pad)) for s in samples]
    assert len({n for _, n in per_sample}) > 1
    assert losses[0] == pytest.approx(sum(loss.item() for loss, _ in per_sample) / sum(n for _, n in per_sample), rel=1e-5)


def test_lr_warms_up_then_decays_to_zero_on_a_cosine():
    lrs = [tr.lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5, abs=0.02) and lrs[-1] < 0.001
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:]))


def test_data_order_is_a_function_of_step_and_seed_only():
    a = [tr.step_indices(s, 50, 8, seed=1) for s in range(12)]  # 6 steps per epoch, 2 epochs
    assert a == [tr.step_indices(s, 50, 8, seed=1) for s in range(12)]
    assert len(set(sum(a[:6], []))) == 48 and a[:6] != a[6:12]


# -----------------------------------------------------------------------------
# bad input


def test_missing_image_and_empty_answer_are_reported_with_their_ids(mini_data, tmp_path):
    rows = read_jsonl(mini_data / "sft/edit_train.jsonl")[:4]
    for r in rows:
        r["images"] = [str((mini_data / "sft" / p).resolve()) for p in r["images"]]
    rows[1]["images"][1] = "images/nowhere.png"
    rows[1]["id"] = "broken-image"
    rows[3]["messages"][1]["content"] = "  "
    rows[3]["id"] = "empty-answer"
    write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        tr.load_records(tmp_path / "bad.jsonl")
    msg = str(e.value)
    assert "2 bad record(s)" in msg and "'broken-image'" in msg and "nowhere.png" in msg and "'empty-answer'" in msg
    kept = tr.load_records(tmp_path / "bad.jsonl", skip_bad=True)
    assert [r["id"] for r in kept] == [rows[0]["id"], rows[2]["id"]]


# -----------------------------------------------------------------------------
# FSDP2 runs: 2 ranks vs 1 rank, save and reload, resume


def test_torchrun_two_ranks_matches_one_rank_and_saved_model_reloads_with_identical_outputs(mini_data, critic_base, tmp_path, tiny):
    from transformers import AutoModelForImageTextToText
    train = small_split(mini_data, tmp_path, "train.jsonl", 24)
    val = small_split(mini_data, tmp_path, "val.jsonl", 6)
    common = ["--max-steps", "3", "--eval-every", "3", "--save-every", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train_reward.py"),
           "--model", str(critic_base), "--train-file", str(train), "--val-file", str(val), "--out", str(tmp_path / "ws2"),
           "--lr", "1e-3", "--global-batch", "4", "--micro-batch", "1", "--eval-batch", "4", "--threads", "1",
           "--val-generate", "2", "--max-new-tokens", "4", *common]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tr.main(run_args(critic_base, train, val, tmp_path / "ws1", *common))  # world of one, micro-batch 2, no accumulation
    two, one = losses(tmp_path / "ws2"), losses(tmp_path / "ws1")
    assert sorted(two) == [1, 2, 3] and all(two[s] == pytest.approx(one[s], rel=1e-4) for s in one)
    side = json.loads((tmp_path / "ws2" / "train_reward.json").read_text())
    assert side["world_size"] == 2 and side["step"] == 3 and side["param_bytes_per_rank"] < 0.6 * side["param_bytes_full"]
    assert (tmp_path / "ws2" / "loss.png").is_file() and not (tmp_path / "ws2" / "checkpoint").exists()
    # the saved directory is a plain model: its val loss is the one the sharded model measured
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "ws2").eval()
    processor = tiny[1]
    data = [tr.encode(r, processor, val.parent) for r in read_jsonl(val)]
    with torch.no_grad():
        s, n = zip(*(tr.forward_loss(model, tr.collate([d], processor.tokenizer.pad_token_id)) for d in data))
    assert sum(x.item() for x in s) / sum(n) == pytest.approx(side["eval_loss"], rel=1e-5)


def test_resume_after_interruption_reproduces_the_uninterrupted_losses(mini_data, critic_base, tmp_path):
    train = small_split(mini_data, tmp_path, "train.jsonl", 16)
    val = small_split(mini_data, tmp_path, "val.jsonl", 4)
    steps = ["--max-steps", "5", "--save-every", "2", "--eval-every", "100"]
    tr.main(run_args(critic_base, train, val, tmp_path / "full", *steps))
    tr.main(run_args(critic_base, train, val, tmp_path / "cut", *steps, "--stop-after", "3"))  # killed after step 3
    assert (tmp_path / "cut" / "checkpoint" / "optimizer.safetensors").is_file()
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    tr.main(run_args(critic_base, train, val, tmp_path / "cut", *steps, "--resume"))  # continues from step 2
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(cut) == [1, 2, 3, 4, 5]  # step 3 (lost) was redone and logged once
    assert all(cut[s] == pytest.approx(full[s], rel=1e-6) for s in full)


def test_mini_presets_train_the_seeing_base_first_and_the_critics_from_it():
    vlm = tr.get_args(["--preset", "mini-vlm"])
    assert (vlm.model, vlm.out, vlm.val_generate) == ("runs/mini/models/critic-base", "runs/mini/models/vlm-base", 0)
    assert (vlm.train_file, vlm.val_file) == ("runs/mini/data/sft/vlm_train.jsonl", "runs/mini/data/sft/vlm_val.jsonl")
    edit = tr.get_args(["--preset", "mini-edit-direct"])
    assert (edit.model, edit.out) == ("runs/mini/models/vlm-base", "runs/mini/models/edit-critic-direct")
    assert edit.train_file == "runs/mini/data/sft/edit_direct_train.jsonl"
    gen = tr.get_args(["--preset", "mini-gen", "--model", "x"])
    assert gen.model == "x" and gen.out == "runs/mini/models/gen-critic"  # an explicit flag wins
    assert (vlm.epochs, edit.epochs, gen.epochs) == (1.0, 4.0, 2.0)
    assert (gen.lr, gen.global_batch, gen.micro_batch, gen.val_generate) == (1e-3, 4, None, 100)
    for name, preset in tr.PRESETS.items():  # each names its whole run: nothing is derived from the name
        assert {"model", "train_file", "val_file", "out", "epochs"} <= set(preset), name
        assert tr.get_args(["--preset", name]).out == preset["out"]


def test_the_vision_tower_is_frozen_as_llama_factory_freezes_it_except_in_the_miniature_world():
    real = tr.get_args(["--model", "m", "--train-file", "t", "--out", "o"])
    assert real.freeze_vision and real.activation_checkpointing  # LLaMA-Factory's defaults
    for preset in tr.PRESETS:  # the tiny critic trains its tower too (the miniature figures were measured so)
        mini = tr.get_args(["--preset", preset])
        assert not mini.freeze_vision and not mini.activation_checkpointing


def test_without_a_preset_the_model_data_and_output_must_be_named():
    with pytest.raises(SystemExit):
        tr.get_args(["--model", "m", "--train-file", "t.jsonl"])
    args = tr.get_args(["--model", "m", "--train-file", "t.jsonl", "--out", "o"])
    assert (args.lr, args.global_batch, args.micro_batch, args.epochs, args.warmup_ratio) == (1e-5, 160, 10, 1.0, 0.1)
