"""rl_gen.py: the DiffusionNFT quantities against hand-computed values, the sampler against closed-form flows,
one RL step under python and under 2-process torchrun, resuming, and loading the saved LoRA into diffusers."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import common
import rl_gen as R
from tests.conftest import ROOT

# -----------------------------------------------------------------------------
# advantages and the optimality probability


def test_advantage_uses_group_mean_and_global_std():
    # groups {1, 0} and {0.5, 0.5}: means 0.5 and 0.5; population std of all four = sqrt(0.125)
    adv = R.group_advantages([1.0, 0.0, 0.5, 0.5], ["a", "a", "b", "b"])
    std = math.sqrt(0.125)
    assert adv.tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0])


def test_advantage_group_mean_is_per_prompt_not_global():
    # group a is all-high, group b all-low: per-group means make every advantage 0 (global mean would not)
    adv = R.group_advantages([0.9, 0.9, 0.1, 0.1], [0, 0, 1, 1])
    assert adv.tolist() == pytest.approx([0.0] * 4)


def test_failed_rewards_are_dropped_from_their_group_and_from_the_std():
    adv = R.group_advantages([1.0, None, 0.0, float("nan"), 0.5, 0.5], [0, 0, 0, 1, 1, 1])
    assert math.isnan(adv[1]) and math.isnan(adv[3])
    std = torch.tensor([1.0, 0.0, 0.5, 0.5], dtype=torch.float64).std(unbiased=False).item()
    # group 0 mean over the valid {1, 0} = 0.5; group 1 mean over {0.5, 0.5}
    assert adv[[0, 2, 4, 5]].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0])


def test_all_rewards_failed_gives_all_nan():
    assert torch.isnan(R.group_advantages([None, None], [0, 0])).all()


def test_advantages_are_clipped():
    # one outlier among many equal rewards: its advantage exceeds 5 before clipping
    adv = R.group_advantages([1.0] + [0.0] * 99, [0] * 100, clip=5.0)
    assert adv[0].item() == 5.0 and adv[1].item() > -5.0


def test_optimality_probability_is_half_plus_a_tenth_of_the_advantage_and_clipped():
    r = R.optimality_probability(torch.tensor([-7.0, -5.0, -2.5, 0.0, 1.0, 5.0, 9.0]))
    assert r.tolist() == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0])


# -----------------------------------------------------------------------------
# v+ / v-, the NFT loss, the KL term


def test_nft_velocities_hand_values():
    v, v_old = torch.tensor([2.0]), torch.tensor([1.0])
    vp, vn = R.nft_velocities(v, v_old, nft_beta=1.0)
    assert (vp.item(), vn.item()) == (2.0, 0.0)  # v+ = v, v- = 2 v_old - v
    vp, vn = R.nft_velocities(v, v_old, nft_beta=0.5)
    assert (vp.item(), vn.item()) == (1.5, 0.5)  # 0.5 v + 0.5 v_old, 1.5 v_old - 0.5 v


def _toy_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t = torch.tensor([0.3, 0.8])
    return x0, eps, t, R.rectified_flow_interp(x0, eps, t)


def test_nft_loss_is_zero_at_its_optimum_for_r_one_and_r_zero():
    x0, eps, t, _ = (x.double() for x in _toy_batch())  # float64: at the optimum the weights hit their floor
    x_t = R.rectified_flow_interp(x0, eps, t)
    v_star = eps - x0  # the velocity that reproduces x0 exactly
    v_old = torch.randn_like(v_star)
    for beta in (1.0, 0.4):
        # r = 1: the positive velocity must equal v*, i.e. v = (v* - (1 - beta) v_old) / beta
        v = ((v_star - (1 - beta) * v_old) / beta).requires_grad_()
        loss = R.nft_loss(v, v_old, x_t, x0, t, torch.ones(2), nft_beta=beta)
        loss.sum().backward()
        assert loss.abs().max() < 1e-8 and v.grad.abs().max() < 1e-6
        # r = 0: the implicit negative velocity must equal v*, i.e. v = ((1 + beta) v_old - v*) / beta
        v = (((1 + beta) * v_old - v_star) / beta).requires_grad_()
        loss = R.nft_loss(v, v_old, x_t, x0, t, torch.zeros(2), nft_beta=beta)
        loss.sum().backward()
        assert loss.abs().max() < 1e-8 and v.grad.abs().max() < 1e-6


def test_nft_loss_hand_value_at_the_old_policy():
    # v = v_old: x0+ = x0- = x_t - t v_old; per sample L = 5 * mean(d^2) / mean|d|, d = x0_hat - x0
    x0 = torch.zeros(1, 1, 1, 2)
    x_t = torch.tensor([[[[1.0, 2.0]]]])
    v_old = torch.zeros(1, 1, 1, 2)  # x0_hat = x_t, d = (1, 2)
    loss = R.nft_loss(v_old.clone(), v_old, x_t, x0, torch.tensor([0.5]), torch.tensor([0.7]))
    assert loss.item() == pytest.approx(5 * 2.5 / 1.5)


def test_average_sample_gives_no_gradient_at_the_old_policy():
    # r = 0.5 (advantage 0): the positive and negative terms pull equally and oppositely
    x0, eps, t, x_t = _toy_batch(1)
    v_old = torch.randn_like(x0)
    v = v_old.clone().requires_grad_()
    R.nft_loss(v, v_old, x_t, x0, t, torch.full((2,), 0.5)).sum().backward()
    assert v.grad.abs().max() < 1e-6
    v.grad = None  # r = 1: a small step against the gradient moves x0_hat towards the sample
    R.nft_loss(v, v_old, x_t, x0, t, torch.ones(2)).sum().backward()
    d = R.x0_from_v(x_t, v_old, t) - x0
    new_x0 = R.x0_from_v(x_t, v - 1e-3 * v.grad, t)
    assert (new_x0 - x0).pow(2).sum() < d.pow(2).sum()


def test_adaptive_weight_is_mean_abs_error_with_a_floor_and_no_gradient():
    x0 = torch.zeros(2, 1, 1, 2)
    pred = torch.tensor([[[[1.0, -3.0]]], [[[0.0, 0.0]]]], requires_grad=True)
    w = R.adaptive_weight(pred, x0)
    assert w.flatten().tolist() == pytest.approx([2.0, 1e-5]) and not w.requires_grad


def test_kl_loss_is_per_sample_mse_to_the_base_velocity():
    v = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    assert R.kl_loss(v, torch.zeros(2, 2)).tolist() == [5.0, 0.0]


# -----------------------------------------------------------------------------
# schedules, EMA, rectified flow


def test_old_policy_decay_schedule():
    assert [R.old_policy_decay(s) for s in (0, 1, 100, 500, 5000)] == pytest.approx([0.0, 0.001, 0.1, 0.5, 0.5])


def test_ema_decay_schedule():
    assert [R.ema_decay(s) for s in (0, 1, 10, 80, 1000)] == pytest.approx([0.1, 2 / 11, 11 / 20, 0.9, 0.9])


def test_ema_update_in_place():
    tgt, src = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]
    R.ema_update_(tgt, src, 0.75)
    assert tgt[0].tolist() == [1.5, 3.0]


# -----------------------------------------------------------------------------
# the update both RL scripts take (rl_gen.nft_step), on a stand-in velocity network


def _update_setup(kl_weight=1e-4):
    from types import SimpleNamespace
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 4)
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    old, ema, ref = common.clone_weights(params), common.clone_weights(params), common.clone_weights(params)
    x0, x_t, ts = torch.randn(3, 4), torch.randn(3, 2, 4), torch.rand(3, 2) * 0.8 + 0.1
    micro = [(lambda x, t: net(x), x_t, ts, x0, torch.tensor([0.9, 0.1, 0.5]), torch.ones(3))]
    args = SimpleNamespace(nft_beta=1.0, kl_weight=kl_weight, grad_clip=1.0)
    return net, params, opt, old, ema, ref, micro, args


def test_a_step_without_any_reward_changes_nothing():
    # AdamW on a zero gradient would still move the weights (momentum, weight decay): the step is skipped whole
    net, params, opt, old, ema, ref, micro, args = _update_setup()
    before = common.clone_weights(params)
    logged = R.nft_step(net, params, opt, old, ema, ref, micro, torch.zeros(3, dtype=torch.bool), 0, args, 1)
    assert logged == {"loss": None, "nft": None, "kl": None, "grad_norm": None}
    assert all(torch.equal(a, b) for a, b in zip(params, before)) and not opt.state
    assert all(torch.equal(a, b) for w in (old, ema) for a, b in zip(w, before))


def test_soft_updates_count_the_optimizer_steps_done():
    net, params, opt, old, ema, ref, micro, args = _update_setup()
    old0, step = common.clone_weights(params), 7
    R.nft_step(net, params, opt, old, ema, ref, micro, torch.ones(3, dtype=torch.bool), step, args, 1)
    d_old, d_ema = R.old_policy_decay(step + 1), R.ema_decay(step + 1)  # 0.008 and 9/18 (release: post-increment)
    assert d_old == pytest.approx(0.008) and d_ema == pytest.approx(0.5)
    for p, o, e, p0 in zip(params, old, ema, old0):
        assert torch.allclose(o, d_old * p0 + (1 - d_old) * p.detach()) and torch.allclose(e, d_ema * p0 + (1 - d_ema) * p.detach())


def test_the_loss_scale_and_the_advantage_clip_are_one_number():
    import inspect
    default = lambda f, name: inspect.signature(f).parameters[name].default
    assert default(R.nft_loss, "scale") == default(R.group_advantages, "clip") == default(R.optimality_probability, "clip") == R.ADV_CLIP == 5.0
    v, v_old, x_t, x0, t = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0.3, 0.7])
    assert torch.allclose(R.nft_loss(v, v_old, x_t, x0, t, torch.tensor([1.0, 0.0])),
                          R.nft_loss(v, v_old, x_t, x0, t, torch.tensor([1.0, 0.0]), scale=1.0) * 5)


def _update_path(module, rewards, groups, x0, levels, seeds, T):
    """One RL step's steps 3-5 as the script `module` takes them (its own imported names), on a stand-in network."""
    net, params, opt, old, ema, ref, _, args = _update_setup()
    r, valid = module.optimality_targets(rewards, groups)
    ts, x_t = module.training_points(x0, levels, seeds, T)
    micro = [(lambda x, t: net(x), x_t, ts, x0, r, valid.float())]
    logged = module.nft_step(net, params, opt, old, ema, ref, micro, valid, 0, args, 1)
    return [p.detach().clone() for p in (*params, *ema, *old)], logged


