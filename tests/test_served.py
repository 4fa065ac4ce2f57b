"""Critics served by an inference engine: reward.ServedCritic against a REAL OpenAI-compatible server,
`transformers serve` on 127.0.0.1 with the tiny critic (tests/served.py), and every script naming it one way.

The same answers as in process; many clients in flight lose nothing; a wrong served name, a refused key and a
server that cannot sample n answers are clear errors; a server that dies costs counted failures and a skipped
step, not the run; rl_gen, rl_edit, bench and curate score through it; the API key reaches no file and no log.
"""

import http.server
import json
import random
import threading

import pytest
import torch

import bench
import common
import curate
import reward
import rl_edit
import rl_gen
import toy
from common import load_image, read_jsonl
from served import Served

pytestmark = pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
torch.set_num_threads(1)
TOKENS = 12  # answers of the untrained tiny critic are garbage: short ones keep the tests fast


@pytest.fixture(scope="module")
def server(critic_base):
    srv = Served(critic_base)
    yield srv
    srv.stop()


def bench_items(mini_data, mode, n):
    name = {"execution": "edit_execution", "consistency": "edit_consistency"}.get(mode, "gen")
    rows, base = read_jsonl(mini_data / "bench" / f"{name}.jsonl")[:n], mini_data / "bench"
    return [{**{k: load_image(r[k], base) for k in reward.IMAGE_FIELDS[mode]}, "instruction": r.get("instruction"),
             "prompt": r.get("prompt"), "record": r} for r in rows]  # the record: for the world's judges, ignored here


def test_served_greedy_answers_equal_the_in_process_ones(server, critic_base, mini_data):
    local = reward.open_critic(str(critic_base), device="cpu", max_new_tokens=TOKENS)
    served = reward.open_critic(server.spec, max_new_tokens=TOKENS)
    assert isinstance(local, reward.Critic) and isinstance(served, reward.ServedCritic)
    for mode, n in (("execution", 3), ("instruction", 2)):
        items = bench_items(mini_data, mode, n)
        a, b = local.score(mode, items), served.score(mode, items)
        # transformers serve strips the answer's outer whitespace; the tokens are the same
        assert [j.text.strip() for j in a] == [j.text for j in b]
        assert [(j.scores, j.ok, j.how) for j in a] == [(j.scores, j.ok, j.how) for j in b]


def test_the_only_served_model_is_found_when_the_url_names_none(server):
    assert reward.open_critic(server.url).model == server.model


def test_many_clients_with_many_requests_in_flight_lose_nothing(server, mini_data):
    items = bench_items(mini_data, "execution", 4)
    want = [j.text for j in reward.open_critic(server.spec, max_new_tokens=TOKENS).score("execution", items)]
    results, start = {}, threading.Barrier(4)

    def client(k):  # 4 clients (RL ranks) x 3 requests, each request 4 items, 4 in flight per client
        critic = reward.open_critic(server.spec, max_new_tokens=TOKENS, concurrency=4)
        start.wait()
        results[k] = [[j.text for j in critic.score("execution", items)] for _ in range(3)]
    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(results) == [0, 1, 2, 3] and all(r == [want] * 3 for r in results.values())


def test_a_wrong_served_name_says_what_is_served_and_a_wrong_url_that_nothing_answers(server, monkeypatch):
    with pytest.raises(reward.CriticServerError, match=r"does not serve 'firm-edit'; it serves \['.*critic-base'\]"):
        reward.open_critic(server.url + "#firm-edit")
    monkeypatch.setattr(reward.time, "sleep", lambda s: None)
    with pytest.raises(reward.CriticServerError, match=r"no critic server answers at http://127.0.0.1:9/v1"):
        reward.open_critic("http://127.0.0.1:9/v1#firm-edit")


