"""Every stage's real path (no --preset) on tiny random models saved in the hub checkpoints' layouts.

The miniature world's models are the real classes, but laid out and sized for the world: no VAE, no T5, 8 px
patches, fp32 on disk. Here the models are the hub's (tests/hub_layouts.py): SD3.5-Medium with its VAE and
three text encoders, Qwen-Image-Edit-2509 with its VAE and Qwen2.5-VL (14 px patches), Qwen3-VL-8B-Instruct
in bf16 (16 px patches, chat template in chat_template.json); the data are small JSONL manifests and PNGs
written here, in each script's documented schema. Each stage runs 1-2 steps with the flags a user would give,
then its output is opened the way a user opens it (diffusers' load_lora_weights, AutoModelForImageTextToText
with dtype "auto"). The frozen parts run in bf16 as on a GPU: the scripts choose bf16 themselves on CUDA; on a
CPU, where they choose fp32, the bf16 tests call the same loading and sampling functions with dtype bf16.

Runs on CUDA (+ NCCL under torchrun) when available, else on the CPU (gloo): benchmarks/gpu_check.sh runs this
file on a GPU machine. Torchrun tests use 2 ranks (on CUDA: as many as there are GPUs, at most 2).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tests import hub_layouts
from tests.conftest import ROOT

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NPROC = min(2, torch.cuda.device_count()) if CUDA else 2
RES = 64  # px: 8x8 latents for both policies, 4 image tokens per 64 px source for the editor's text encoder


# -----------------------------------------------------------------------------
# the models (built once per module) and the data


@pytest.fixture(scope="module")
def sd35(tmp_path_factory):
    return hub_layouts.build_sd35_medium(tmp_path_factory.mktemp("hub") / "stable-diffusion-3.5-medium")


@pytest.fixture(scope="module")
def qwen_edit(tmp_path_factory):
    return hub_layouts.build_qwen_image_edit_2509(tmp_path_factory.mktemp("hub") / "Qwen-Image-Edit-2509")


@pytest.fixture(scope="module")
def qwen3vl(tmp_path_factory):
    return hub_layouts.build_qwen3_vl_instruct(tmp_path_factory.mktemp("hub") / "Qwen3-VL-8B-Instruct")


def picture(i, size=RES):
    """A small test picture: a coloured shape on a plain background, different for each i."""
    colors = [(220, 40, 40), (40, 90, 220), (40, 170, 60), (230, 200, 40)]
    im = Image.new("RGB", (size, size), [(245, 245, 245), (150, 150, 150), (170, 205, 240)][i % 3])
    d, r = ImageDraw.Draw(im), size // 4 + i % 3
    box = [size // 2 - r, size // 2 - r, size // 2 + r, size // 2 + r]
    (d.ellipse if i % 2 else d.rectangle)(box, fill=colors[i % 4])
    return im


def write_jsonl(path, rows):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


INSTRUCTIONS = ["make the shape blue", "remove the shape", "change the background to white", "make the shape larger"]
PROMPTS = ["a red square on a white background", "a blue circle on a gray background",
           "a green square above a yellow circle", "a photo of a cat on a red chair"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Manifests in each stage's documented schema, images as PNG files beside them (paths relative)."""
    import reward
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    for i in range(8):
        picture(i).save(root / "images" / f"{i}.png")
    img = lambda i: f"images/{i}.png"
    d = {"root": root}
    # rl_gen: {id, prompt}; rl_edit: {id, prompt (the instruction), image, requirement?}
    d["gen_prompts"] = write_jsonl(root / "gen_prompts.jsonl", [{"id": f"g{i}", "prompt": p} for i, p in enumerate(PROMPTS[:2])])
    d["edit_prompts"] = write_jsonl(root / "edit_prompts.jsonl", [
        {"id": f"e{i}", "prompt": s, "image": img(i), "requirement": None} for i, s in enumerate(INSTRUCTIONS[:2])])
    # train_reward: {id, mode, score, images, messages: [user with <image> markers, assistant]} (curate.sft_records)
    sft = []
    for i in range(6):
        mode = ["execution", "consistency", "instruction"][i % 3]
        text = INSTRUCTIONS[i % 4] if mode != "instruction" else PROMPTS[i % 4]
        images = [img(i), img(i + 1)] if mode != "instruction" else [img(i)]
        answer = json.dumps({"reasoning": f"the picture shows {PROMPTS[i % 4]}", "score": [1 + i % 5]})
        sft.append({"id": f"s{i}", "mode": mode, "score": 1 + i % 5, "images": images,
                    "messages": [{"role": "user", "content": reward.build_prompt(mode, text)},
                                 {"role": "assistant", "content": answer}]})
    d["sft_train"], d["sft_val"] = write_jsonl(root / "sft_train.jsonl", sft[:4]), write_jsonl(root / "sft_val.jsonl", sft[4:])
    # bench (layout "mini"): edit splits {id, source, edited, instruction, mode, human_score}, gen {id, image, prompt, difficulty, ...}
    bench = root / "bench"
    for split, mode in (("edit_execution", "execution"), ("edit_consistency", "consistency")):
        write_jsonl(bench / f"{split}.jsonl", [{"id": f"{mode}{i}", "source": f"../{img(i)}", "edited": f"../{img(i + 1)}",
                                                "instruction": INSTRUCTIONS[i], "mode": mode, "human_score": 1 + 2 * i}
                                               for i in range(2)])
    write_jsonl(bench / "gen.jsonl", [{"id": f"gen{i}", "image": f"../{img(i)}", "prompt": PROMPTS[i],
                                       "difficulty": ["easy", "hard"][i], "mode": "instruction", "human_score": 2 + i}
                                      for i in range(2)])
    d["bench"] = bench
    # reward.py score: edit {id, source, edited, instruction} / gen {id, image, prompt}, with a mode each
    d["score_items"] = write_jsonl(root / "score_items.jsonl", [
        {"id": "x0", "mode": "execution", "source": img(0), "edited": img(1), "instruction": INSTRUCTIONS[0], "human_score": 4},
        {"id": "x1", "mode": "quality", "image": img(2)},
        {"id": "x2", "mode": "instruction", "image": img(3), "prompt": PROMPTS[1], "human_score": 2}])
    # curate.py real candidates: edit {id, source, edited, instruction}, gen {id, image, prompt}
    d["edit_cands"] = write_jsonl(root / "edit_candidates.jsonl", [
        {"id": f"c{i}", "source": img(i), "edited": img(i + 2), "instruction": INSTRUCTIONS[i]} for i in range(2)])
    d["gen_cands"] = write_jsonl(root / "gen_candidates.jsonl", [
        {"id": f"q{i}", "image": img(i + 4), "prompt": PROMPTS[i]} for i in range(2)])
    return d