def test_the_same_stand_in_model_through_both_scripts_update_paths_ends_with_identical_parameters():
    import rl_edit
    rewards, groups = [0.1, 0.9, None, 0.4, 0.6, 0.2], [0, 0, 0, 1, 1, 1]  # one failed reward: weight 0
    x0, levels = torch.randn(6, 4), torch.tensor([1.0, 0.8, 0.5, 0.2], dtype=torch.float64)
    seeds = [common.sample_seed(0, 0, j) for j in range(6)]
    gen, logged_gen = _update_path(R, rewards, groups, x0, levels, seeds, 2)
    edit, logged_edit = _update_path(rl_edit, rewards, groups, x0, levels, seeds, 2)
    assert all(torch.equal(a, b) for a, b in zip(gen, edit)) and logged_gen == logged_edit
    assert logged_gen["loss"] is not None and math.isfinite(logged_gen["loss"])


def test_training_points_use_the_rollouts_own_levels_and_depend_on_the_seed_only():
    x0, levels = torch.randn(3, 2, 4), torch.tensor([1.0, 0.8, 0.5, 0.2], dtype=torch.float64)
    ts, x_t = R.training_points(x0, levels, [7, 8, 9], 3)
    assert ts.shape == (3, 3) and x_t.shape == (3, 3, 2, 4)
    assert all(sorted(row.tolist()) == sorted(set(row.tolist())) and set(row.tolist()) <= set(levels.float().tolist()) for row in ts)
    ts1, x_t1 = R.training_points(x0[1:2], levels, [8], 3)  # sample 8 alone: the same levels and noise
    assert torch.equal(ts1[0], ts[1]) and torch.allclose(x_t1[0], x_t[1])