def test_several_samples_and_soft_scores_need_a_server_that_gives_them(server, mini_data):
    critic = reward.open_critic(server.spec, max_new_tokens=TOKENS)
    with pytest.raises(reward.CriticServerError, match=r"asked for 3 answers \(n\), got 1"):
        critic.score("execution", bench_items(mini_data, "execution", 1), samples=3)
    with pytest.raises(reward.CriticServerError, match="logprobs"):  # transformers serve returns no logprobs (vLLM does)
        critic.score("execution", bench_items(mini_data, "execution", 1), method="soft")
    with pytest.raises(ValueError, match="needs the critic in process"):
        critic.score("execution", bench_items(mini_data, "execution", 1), method="expected")


def test_a_refused_key_is_a_clear_error(monkeypatch):
    """transformers serve checks no key, so this one path runs against a stand-in that answers 401 as vLLM does
    when started with --api-key."""
    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b'{"error": "Unauthorized"}')

        def log_message(self, *args):
            pass
    srv = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv(reward.API_KEY_ENV, "not-the-key")
    try:
        with pytest.raises(reward.CriticServerError, match=r"HTTP 401, the key was refused \(\$FIRM_CRITIC_API_KEY holds"):
            reward.open_critic(f"http://127.0.0.1:{srv.server_address[1]}/v1#firm-edit")
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_server_that_dies_gives_counted_failures_not_an_exception(critic_base, mini_data, monkeypatch):
    srv = Served(critic_base)
    critic = reward.open_critic(srv.spec, max_new_tokens=TOKENS, retries=2)
    srv.stop()
    monkeypatch.setattr(reward.time, "sleep", lambda s: None)  # the backoff between retries
    rewards, stats = reward.edit_rewards(critic, bench_items(mini_data, "execution", 3))
    assert rewards == [None] * 3 and stats["failed"] == 3 and stats["parse_failures"] == {"execution": 3, "consistency": 3}
    assert "no answer after 3 tries" in stats["errors"][0] and srv.url in stats["errors"][0]


# -----------------------------------------------------------------------------
# the scripts, each naming the served critic as URL#name


@pytest.fixture(scope="module")
def tiny_gen(tmp_path_factory):
    root = tmp_path_factory.mktemp("served-gen")
    toy.main(["pretrain-gen", "--out", str(root / "gen"), "--steps", "2", "--batch-size", "4", "--size", "16"])
    return root / "gen"


def gen_args(gen, mini_data, out, critic, *extra):
    rl = mini_data / "rl"
    return rl_gen.get_args(["--preset", "mini", "--model", str(gen), "--prompts", str(rl / "gen_train.jsonl"),
                            "--test-prompts", str(rl / "gen_test.jsonl"), "--reward", "qma", "--reward-model", critic,
                            "--reward-max-new-tokens", str(TOKENS), "--out", str(out), "--prompts-per-step", "2",
                            "--group-size", "2", "--rollout-steps", "2", "--timestep-fraction", "0.5", "--eval-prompts",
                            "2", "--eval-every", "1", "--micro-batch", "4", *extra])


def test_rl_gen_runs_steps_against_the_served_critic(server, tiny_gen, mini_data, tmp_path):
    rl_gen.main(gen_args(tiny_gen, mini_data, tmp_path / "run", server.spec, "--steps", "2"))
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["reward_fail"] == 4 for r in rows)  # the untrained critic
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


def test_a_critic_server_that_dies_mid_run_skips_steps_and_the_run_goes_on(critic_base, tiny_gen, mini_data, tmp_path,
                                                                          monkeypatch, capsys):
    srv, opened = Served(critic_base), reward.ServedCritic.__init__

    def open_then_kill(self, *args, **kwargs):  # the run starts against a live server, which then dies
        opened(self, *args, **kwargs)
        srv.stop()
    monkeypatch.setattr(reward.ServedCritic, "__init__", open_then_kill)
    monkeypatch.setattr(reward.time, "sleep", lambda s: None)
    rl_gen.main(gen_args(tiny_gen, mini_data, tmp_path / "run", srv.spec, "--steps", "2"))
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["reward_fail"] == 4 and r["reward"] is None for r in rows)
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()  # the run finished and saved
    assert "4 of 4 rewards failed (8 not answered by the server): " in capsys.readouterr().out  # and said why