@pytest.fixture(autouse=True)
def no_leftover_process_group():
    """A stage that raised inside main() leaves its process group behind: drop it, so the next test starts clean."""
    yield
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def rows(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def torchrun(script, args, cwd, timeout=300):
    """`torchrun --standalone --nproc_per_node=NPROC script args`; returns the CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}", str(ROOT / script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_ran(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n" + proc.stderr[-5000:]


# -----------------------------------------------------------------------------
# the layouts themselves


def test_the_layouts_open_as_the_hub_checkpoints_do(sd35, qwen_edit, qwen3vl):
    from diffusers import DiffusionPipeline
    from transformers import AutoConfig, AutoProcessor
    index = json.loads((sd35 / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    tr = json.loads((sd35 / "transformer" / "config.json").read_text())
    assert (tr["in_channels"], tr["patch_size"], tr["dual_attention_layers"], tr["qk_norm"]) == (16, 2, [0], "rms_norm")
    vae = json.loads((sd35 / "vae" / "config.json").read_text())
    assert (vae["latent_channels"], vae["shift_factor"], vae["scaling_factor"]) == (16, 0.0609, 1.5305)
    assert json.loads((sd35 / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0
    assert json.loads((sd35 / "tokenizer_3" / "tokenizer_config.json").read_text())["tokenizer_class"] == "T5Tokenizer"
    assert json.loads((qwen_edit / "model_index.json").read_text())["_class_name"] == "QwenImageEditPlusPipeline"
    assert DiffusionPipeline.from_pretrained(qwen_edit).__class__.__name__ == "QwenImageEditPlusPipeline"
    qvae = json.loads((qwen_edit / "vae" / "config.json").read_text())
    assert qvae["z_dim"] == len(qvae["latents_mean"]) == len(qvae["latents_std"]) == 16
    assert AutoProcessor.from_pretrained(qwen_edit / "processor").image_processor.patch_size == 14
    sch = json.loads((qwen_edit / "scheduler" / "scheduler_config.json").read_text())
    assert sch["use_dynamic_shifting"] and sch["time_shift_type"] == "exponential"
    cfg, proc = AutoConfig.from_pretrained(qwen3vl), AutoProcessor.from_pretrained(qwen3vl)
    assert json.loads((qwen3vl / "config.json").read_text())["dtype"] == "bfloat16" and cfg.vision_config.patch_size == 16
    assert proc.image_processor.patch_size == 16 and proc.chat_template and not (qwen3vl / "chat_template.jinja").exists()
    assert len(list(qwen3vl.glob("model-*-of-*.safetensors"))) > 1


# -----------------------------------------------------------------------------
# rl_gen.py on SD3.5-Medium's layout, the Qwen3-VL critic in process


def rl_args(model, prompts, qwen3vl, out, *extra):
    """Both RL scripts take the same flags. --reward-method expected: the tiny critic's digit expectation parses
    (hub_layouts), so rewards exist and the DiffusionNFT update runs; greedy answers of a random critic would all fail
    and the step would skip its update."""
    return ["--model", str(model), "--prompts", str(prompts), "--test-prompts", str(prompts), "--eval-prompts", "2",
            "--grid-prompts", "1", "--reward-model", str(qwen3vl), "--reward-method", "expected", "--out", str(out),
            "--resolution", str(RES), "--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--rollout-steps", "2",
            "--timestep-fraction", "0.5", "--micro-batch", "4", "--reward-batch", "4", "--reward-max-new-tokens", "8", *extra]


def rl_gen_args(sd35, qwen3vl, data, out, *extra):
    return rl_args(sd35, data["gen_prompts"], qwen3vl, out, *extra)


@pytest.fixture(scope="module")
def rl_gen_out(sd35, qwen3vl, data, tmp_path_factory):
    import rl_gen
    out = tmp_path_factory.mktemp("rl_gen") / "out"
    rl_gen.main(rl_gen.get_args(rl_gen_args(sd35, qwen3vl, data, out, "--save-every", "0")))
    return out


def check_rl_gen_out(out):
    (row,) = rows(out / "metrics.jsonl")
    assert row["reward_fail"] == 0 and math.isfinite(row["loss"]) and math.isfinite(row["reward"])
    assert [r["step"] for r in rows(out / "eval.jsonl")] == [0, 1] and math.isfinite(rows(out / "eval.jsonl")[-1]["eval_reward"])
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_rl_gen_trains_on_the_sd35_layout_and_its_lora_draws_in_the_diffusers_pipeline(rl_gen_out, sd35):
    from diffusers import StableDiffusion3Pipeline
    check_rl_gen_out(rl_gen_out)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd35, dtype=torch.bfloat16).to(DEVICE)
    pipe.load_lora_weights(rl_gen_out)
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
    image = pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=1.0, height=RES, width=RES,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (RES, RES) and np.asarray(image).std() > 0


def test_rl_gen_sampler_runs_with_bf16_frozen_parts_and_transformer(sd35):
    # what bench.py policy goes through on a GPU: text encoders and transformer in bf16 (load_generator's GPU default)
    import rl_gen
    gen = rl_gen.load_generator(sd35, device=DEVICE, dtype=torch.bfloat16)
    assert {m.dtype for m in (gen.transformer, gen.pipe.text_encoder, gen.pipe.text_encoder_2, gen.pipe.text_encoder_3)} == {torch.bfloat16}
    (image,) = rl_gen.generate(gen, [PROMPTS[0]], [0], steps=2, resolution=RES)
    assert image.size == (RES, RES)


def test_rl_gen_under_torchrun_trains_on_the_sd35_layout(sd35, qwen3vl, data, tmp_path):
    out = tmp_path / "out"
    assert_ran(torchrun("rl_gen.py", rl_gen_args(sd35, qwen3vl, data, out), tmp_path))
    check_rl_gen_out(out)


# -----------------------------------------------------------------------------
# rl_edit.py on Qwen-Image-Edit-2509's layout


def rl_edit_args(qwen_edit, qwen3vl, data, out, *extra):
    return rl_args(qwen_edit, data["edit_prompts"], qwen3vl, out, *extra)


@pytest.fixture(scope="module")
def rl_edit_out(qwen_edit, qwen3vl, data, tmp_path_factory):
    import rl_edit
    out = tmp_path_factory.mktemp("rl_edit") / "out"
    rl_edit.main(rl_edit.get_args(rl_edit_args(qwen_edit, qwen3vl, data, out, "--save-every", "0")))
    return out


def check_rl_edit_out(out):
    last = rows(out / "metrics.jsonl")[-1]
    assert last["step"] == 1 and last["reward_fail"] == 0 and math.isfinite(last["loss"])
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "samples_grid.png").is_file()


def test_rl_edit_trains_on_the_qwen_image_edit_layout_and_its_lora_loads_into_the_diffusers_pipeline(rl_edit_out, qwen_edit):
    from diffusers import QwenImageEditPlusPipeline
    check_rl_edit_out(rl_edit_out)
    pipe = QwenImageEditPlusPipeline.from_pretrained(qwen_edit, dtype=torch.bfloat16).to(DEVICE)
    pipe.load_lora_weights(rl_edit_out)
    tr = pipe.transformer
    assert any("lora" in n for n, _ in tr.named_parameters())
    if CUDA:  # one edit as a user makes it (the pipeline encodes the source at ~1 MP whatever height/width say)
        out = pipe(image=[picture(0)], prompt=INSTRUCTIONS[0], num_inference_steps=2, true_cfg_scale=1.0,
                   height=RES, width=RES, generator=torch.Generator().manual_seed(0)).images[0]
        assert out.size == (RES, RES)
    else:
        # On a CPU the pipeline's own edit took 113 s (measured): it VAE-encodes the source at ~1024x1024, and the
        # 3-D convolutions of AutoencoderKLQwenImage run ~25x slower in bf16 than in fp32 there (133 s vs 5.4 s for
        # that encode). So here: one forward of the LoRA-loaded bf16 transformer, shaped as the pipeline calls it
        # (noisy tokens, then the source's, img_shapes listing both frames).
        grid, text = (RES // 16, RES // 16), 7
        x = torch.randn(1, 2 * grid[0] * grid[1], tr.config.in_channels, dtype=torch.bfloat16)
        enc = torch.randn(1, text, tr.config.joint_attention_dim, dtype=torch.bfloat16)
        with torch.no_grad():
            v = tr(hidden_states=x, timestep=torch.tensor([0.5], dtype=torch.bfloat16), encoder_hidden_states=enc,
                   encoder_hidden_states_mask=torch.ones(1, text, dtype=torch.bool), img_shapes=[[(1, *grid), (1, *grid)]],
                   return_dict=False)[0]
        assert v.shape == (1, x.shape[1], 4 * tr.config.out_channels) and torch.isfinite(v.float()).all()


def test_rl_edit_sampler_runs_with_bf16_frozen_parts_and_transformer(qwen_edit):
    # rl_edit.load_editor's GPU default: text encoder, VAE and transformer in bf16
    import rl_edit
    editor = rl_edit.load_editor(qwen_edit, device=DEVICE, dtype=torch.bfloat16, resolution=RES)
    assert editor.vae is not None and editor.text_encoder.dtype == editor.transformer.dtype == torch.bfloat16
    (out,) = rl_edit.edit(editor, [picture(0)], [INSTRUCTIONS[0]], [0], steps=2)
    assert out.size == picture(0).size


def test_rl_edit_under_torchrun_trains_on_the_qwen_image_edit_layout(qwen_edit, qwen3vl, data, tmp_path):
    out = tmp_path / "out"
    assert_ran(torchrun("rl_edit.py", rl_edit_args(qwen_edit, qwen3vl, data, out), tmp_path))
    check_rl_edit_out(out)


# -----------------------------------------------------------------------------
# train_reward.py on Qwen3-VL-8B-Instruct's layout


def train_reward_args(qwen3vl, data, out, *extra):
    return ["--model", str(qwen3vl), "--train-file", str(data["sft_train"]), "--val-file", str(data["sft_val"]),
            "--out", str(out), "--max-steps", "2", "--global-batch", "2", "--micro-batch", "1", "--lr", "1e-4",
            "--eval-batch", "2", "--val-generate", "2", "--max-new-tokens", "4", *extra]


def check_saved_critic(out):
    """The trained critic reopens as the hub checkpoint did: bf16 weights AND a config that says bf16."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForImageTextToText.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert AutoProcessor.from_pretrained(out).chat_template  # reward.Critic needs it
    side = json.loads((out / "train_reward.json").read_text())
    assert side["step"] == 2 and math.isfinite(side["train_loss"])


def test_train_reward_on_the_qwen3_vl_layout_saves_a_critic_that_reopens_in_bf16(qwen3vl, data, tmp_path):
    import train_reward
    out = tmp_path / "critic"
    train_reward.main(train_reward.get_args(train_reward_args(qwen3vl, data, out, "--save-every", "0")))
    check_saved_critic(out)
    # as LLaMA-Factory by default: the vision tower and its mergers (the projector) frozen, the language model trained
    from safetensors.torch import load_file
    base, tuned = ({k: v for f in d.glob("*.safetensors") for k, v in load_file(f).items()} for d in (qwen3vl, out))
    vision = [k for k in base if k.startswith("model.visual.")]
    assert vision and base.keys() == tuned.keys() and all(torch.equal(base[k], tuned[k]) for k in vision)
    assert not all(torch.equal(base[k], tuned[k]) for k in base.keys() - set(vision))
    import reward  # and it scores as a critic
    critic = reward.Critic(out, device=DEVICE, max_new_tokens=4)
    (j,) = critic.score("quality", [{"image": picture(1)}], method="expected")
    assert j.ok and all(1 <= s <= 5 for s in j.scores)
    # "soft" in bf16 with Qwen's tokenizer: digits are tokens of their own, never merged with a space
    assert critic.digit_classes == [[critic.tok.convert_tokens_to_ids(str(k))] for k in range(1, 6)]
    (j,) = critic.score("quality", [{"image": picture(1)}], method="soft")  # 4 tokens of an untrained critic
    assert (j.ok and j.how == "soft" and all(1 <= s <= 5 for s in j.scores)) or (not j.ok and j.error)


def test_train_reward_under_torchrun_on_the_qwen3_vl_layout(qwen3vl, data, tmp_path):
    out = tmp_path / "critic"
    assert_ran(torchrun("train_reward.py", train_reward_args(qwen3vl, data, out), tmp_path))
    check_saved_critic(out)


# -----------------------------------------------------------------------------
# scoring, benchmarking and curating with the Qwen3-VL layout as the critic / judge


def test_reward_score_cli_scores_with_the_qwen3_vl_layout_in_bf16(qwen3vl, data, tmp_path):
    import reward
    common = ["score", "--model", str(qwen3vl), "--input", str(data["score_items"]), "--dtype", "bfloat16",
              "--max-new-tokens", "8", "--batch-size", "2"]
    reward.main(common + ["--out", str(tmp_path / "generate.jsonl")])
    got = {r["id"]: r for r in rows(tmp_path / "generate.jsonl")}
    assert set(got) == {"x0", "x1", "x2"}  # a random critic's greedy answers: failures kept with their text, never scores
    assert all(not r["ok"] or len(r["scores"]) == reward.N_SCORES[r["mode"]] for r in got.values())
    assert all(r["error"] and r["scores"] is None for r in got.values() if not r["ok"])
    reward.main(common + ["--out", str(tmp_path / "expected.jsonl"), "--method", "expected"])
    got = {r["id"]: r for r in rows(tmp_path / "expected.jsonl")}
    assert all(r["ok"] and len(r["scores"]) == reward.N_SCORES[r["mode"]] for r in got.values())
    assert all(1 <= s <= 5 for r in got.values() for s in r["scores"])


def test_bench_critics_tables_the_qwen3_vl_layout_as_a_critic(qwen3vl, data, tmp_path):
    import bench
    bench.main(["critics", "--bench-dir", str(data["bench"]), "--critic", f"qwen3vl={qwen3vl}", "--out", str(tmp_path),
                "--max-new-tokens", "8", "--batch-size", "4"])
    res = json.loads((tmp_path / "critics.json").read_text())["critics"]["qwen3vl"]
    assert set(res["metrics"]) >= {"execution", "consistency", "edit_overall", "gen_overall"}
    assert len(rows(tmp_path / "preds" / "qwen3vl" / "predictions.jsonl")) == 6  # every item predicted or failed
    assert (tmp_path / "critics.md").is_file() and (tmp_path / "confusion_qwen3vl.png").is_file()


def test_bench_policy_gen_compares_the_sd35_layout_with_its_rl_gen_lora(rl_gen_out, sd35, qwen3vl, data, tmp_path):
    import bench
    bench.main(["policy", "--kind", "gen", "--base", str(sd35), "--tuned", f"firm={rl_gen_out}", "--prompts",
                str(data["gen_prompts"]), "--judge", str(qwen3vl), "--samples-per-prompt", "1", "--steps", "2",
                "--limit", "1", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "policy.json").read_text())
    assert {v: res["variants"][v]["n"] for v in ("base", "firm")} == {"base": 1, "firm": 1}
    assert (tmp_path / "images" / "firm" / "g0_0.png").is_file()


def test_bench_policy_edit_compares_the_qwen_image_edit_layout_with_its_rl_edit_lora(rl_edit_out, qwen_edit, qwen3vl, data,
                                                                                     tmp_path):
    import bench
    bench.main(["policy", "--kind", "edit", "--base", str(qwen_edit), "--tuned", f"firm={rl_edit_out}", "--prompts",
                str(data["edit_prompts"]), "--judge", str(qwen3vl), "--samples-per-prompt", "1", "--steps", "2",
                "--limit", "1", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "policy.json").read_text())
    assert {v: res["variants"][v]["n"] for v in ("base", "firm")} == {"base": 1, "firm": 1}
    assert (tmp_path / "images" / "firm" / "e0_0.png").is_file()


def test_curate_with_the_qwen3_vl_layout_as_a_transformers_judge(qwen3vl, data, tmp_path):
    import curate
    out = tmp_path / "curated"
    curate.main(curate.get_args(["--judge", str(qwen3vl), "--edit-candidates",
                                 str(data["edit_cands"]), "--gen-candidates", str(data["gen_cands"]), "--out", str(out),
                                 "--max-new-tokens", "8", "--ablation-direct", "0"]))
    for kind, n in (("edit", 2), ("gen", 2)):  # a random judge: every candidate judged, kept or logged with its answers
        kept = rows(out / kind / "curated.jsonl") if (out / kind / "curated.jsonl").is_file() else []
        failed = rows(out / kind / "curated_failures.jsonl") if (out / kind / "curated_failures.jsonl").is_file() else []
        assert len(kept) + len(failed) == n
        assert all(r["answers"] and r["failed_modes"] for r in failed)