def test_x0_from_v_inverts_the_interpolation():
    x0, eps, t, x_t = _toy_batch()
    assert torch.allclose(R.x0_from_v(x_t, eps - x0, t), x0, atol=1e-6)


def _levels(steps, shift=1.0):
    from diffusers import FlowMatchEulerDiscreteScheduler
    return R.noise_levels(FlowMatchEulerDiscreteScheduler(shift=shift), steps)


def test_noise_levels_are_the_release_sd35_schedule():
    # the release samples SD3.5-Medium on its scheduler's sigmas (set_timesteps(10), shift 3), not on a shifted
    # linspace(1, 0, 11) (which gives [1, .964, ..., .429, .25, 0]: one jump from .25 to the clean image)
    release = [1.0, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.2780, 0.0089, 0.0]
    assert _levels(10, shift=3.0).tolist() == pytest.approx(release, abs=1e-4)


def test_noise_levels_follow_the_saved_sd35_scheduler_config(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler
    # stable-diffusion-3.5-medium/scheduler/scheduler_config.json, as the hub ships it
    (tmp_path / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.31.0.dev0", "base_image_seq_len": 256,
        "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000,
        "shift": 3.0, "shift_terminal": None, "use_beta_sigmas": False, "use_dynamic_shifting": False,
        "use_exponential_sigmas": False, "use_karras_sigmas": False}))
    levels = R.noise_levels(FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path), 10)
    assert levels.tolist() == pytest.approx(_levels(10, shift=3.0).tolist()) and levels[-2] < 0.01


