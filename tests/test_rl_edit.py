"""rl_edit.py: the Qwen-Image-Edit conditioning path on a tiny editor of the real classes, prompt encoding with
correct positions, one DiffusionNFT step (python and 2-process torchrun), resume, the saved LoRA, bad input."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import rl_edit
import toy

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")  # we never modify its output in place
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def editor_dir(tmp_path_factory):
    """A randomly initialised tiny editor (no pre-training: these tests check mechanics, not quality)."""
    out = tmp_path_factory.mktemp("edit-base")
    rng = random.Random(0)
    texts = [toy.edit_triple(rng)[3] for _ in range(300)] + [rl_edit.SYSTEM_PREFIX + rl_edit.USER_TURN] * 20
    toy.build_tiny_editor(str(out), texts, layers=1, heads=2, head_dim=24)
    return out


@pytest.fixture(scope="module")
def editor(editor_dir):
    return rl_edit.load_editor(editor_dir, device="cpu")


def scenes(n, seed=0):
    rng = random.Random(seed)
    return [toy.edit_triple(rng) for _ in range(n)]


# -----------------------------------------------------------------------------
# latents and packing


def test_pack_puts_each_2x2_cell_of_latents_in_one_token_channel_major():
    z = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)  # (B, C, h, w)
    tokens = rl_edit.pack(z)
    assert tokens.shape == (1, 4, 8)
    # token 0 = the top-left 2x2 cell: channel 0 (0, 1, 4, 5), then channel 1 (16, 17, 20, 21)
    assert tokens[0, 0].tolist() == [0, 1, 4, 5, 16, 17, 20, 21]
    assert tokens[0, 1].tolist() == [2, 3, 6, 7, 18, 19, 22, 23]  # next cell to the right
    assert torch.equal(rl_edit.unpack(tokens, 4, 4), z)


def test_pixel_latents_without_a_vae_are_lossless(editor):
    assert editor.vae is None and editor.space_to_depth == 2 and editor.latent_channels == 12
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = rl_edit.encode_latents(editor, x)
    assert z.shape == (2, 12, 16, 16)
    assert torch.allclose(rl_edit.decode_latents(editor, z), x)


def test_working_size_keeps_the_aspect_ratio_in_multiples_of_the_packing():
    assert rl_edit.working_size(64, 64, 32, 4) == (32, 32)
    assert rl_edit.working_size(1024, 512, 512, 16) == (720, 368)  # ~512^2 pixels, 2:1, multiples of 16


# -----------------------------------------------------------------------------
# the conditioning path: source tokens after the noisy ones, instruction encoded with correct positions


def test_the_condition_image_is_resized_as_the_2509_pipeline_resizes_it_up_or_down():
    # QwenImageEditPlusPipeline: about 384^2 pixels with the source's aspect ratio, multiples of 32, Lanczos
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions
    from PIL import Image
    rng = np.random.default_rng(0)
    for w, h in [(64, 64), (300, 200), (1024, 768), (384, 384)]:  # small sources are upscaled too
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        cw, ch = calculate_dimensions(CONDITION_IMAGE_SIZE, w / h)
        want = VaeImageProcessor(vae_scale_factor=16).resize(im, ch, cw)
        assert np.array_equal(np.asarray(rl_edit.condition_image(im)), np.asarray(want)), (w, h)
    assert rl_edit.condition_image(im := Image.new("RGB", (64, 64)), 64 * 64) is im  # the tiny editor's area: as it is


def test_source_latents_follow_the_noisy_latents_in_the_sequence_with_both_grids(editor):
    tr = editor.transformer
    srcs = [toy.render(t[0], 64) for t in scenes(2)]
    _, src, (h, w) = rl_edit.prepare_sources(editor, srcs)
    assert src.shape == (2, (h // 2) * (w // 2), 48) and (h, w) == (16, 16)  # 32 px / s2d 2 = 16 latents, 8x8 tokens
    embeds, mask = rl_edit.encode_prompt(editor, [t[3] for t in scenes(2)], srcs)
    x_t, t = torch.randn_like(src), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        v = rl_edit.predict_velocity(tr, x_t, src, t, embeds, mask, (h // 2, w // 2))
        full = tr(hidden_states=torch.cat([x_t, src], 1), encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                  timestep=t, img_shapes=[[(1, 8, 8), (1, 8, 8)]] * 2, return_dict=False)[0]
        v_other_source = rl_edit.predict_velocity(tr, x_t, torch.randn_like(src), t, embeds, mask, (8, 8))
    assert v.shape == x_t.shape
    assert torch.allclose(v, full[:, :x_t.shape[1]], atol=1e-6)  # the velocity is the noisy tokens' part
    assert not torch.allclose(v, v_other_source, atol=1e-4)  # and it depends on the source


def test_prompt_encoding_passes_mm_token_type_ids_so_image_tokens_get_3d_positions(editor):
    srcs = [toy.render(t[0], 64) for t in scenes(2)]
    instr = ["Make the red circle blue.", "Remove the green square from the picture, please."]
    embeds, mask = rl_edit.encode_prompt(editor, instr, srcs)
    # reference: the text encoder with explicit M-RoPE positions from get_rope_index
    proc, te = editor.processor, editor.text_encoder
    texts = [rl_edit.SYSTEM_PREFIX + rl_edit.USER_TURN.format(instruction=s) for s in instr]
    inp = proc(text=texts, images=srcs, padding=True, return_tensors="pt")
    assert "mm_token_type_ids" in inp and inp["mm_token_type_ids"].sum() > 0
    pos, _ = te.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"], inp["image_grid_thw"],
                                     attention_mask=inp["attention_mask"])
    with torch.no_grad():
        ref = te(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], pixel_values=inp["pixel_values"],
                 image_grid_thw=inp["image_grid_thw"], position_ids=pos, output_hidden_states=True).hidden_states[-1]
        # what the diffusers pipeline computes (no mm_token_type_ids: plain 1-D positions)
        buggy = te(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], pixel_values=inp["pixel_values"],
                   image_grid_thw=inp["image_grid_thw"], output_hidden_states=True).hidden_states[-1]
    drop = rl_edit.template_prefix_length(proc.tokenizer)
    for i in range(2):
        real = inp["attention_mask"][i].bool()
        n = int(real.sum()) - drop
        assert mask[i].sum() == n  # the system turn is dropped, padding masked
        assert torch.allclose(embeds[i, :n], ref[i][real][drop:], atol=1e-5)
        assert not torch.allclose(embeds[i, :n], buggy[i][real][drop:], atol=1e-3)


def test_prompt_encoding_does_not_depend_on_the_other_prompts_in_the_batch(editor):
    srcs = [toy.render(t[0], 64) for t in scenes(2)]
    short, long = "Make it red.", "Move the blue triangle to the bottom right and keep everything else as it is."
    alone, m1 = rl_edit.encode_prompt(editor, [short], srcs[:1])
    both, m2 = rl_edit.encode_prompt(editor, [short, long], srcs)
    n = int(m1[0].sum())
    assert m2[0].sum() == n and m2[1].sum() > n
    assert torch.allclose(alone[0, :n], both[0, :n], atol=1e-5)  # padding never shifts a prompt's positions
    assert (both[0, n:] == 0).all()


def test_template_prefix_is_a_token_prefix_of_every_prompt(editor):
    tok = editor.processor.tokenizer
    prefix = tok(rl_edit.SYSTEM_PREFIX, add_special_tokens=False)["input_ids"]
    full = tok(rl_edit.SYSTEM_PREFIX + rl_edit.USER_TURN.format(instruction="Make the red circle blue."),
               add_special_tokens=False)["input_ids"]
    assert full[:len(prefix)] == prefix and rl_edit.template_prefix_length(tok) == len(prefix)


def test_empty_instruction_is_a_clear_error(editor):
    with pytest.raises(rl_edit.DataError, match="instruction 1"):
        rl_edit.encode_prompt(editor, ["Make it red.", "  "], [toy.render(scenes(1)[0][0], 64)] * 2)


def test_edit_is_deterministic_per_seed_and_returns_the_source_size(editor):
    t = scenes(2)
    srcs = [toy.render(x[0], 64) for x in t]
    a = rl_edit.edit(editor, srcs, [x[3] for x in t], seeds=[1, 2], steps=2)
    b = rl_edit.edit(editor, srcs[:1], [t[0][3]], seeds=[1], steps=2)
    assert a[0].size == (64, 64) and (np.asarray(a[0]) == np.asarray(b[0])).all()  # batch-independent per seed


def test_noise_levels_follow_the_scheduler_shift_and_end_at_zero(editor):
    ts = rl_edit.editor_noise_levels(editor, 6, 64)
    assert len(ts) == 7 and ts[0] == 1.0 and ts[-1] == 0.0 and bool((ts[:-1] > ts[1:]).all())
    assert ts[-2] == pytest.approx(0.02, abs=1e-6)  # Qwen-Image's shift_terminal


def test_batches_are_padded_so_every_rank_runs_as_many_forwards():
    keys = [(32, 32)] * 3 + [(32, 16)] * 2  # 5 samples over 2 ranks, micro-batch 2, two working sizes
    p0, p1 = (common.rank_batches(keys, r, 2, 2) for r in (0, 1))
    assert p0 == [([0, 1], True)] + [([0, 1], False)]  # rank 0: samples 0-1, one shape, padded to rank 1's count
    assert p1 == [([2], True), ([3, 4], True)]  # rank 1: samples 2-4, one batch per working size


def test_an_unchanged_image_earns_0_under_cme_and_half_under_the_naive_sum(mini_data):
    # the fusion ablation with perfect perception: the world's pixel judge as the critic (E = edited, C = kept)
    from reward import open_critic
    recs = rl_edit.load_prompts(mini_data / "rl" / "edit_train.jsonl")[:2]
    srcs = [rl_edit.load_image(r["image_path"]) for r in recs]
    targets = [toy.render(toy.Scene.from_dict(r["toy"]["target_scene"]), 64) for r in recs]
    judge = open_critic("toy.judges:pixel")
    score = lambda fusion, ims: rl_edit.score(judge, fusion, recs, srcs, ims)
    assert score("cme", srcs) == [0.0, 0.0] and score("sum55", srcs) == [0.5, 0.5]
    assert score("sum64", srcs) == [pytest.approx(0.4)] * 2 and score("cme", targets) == [1.0, 1.0]


def test_pretrain_edit_cli_writes_a_directory_that_diffusers_and_load_editor_open(tmp_path):
    out = tmp_path / "edit-base"
    toy.main(["pretrain-edit", "--out", str(out), "--steps", "2", "--eval", "2", "--layers", "1"])
    summary = json.loads((out / "pretrain_edit.json").read_text())
    assert summary["steps"] == 2 and set(summary["pixel_judge"]) == {"edited", "kept", "overall"}
    assert not (tmp_path / "edit-base.tmp").exists()  # built aside, renamed when done
    from diffusers import QwenImageEditPlusPipeline
    pipe = QwenImageEditPlusPipeline.from_pretrained(out, vae=None)
    assert type(pipe.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration" and pipe.transformer.config.num_layers == 1
    assert rl_edit.load_editor(out, device="cpu").resolution == 32


# -----------------------------------------------------------------------------
# bad input


def test_malformed_prompt_records_name_the_file_record_and_field(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"id": "a", "prompt": "", "image": "x.png"}) + "\n")
    with pytest.raises(rl_edit.DataError, match=r"p.jsonl:1: field 'prompt' must be a non-empty string"):
        rl_edit.load_prompts(f)
    f.write_text(json.dumps({"id": "a", "prompt": "Make it red.", "image": "missing.png"}) + "\n")
    with pytest.raises(rl_edit.DataError, match="field 'image'.*missing.png not found"):
        rl_edit.load_prompts(f)
    f.write_text(json.dumps({"id": "a", "image": "x.png"}) + "\n")
    with pytest.raises(rl_edit.DataError, match="missing field 'prompt'"):
        rl_edit.load_prompts(f)


# -----------------------------------------------------------------------------
# the loop: one step, resume, torchrun, the saved LoRA


def rl_args(editor_dir, mini_data, out, *extra):
    rl = mini_data / "rl"
    return rl_edit.get_args(["--model", str(editor_dir), "--prompts", str(rl / "edit_train.jsonl"),
                             "--test-prompts", str(rl / "edit_test.jsonl"), "--out", str(out), "--reward-model", "toy.judges:pixel",
                             "--eval-judge", "toy.judges:pixel", "--prompts-per-step", "2", "--group-size", "3", "--micro-batch", "4", "--rollout-steps", "3",
                             "--timestep-fraction", "0.34", "--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2",
                             "--eval-prompts", "2", "--eval-every", "100", "--save-every", "1", "--threads", "1", *extra])


def lora_file(out):
    from safetensors.torch import load_file
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def straight_run(editor_dir, mini_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    rl_edit.main(rl_args(editor_dir, mini_data, out, "--steps", "2"))
    return out


def test_two_rl_steps_log_rewards_evaluations_and_pictures(straight_run):
    rows = [json.loads(l) for l in open(straight_run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and 0 <= rows[0]["reward"] <= 1 and rows[0]["reward_fail"] == 0
    evals = [json.loads(l) for l in open(straight_run / "eval.jsonl")]
    assert [r["step"] for r in evals] == [0, 2] and evals[0]["eval_judge"] == evals[0]["eval_reward"]  # the judge is the reward
    assert (straight_run / "samples_grid.png").is_file() and (straight_run / "reward_curve.png").is_file()
    side = json.loads((straight_run / "pytorch_lora_weights.json").read_text())
    assert side["eval_before"] == evals[0] and side["eval_after"] == evals[-1]


def test_the_saved_lora_loads_with_our_loader_and_with_diffusers(editor_dir, straight_run):
    saved = lora_file(straight_run)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in saved.items())  # trained: B moved from 0
    ed = rl_edit.load_editor(editor_dir, lora_dir=straight_run, device="cpu")
    assert ed.transformer.peft_config["default"].lora_alpha == 8  # alpha travels with the file (scale 2, not 1)
    sd = ed.transformer.state_dict()
    for k, v in saved.items():
        assert torch.equal(sd[k[len("transformer."):].replace(".weight", ".default.weight")], v)
    from diffusers import QwenImageEditPlusPipeline
    pipe = QwenImageEditPlusPipeline.from_pretrained(editor_dir, vae=None)  # the tiny editor has no VAE
    pipe.load_lora_weights(straight_run)
    assert pipe.transformer.peft_config["default_0"].r == 4


def test_a_killed_run_resumes_to_the_same_weights(editor_dir, mini_data, straight_run, tmp_path):
    rl_edit.main(rl_args(editor_dir, mini_data, tmp_path, "--steps", "2", "--stop-after", "1"))
    assert (tmp_path / "checkpoint").is_dir() and not (tmp_path / "pytorch_lora_weights.safetensors").exists()
    rl_edit.main(rl_args(editor_dir, mini_data, tmp_path, "--steps", "2", "--resume"))
    a, b = lora_file(straight_run), lora_file(tmp_path)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [1, 2]


def test_critic_parse_failures_are_counted_and_dropped_not_fatal(editor_dir, mini_data, critic_base, tmp_path):
    out = tmp_path / "critic"
    args = rl_args(editor_dir, mini_data, out, "--steps", "1", "--reward", "cme", "--reward-model", str(critic_base),
                   "--reward-max-new-tokens", "4", "--group-size", "2")
    rl_edit.main(args)
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    # an untrained critic answers gibberish: every reward fails to parse, nothing is trained on, nothing crashes
    evals = [json.loads(l) for l in open(out / "eval.jsonl")]
    assert rows[0]["reward_fail"] == 4 and rows[0]["reward"] is None and rows[0]["loss"] is None
    assert evals[0]["eval_reward_fail"] == 2 and evals[0]["eval_judge_fail"] == 0


def test_torchrun_with_2_processes_gives_the_single_process_result(editor_dir, mini_data, tmp_path):
    # 1 prompt x 5 edits over 2 ranks, micro-batch 2: rank 0 runs 2 batches, rank 1 one real and one dummy batch
    flags = ["--prompts-per-step", "1", "--group-size", "5", "--micro-batch", "2", "--eval-prompts", "3", "--steps", "1"]
    rl_edit.main(rl_args(editor_dir, mini_data, tmp_path / "one", *flags))
    rl = mini_data / "rl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "rl_edit.py"),
           "--model", str(editor_dir), "--prompts", str(rl / "edit_train.jsonl"), "--test-prompts", str(rl / "edit_test.jsonl"),
           "--out", str(tmp_path / "two"), "--reward-model", "toy.judges:pixel", "--eval-judge", "toy.judges:pixel", "--rollout-steps", "3", "--timestep-fraction", "0.34",
           "--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2", "--threads", "1", *flags]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = ([json.loads(l) for l in open(tmp_path / d / "metrics.jsonl")] for d in ("one", "two"))
    assert two[0]["reward"] == pytest.approx(one[0]["reward"], abs=1e-6)  # per-sample seeds: the same edits
    e1, e2 = ([json.loads(l) for l in open(tmp_path / d / "eval.jsonl")] for d in ("one", "two"))
    assert e2[-1]["eval_judge"] == pytest.approx(e1[-1]["eval_judge"], abs=1e-6)
    a, b = lora_file(tmp_path / "one"), lora_file(tmp_path / "two")  # rank 0 wrote the gathered adapters
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_a_checkpoint_other_than_edit_2509_is_refused_with_the_reason(editor_dir, tmp_path):
    # the original Qwen-Image-Edit conditions unlike the 2509 pipeline whose template rl_edit encodes with
    import shutil
    other = tmp_path / "qwen-image-edit"
    shutil.copytree(editor_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps(dict(index, _class_name="QwenImageEditPipeline")))
    with pytest.raises(rl_edit.DataError, match="QwenImageEditPlusPipeline"):
        rl_edit.load_editor(other, device="cpu")