def test_rl_edit_scores_through_the_served_critic_and_its_key_reaches_no_file_and_no_log(server, mini_data, tmp_path,
                                                                                          monkeypatch, capfd):
    editor = tmp_path / "editor"
    rng = random.Random(0)
    toy.build_tiny_editor(str(editor), [toy.edit_triple(rng)[3] for _ in range(200)] +
                          [rl_edit.SYSTEM_PREFIX + rl_edit.USER_TURN] * 20, layers=1, heads=2, head_dim=24)
    secret = "sk-3f9c1d-never-written-anywhere"
    monkeypatch.setenv(reward.API_KEY_ENV, secret)  # sent as a bearer header (transformers serve ignores it)
    out, rl = tmp_path / "run", mini_data / "rl"
    rl_edit.main(rl_edit.get_args(["--model", str(editor), "--prompts", str(rl / "edit_train.jsonl"), "--test-prompts",
                                   str(rl / "edit_test.jsonl"), "--out", str(out), "--reward", "cme", "--reward-model",
                                   server.spec, "--reward-max-new-tokens", str(TOKENS), "--prompts-per-step", "1",
                                   "--group-size", "2", "--micro-batch", "2", "--rollout-steps", "2", "--eval-steps", "2",
                                   "--eval-prompts", "1", "--eval-every", "100", "--steps", "1", "--threads", "1"]))
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows[-1]["step"] == 1 and rows[-1]["reward_fail"] == 2  # scored by the server: garbage, counted
    files = [f for f in out.rglob("*") if f.is_file()]
    assert {"eval.jsonl", "metrics.jsonl", "pytorch_lora_weights.json"} <= {f.name for f in files}
    assert not [f for f in files if secret.encode() in f.read_bytes()]
    logged = capfd.readouterr()
    assert secret not in logged.out + logged.err


def test_bench_scores_a_served_critic_and_writes_gen_predictions_in_the_releases_schema(server, mini_data, tmp_path):
    out = tmp_path / "bench"
    bench.main(["critics", "--bench-dir", str(mini_data / "bench"), "--out", str(out), "--limit", "2",
                "--max-new-tokens", str(TOKENS), "--critic", f"served={server.spec}"])
    res = json.loads((out / "critics.json").read_text())["critics"]["served"]["metrics"]
    assert res["gen_overall"]["n"] == 2 and res["edit_overall"]["n"] == 4
    release = read_jsonl(out / "preds" / "served" / "gen_release.jsonl")  # what the release's gen_mae.py reads
    for r in release:
        assert set(r) == {"id", "image", "prompt", "instruction_following"} and isinstance(r["image"], list)
        assert r["instruction_following"]["score"][0] in (1, 2, 3, 4, 5)


def test_curate_judges_through_the_served_model(server, mini_data, tmp_path):
    rows = read_jsonl(mini_data / "bench" / "edit_execution.jsonl")[:2]
    cands = mini_data / "bench" / "served-cands.jsonl"
    cands.write_text("".join(json.dumps({k: r[k] for k in ("id", "source", "edited", "instruction")}) + "\n" for r in rows))
    try:
        common.run_stage(curate.main, curate.get_args(["--judge", server.spec, "--edit-candidates", str(cands),
                                                       "--max-new-tokens", "6", "--balance-share", "0",
                                                       "--ablation-direct", "0", "--out", str(tmp_path / "out")]))
    finally:
        cands.unlink()
    judged = read_jsonl(tmp_path / "out" / "edit" / "curated_failures.jsonl")  # a random judge: garbage, logged
    assert {r["id"] for r in judged} == {rows[0]["id"], rows[1]["id"]} and all(r["answers"] for r in judged)