# -----------------------------------------------------------------------------
# the sampler on stand-in networks with closed-form velocities (on a uniform grid of noise levels)


def _uniform(steps):
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def test_sampler_is_exact_for_a_point_mass():
    # data = one point c: v(x, t) = (x - c) / t exactly, x0_hat = c at every step
    c = torch.randn(3, 2, 2)
    x_T = torch.randn(4, 3, 2, 2)
    x0, xs = R.ode_sample(lambda x, t: (x - c) / t.view(-1, 1, 1, 1), x_T, _uniform(10))
    assert len(xs) == 11 and torch.allclose(x0, c.expand_as(x0), atol=1e-5)
    assert torch.allclose(xs[5], R.rectified_flow_interp(c, x_T, _uniform(10)[5].item()), atol=1e-5)


def _gaussian_velocity(mu, s):
    """Data N(mu, s^2): E[x0 | x_t] is linear in x_t; v = (x_t - E[x0 | x_t]) / t. The flow maps eps to mu + s eps."""
    def v(x, t):
        t = t.view(-1, 1, 1, 1).double()
        a = 1 - t
        x0_hat = mu + a * s ** 2 * (x - a * mu) / (a ** 2 * s ** 2 + t ** 2)
        return (x - x0_hat) / t
    return v


def _euler(f, x, ts):
    for t, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
        x = x + (t_next - t) * f(x, torch.full((x.shape[0],), t))
    return x


def test_sampler_reproduces_the_closed_form_gaussian_flow_and_beats_euler():
    f = _gaussian_velocity(0.7, 0.3)
    eps = torch.linspace(-3, 3, 13, dtype=torch.float64).view(1, 13, 1, 1)
    exact = 0.7 + 0.3 * eps
    err = {n: (R.ode_sample(f, eps, _uniform(n))[0] - exact).abs().max().item() for n in (10, 40)}
    euler10 = (_euler(f, eps, _uniform(10)) - exact).abs().max().item()
    assert err[40] < 0.01 and err[10] < 0.1 and err[40] < err[10] and err[10] < 0.5 * euler10


# -----------------------------------------------------------------------------
# prompts and ranks (common.py's RL plumbing)


def test_each_prompt_is_used_once_per_epoch_and_the_schedule_is_deterministic():
    steps = [common.step_prompts(10, 5, s, seed=3) for s in range(4)]
    assert sorted(steps[0] + steps[1]) == list(range(10)) and sorted(steps[2] + steps[3]) == list(range(10))
    assert steps == [common.step_prompts(10, 5, s, seed=3) for s in range(4)]


def test_group_size_need_not_divide_the_world():
    n, world = 3 * 4, 5  # 3 prompts x 4 samples on 5 ranks, micro-batch 2
    plans = [common.rank_batches([0] * n, r, world, 2) for r in range(world)]
    assert sorted(j for p in plans for b, real in p if real for j in b) == list(range(n))  # each sample once
    assert len({len(p) for p in plans}) == 1  # the same number of forward passes on every rank


def test_sample_seeds_depend_on_global_ids_only():
    assert common.sample_seed(0, 3, 17) == common.sample_seed(0, 3, 17) != common.sample_seed(0, 3, 18)


def test_critic_parse_failures_become_none_not_a_number():
    from PIL import Image
    from reward import Judgement, qma

    class HalfBrokenCritic:  # answers every other item with text that does not parse
        def __init__(self):
            self.sizes = []

        def score(self, mode, items, method="generate", samples=1):
            self.sizes += [it["image"].size for it in items]
            good = Judgement([4] if mode == "instruction" else [5, 4, 3], "ok", True)
            return [good if i % 2 == 0 else Judgement(None, "garbage", False, "no score found") for i in range(len(items))]

    critic = HalfBrokenCritic()
    rewards = R.score(critic, "qma", [{"prompt": "a red circle"}] * 3, [Image.new("RGB", (32, 32))] * 3, size=64)
    assert rewards == [qma(4, [5, 4, 3]), None, qma(4, [5, 4, 3])]
    assert set(critic.sizes) == {(64, 64)}  # upsampled for the critic
    assert math.isnan(R.group_advantages(rewards, [0, 0, 0])[1])


