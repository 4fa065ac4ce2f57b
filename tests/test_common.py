"""common.py: the process group's backends, intervals where 0 means never, rank-0 loading into shards, and the preset
line a stage logs."""

import argparse
import os
import subprocess
import sys

import torch

import common
from tests.conftest import ROOT


def test_a_gpu_process_group_has_gloo_for_cpu_tensors_beside_nccl():
    # NCCL alone has no CPU backend: a collective on a CPU tensor fails even in a world of one
    assert common.process_group_backend(cuda=True) == "cpu:gloo,cuda:nccl"
    assert common.process_group_backend(cuda=False) == "gloo"


def test_an_interval_of_zero_means_never():
    assert [s for s in range(1, 7) if common.every(s, 2)] == [2, 4, 6]
    assert not any(common.every(s, 0) for s in range(1, 7)) and not common.every(3, None)


def test_parameters_on_meta_cost_nothing_and_keep_buffers_and_ties():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight
            self.register_buffer("table", torch.arange(3.0), persistent=False)

    with common.parameters_on_meta():
        m = Tied()
    assert all(p.is_meta for p in m.parameters()) and m.head.weight is m.emb.weight
    assert m.table.tolist() == [0.0, 1.0, 2.0]  # no state dict carries it: it must be built for real
    assert not torch.nn.Linear(2, 2).weight.is_meta  # the patch ends with the block


SCRIPT = r"""
import torch, torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
import common
rank, world, device = common.setup_dist()
torch.manual_seed(0)
build = lambda: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
model = common.load_on_rank0(build, build, rank)  # rank 0: real weights; rank 1: meta skeleton
if rank == 1:
    assert all(p.is_meta for p in model.parameters())
full = common.full_state_of(model, rank)
common.fsdp_shard(model, list(model), device)
assert isinstance(model, FSDPModule) and all(isinstance(layer, FSDPModule) for layer in model)  # 2 ranks: sharded
common.fill_from_rank0(model, full, device)
out = model(torch.ones(1, 4))
torch.manual_seed(0)
assert torch.allclose(out, build()(torch.ones(1, 4)))  # every rank computes with rank 0's weights
print("ok", rank)
dist.destroy_process_group()
"""


def test_only_rank_0_reads_the_weights_and_every_rank_gets_its_shards(tmp_path):
    (tmp_path / "load.py").write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "load.py")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.count("ok") == 2, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_one_cpu_process_is_left_unsharded():
    # nothing to shard and fp32 on the CPU: FSDP2's hooks would only slow each step (benchmarks/bench_fsdp_one_process.py)
    from torch.distributed.fsdp import FSDPModule
    rank, world, device = common.setup_dist()
    assert world == 1 and device.type == "cpu"
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    assert common.fsdp_shard(model, list(model), device) is model
    assert not any(isinstance(m, FSDPModule) for m in model.modules())


def test_the_preset_line_shows_the_values_in_effect_and_marks_a_flag_that_overrode_one():
    presets = {"mini": {"out": "runs/mini/x", "epochs": 4.0}}
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--epochs", type=float)
    args = common.parse_with_preset(ap, presets, ["--preset", "mini", "--out", "elsewhere"])
    assert common.preset_line(args, presets) == "preset mini: out=elsewhere (preset: runs/mini/x), epochs=4.0"