# -----------------------------------------------------------------------------
# the tiny model: one RL step, resume, torchrun, diffusers loading


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, mini_data):
    """A 16 px tiny SD3 generator (2 pre-training steps) and a small prompt file."""
    import toy
    root = tmp_path_factory.mktemp("rl_gen")
    toy.main(["pretrain-gen", "--out", str(root / "gen"), "--steps", "2", "--batch-size", "4", "--size", "16"])
    return root, mini_data / "rl" / "gen_train.jsonl", mini_data / "rl" / "gen_test.jsonl"


def _args(tiny, out, *extra):
    root, train, test = tiny
    return ["--preset", "mini", "--model", str(root / "gen"), "--prompts", str(train), "--test-prompts", str(test),
            "--reward-model", "toy.judges:pixel", "--reward-image-size", "0", "--out", str(out), "--prompts-per-step", "2", "--group-size", "3", "--rollout-steps", "3",
            "--timestep-fraction", "0.67", "--eval-prompts", "3", "--eval-every", "1", "--micro-batch", "4", *extra]


def test_rl_step_runs_saves_resumes_identically_and_the_lora_loads_into_diffusers(tiny):
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file
    root = tiny[0]
    R.main(R.get_args(_args(tiny, root / "a", "--steps", "2")))
    R.main(R.get_args(_args(tiny, root / "b", "--steps", "1")))  # killed after step 1 ...
    R.main(R.get_args(_args(tiny, root / "b", "--steps", "2", "--resume")))  # ... and continued
    a, b = load_file(root / "a" / "pytorch_lora_weights.safetensors"), load_file(root / "b" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in open(root / "b" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["reward"]) for r in rows)
    for name in ("reward_curve.png", "samples_grid.png", "pytorch_lora_weights.json", "eval.jsonl"):
        assert (root / "a" / name).is_file()
    # the saved LoRA = the EMA, readable by a plain diffusers pipeline, with its alpha / rank scale
    pipe = StableDiffusion3Pipeline.from_pretrained(root / "gen", vae=None, text_encoder_3=None, tokenizer_3=None)
    x, e, p, t = torch.randn(2, 3, 16, 16), torch.randn(2, 32, 64), torch.randn(2, 64), torch.tensor([300.0, 900.0])
    base = pipe.transformer(x, e, p, t).sample
    pipe.load_lora_weights(root / "a")
    tuned = pipe.transformer(x, e, p, t).sample
    gen = R.load_generator(root / "gen", device="cpu")
    from peft import LoraConfig
    gen.transformer.add_adapter(LoraConfig(r=32, lora_alpha=64, target_modules=R.LORA_TARGETS))
    ema = load_file(root / "a" / "checkpoint" / "ema.safetensors")
    assert not gen.transformer.load_state_dict(ema, strict=False).unexpected_keys
    assert not torch.allclose(tuned, base) and torch.allclose(tuned, gen.transformer(x, e, p, t).sample, atol=1e-6)


def test_generate_is_independent_of_batching(tiny):
    gen = R.load_generator(tiny[0] / "gen", device="cpu")
    prompts = ["Draw a large red circle at the center, on a white background."] * 3
    one = R.generate(gen, prompts, [5, 6, 7], steps=3, batch_size=1)
    three = R.generate(gen, prompts[1:], [6, 7], steps=3, batch_size=3)
    assert [im.tobytes() for im in one[1:]] == [im.tobytes() for im in three]


def test_torchrun_two_ranks_train_the_same_policy_as_one(tiny, tmp_path):
    # 3 prompts x 3 samples on 2 ranks: rank 0 holds samples 0-3, rank 1 holds 4-8, so prompt 1's group is split
    # across the ranks (rewards are gathered before the advantages); rank 0 also pads to 5 forward passes
    from safetensors.torch import load_file
    args = ["--steps", "1", "--prompts-per-step", "3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "rl_gen.py"),
           *_args(tiny, tmp_path / "two", *args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    R.main(R.get_args(_args(tiny, tmp_path / "one", *args)))
    two, one = ([json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")] for d in ("two", "one"))
    assert len(two) == 1 and two[0]["reward_fail"] == 0 and two[0]["reward"] == one[0]["reward"]  # same samples
    a, b = (load_file(tmp_path / d / "pytorch_lora_weights.safetensors") for d in ("two", "one"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # up to summation order


TIMESTEP_SCRIPT = r"""
import types, torch, torch.distributed as dist
from diffusers import SD3Transformer2DModel
from torch.distributed.fsdp import MixedPrecisionPolicy
import common, rl_gen
rank, world, device = common.setup_dist()
# the policy fsdp_shard applies on a GPU (bf16 compute, fp32 reduction), here on the CPU's gloo ranks
gpu_policy = lambda device, cast_inputs=True: MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                                   cast_forward_inputs=cast_inputs)
common.mixed_precision = rl_gen.mixed_precision = gpu_policy
torch.manual_seed(0)
tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                           num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8)
gen = types.SimpleNamespace(transformer=tr, compute_dtype=tr.dtype)
rl_gen.make_policy(gen, types.SimpleNamespace(full_finetune=False, seed=0, lora_rank=4, lora_alpha=8,
                                              gradient_checkpointing=False), device)
seen = {}
tr.time_text_embed.time_proj.register_forward_pre_hook(lambda m, a: seen.update(t=a[0]))  # what SD3 embeds
tr.transformer_blocks[0].register_forward_pre_hook(lambda m, a, k: seen.update(x=k["hidden_states"]), with_kwargs=True)
t = torch.tensor([0.96013, 0.85769], dtype=torch.float64)  # 1000 t: 960.13 and 857.69, which bf16 rounds to 960 and 856
v = rl_gen.velocity(tr, torch.randn(2, 4, 8, 8), t, torch.randn(2, 5, 16), torch.randn(2, 8), gen.compute_dtype)
assert gen.compute_dtype == torch.bfloat16 and seen["x"].dtype == torch.bfloat16, (gen.compute_dtype, seen["x"].dtype)
assert seen["t"].dtype == torch.float32 and torch.equal(seen["t"], (t * 1000).float()), seen["t"]
assert v.dtype == torch.float32 and v.isfinite().all()
print("ok", rank)
dist.destroy_process_group()
"""


def test_under_fsdp2_s_bf16_policy_sd3_computes_in_bf16_but_gets_its_timestep_in_fp32(tmp_path):
    # FSDP2 casts a module's floating inputs to its compute dtype; SD3 builds its sinusoidal timestep embedding in the
    # timestep's dtype, so a bf16 timestep would move 1000 t (857.69 -> 856) and the embedding's frequencies
    (tmp_path / "timestep.py").write_text(TIMESTEP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(tmp_path / "timestep.py")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.count("ok") == 2, res.stdout[-2000:] + res.stderr[-3000:]


def test_a_bf16_transformer_gets_its_timestep_in_fp32_as_in_the_diffusers_pipeline(tiny):
    # what bench.py policy runs on a GPU: the transformer loaded in bf16, no FSDP
    gen = R.load_generator(tiny[0] / "gen", device="cpu", dtype=torch.bfloat16)
    seen = []
    gen.transformer.time_text_embed.time_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    R.generate(gen, ["Draw a large red circle at the center, on a white background."], [0], steps=3)
    levels = R.noise_levels(gen.pipe.scheduler, 3)[:-1]
    assert gen.compute_dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in seen)
    assert [float(t[0]) for t in seen] == [float(x) for x in (levels * 1000).float()]


def test_a_full_fine_tune_is_saved_sharded_in_the_given_dtype_and_reloads(tmp_path):
    from diffusers import SD3Transformer2DModel
    from common import save_diffusers_model
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                               pooled_projection_dim=8, pos_embed_max_size=8)
    save_diffusers_model(tmp_path / "transformer", tr, tr.state_dict(), torch.bfloat16, max_shard_size="20KB")
    files = sorted(p.name for p in (tmp_path / "transformer").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    from safetensors.torch import load_file
    on_disk = [t.dtype for f in files if f.endswith(".safetensors") for t in load_file(tmp_path / "transformer" / f).values()]
    assert set(on_disk) == {torch.bfloat16}  # 2 bytes a weight, not the fp32 master weights' 4
    back = SD3Transformer2DModel.from_pretrained(tmp_path / "transformer", torch_dtype=torch.bfloat16)
    assert all(torch.equal(a, b.to(torch.bfloat16)) for a, b in zip(back.state_dict().values(), tr.state_dict().values()))
