"""reward.py: fusions, the score parser, critic inference in process (generate / expected / ensemble), the CLI."""

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, GenerationConfig

import reward
from common import DataError
from reward import Critic, Judgement, cme, digit_expectation, edit_rewards, fuse, gen_rewards, parse_score, qma, weighted_sum

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def img(color=(200, 30, 30), size=64):
    return Image.new("RGB", (size, size), color)


def edit_items(n, tag=""):
    return [{"source": img((10 * i, 40, 90)), "edited": img((90, 10 * i, 40)),
             "instruction": f"Make the circle red{tag} {'now ' * i}", "requirement": None,
             "record": {"id": i, "toy": {"edit": "recolor"}}} for i in range(n)]  # critics ignore the record


# -----------------------------------------------------------------------------
# fusions (Sec 3.4), hand-computed


def test_cme_is_zero_when_execution_is_zero():
    assert all(cme(1, c) == 0.0 for c in (1, 2, 3, 4, 5, 4.7))


def test_cme_matches_hand_computed_values():
    assert cme(5, 5) == pytest.approx(1.0)
    assert cme(5, 1) == pytest.approx(0.6)  # full execution, nothing kept: the base only
    assert cme(3, 3) == pytest.approx(0.5 * (0.6 + 0.4 * 0.5))  # 0.4
    assert cme(4, 2) == pytest.approx(0.75 * 0.7)  # 0.525
    assert cme(4.2, 3.6) == pytest.approx(0.8 * (0.6 + 0.4 * 0.65))  # expected-score floats: 0.688


def test_fusions_clip_scores_outside_1_to_5():
    assert cme(7, 5) == 1.0 and cme(0, 5) == 0.0 and cme(5, 9) == 1.0 and cme(5, -3) == pytest.approx(0.6)
    assert qma(9, [9, 9, 9]) == 1.0 and qma(0, [5, 5, 5]) == 0.0
    assert weighted_sum(6, 6) == 1.0 and weighted_sum(0, 0) == 0.0


def test_qma_uses_the_minimum_quality_rating():
    assert qma(5, [5, 5, 5]) == pytest.approx(1.0)
    assert qma(5, [1, 5, 5]) == pytest.approx(0.4)  # a black silhouette keeps only the base
    assert qma(3, [4, 2, 5]) == pytest.approx(0.5 * (0.4 + 0.6 * 0.25))  # 0.275
    assert qma(1, [5, 5, 5]) == 0.0


def test_weighted_sums_match_hand_computed_values():
    assert fuse("sum55", {"execution": 5, "consistency": 1}) == pytest.approx(0.5)
    assert fuse("sum64", {"execution": 5, "consistency": 1}) == pytest.approx(0.6)
    assert fuse("sum64", {"execution": 1, "consistency": 5}) == pytest.approx(0.4)  # the no-op editor still earns 0.4
    assert weighted_sum(3, 4, 0.6) == pytest.approx(0.6 * 0.5 + 0.4 * 0.75)


def test_fuse_is_none_when_a_needed_score_is_missing_and_raises_on_anything_else():
    assert fuse("cme", {"execution": 5}) is None
    assert fuse("qma", {"instruction": 5}) is None
    assert fuse("instruction", {"instruction": 5, "quality": None}) == 1.0
    with pytest.raises(TypeError):  # a bug (quality must be 3 scores), not a parse failure to be dropped silently
        fuse("qma", {"instruction": 4, "quality": 3})
    with pytest.raises(ValueError, match="unknown fusion 'cmee'"):
        fuse("cmee", {"execution": 5, "consistency": 5})


# -----------------------------------------------------------------------------
# the parser on realistic messy answers

CORPUS = [  # (text, n, expected scores or None, how)
    ('{"reasoning": "The cat is now red.", "score": [4]}', 1, [4], "json"),
    ('Sure! Here is my judgement:\n```json\n{"reasoning": "ok", "score": [5]}\n```\nHope this helps.', 1, [5], "json"),
    ('{"reasoning": "fine", "score": 3}', 1, [3], "json"),
    ('{"reasoning": "fine", "score": "2"}', 1, [2], "json"),
    ('{"reasoning": "fine", "score": "[2]"}', 1, [2], "json"),
    ('{"reasoning": "fine", "score": [4.0]}', 1, [4], "json"),
    ('{"reasoning": "crisp", "score": [4, 5, 3]}', 3, [4, 5, 3], "json"),
    ('{"reasoning": "crisp", "score": "4, 5, 3"}', 3, [4, 5, 3], "json"),
    ('{"reasoning": "x", "score": [7]}', 1, None, "failed"),  # out of range: never clipped into a score
    ('{"reasoning": "x", "score": [0]}', 1, None, "failed"),
    ('{"reasoning": "x", "score": [3.5]}', 1, None, "failed"),
    ('{"reasoning": "x", "score": [4, 5]}', 3, None, "failed"),  # wrong count
    ('{"reasoning": "x", "score": NaN}', 1, None, "failed"),
    ('{"reasoning": "x", "score": true}', 1, None, "failed"),
    ('{"reasoning": "the score is 3 because", "score": [4', 1, [4], "pattern"),  # truncated JSON
    ('{"reasoning": "the edit removes the ca', 1, None, "failed"),  # truncated before any score
    ("1. red circle: yes\n2. top left: no\nOverall: main content right. \\boxed{4}", 1, [4], "boxed"),
    ("First guess \\boxed{2}, on reflection \\boxed{3}", 1, [3], "boxed"),
    ("\\boxed{6}", 1, None, "failed"),
    ("The score is 4.", 1, [4], "pattern"),
    ("Score: [3, 4, 5]", 3, [3, 4, 5], "pattern"),
    ("I would rate it 4/5.", 1, [4], "pattern"),
    ("Rating: 2 out of 5", 1, [2], "pattern"),
    ("score: 45", 1, None, "failed"),
    ("score: 4.5", 1, None, "failed"),
    ("The image looks nice.", 1, None, "failed"),
    ("", 1, None, "failed"),
    ("   \n", 1, None, "failed"),
    (None, 1, None, "failed"),
    # odd braces and brackets, several candidate numbers, numbers inside the reasoning, unicode digits
    ('{"reasoning": "uses {curly} and [square] brackets: {\\"a\\": 1}", "score": [3]}', 1, [3], "json"),
    ('{"reasoning": "3 objects, 2 moved, 1 of 5 kept; score 1 would be harsh", "score": [2]}', 1, [2], "json"),
    ('{"score": [2]} {"score": [5]}', 1, [2], "json"),  # the first object with a score, as the release reads
    ('{"reasoning": {"nested": {"score": 1}}, "score": [4]}', 1, [4], "json"),  # the outermost object's score
    ("{{{{ score: [[4]] }}}}", 1, None, "failed"),  # brackets in brackets: not a score we can vouch for
    ("Score 3. Actually, on reflection, the score is 5.", 1, [5], "pattern"),  # the last statement wins
    ('{"score": ["\uff14"]}', 1, None, "failed"),  # a full-width 4 is not one of the digits 1-5
    ("score: \u0664", 1, None, "failed"),  # an Arabic-Indic 4 neither
    ("\\boxed{ 5 }", 1, [5], "boxed"),
    ("\\boxed{four}", 1, None, "failed"),
    ('{"reasoning": "x", "score": 99999999999999999999999999}', 1, None, "failed"),
    ('{"reasoning": "x", "score": 1e400}', 1, None, "failed"),  # inf
    ("5/5 would be too much; 3/5.", 1, [3], "pattern"),
    ("45/50", 1, None, "failed"),
]


# Hostile answers: each must come back as a counted failure, quickly. Not a speed test: a regex that backtracks
# catastrophically takes hours on these, so the alarm only turns such a hang into a failure.
HOSTILE = {
    "JSON nested 3000 deep": '{"a":' * 3000,
    "a list nested 5000 deep": '{"score": ' + "[" * 5000,
    "100k opening braces": "{" * 99_000,
    "50k object starts": '{"' * 49_000,
    "an integer of 5000 digits": '{"score": ' + "9" * 5000 + "}",
    "score and 30k spaces": "score" + " " * 30_000 + "x",
    "score, colon and spaces around a bracket": "score:" + " " * 20_000 + "[" + " " * 20_000,
    "an unclosed boxed": "\\boxed{" + " " * 30_000,
    "a rating drowned in asterisks": "Final Alignment Rating" + " *" * 20_000,
    "a digit and 30k spaces before out of": "4" + " " * 30_000 + "out of",
    "20k score words": "score: x " * 10_000,
    "one megabyte": "x" * 1_000_000,
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_parse_score_never_raises_on_hostile_answers(name):
    import signal
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail(f"parse_score hung on {name}"))
    signal.alarm(60)
    try:
        for mode, n in (("execution", 1), ("instruction", 1), ("quality", 3)):
            p = parse_score(HOSTILE[name], n, mode)
            assert not p.ok and p.how == "failed" and p.error
    finally:
        signal.alarm(0)


def test_parse_score_never_raises_on_random_answers():
    """Random mixtures of the pieces answers are made of: every result is n scores in 1..5 or a failure with a reason."""
    import random
    rng = random.Random(0)
    pieces = ["{", "}", "[", "]", '"', ":", ",", " ", "\n", "score", '"score"', "\\boxed{", "Final Alignment Rating",
              "1", "3", "5", "7", "4.5", "/5", "out of", "NaN", "\uff14", "reasoning", "**", "\\", "null", "true", "-"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        for mode, n in (("execution", 1), ("instruction", 1), ("quality", 3)):
            p = parse_score(text, n, mode)
            assert (p.ok and len(p.scores) == n and all(s in (1, 2, 3, 4, 5) for s in p.scores)) or (not p.ok and p.error)


@pytest.mark.parametrize("text,n,scores,how", CORPUS)
def test_parse_score_on_messy_answers(text, n, scores, how):
    p = parse_score(text, n)
    assert (p.scores, p.how) == (scores, how)
    assert p.ok == (scores is not None) and (p.ok or p.error)  # every failure says why


# -----------------------------------------------------------------------------
# critic inference


def test_critic_messages_match_the_sft_records_exactly(mini_data):
    curated = {r["id"]: r for r in map(json.loads, (mini_data / "edit" / "curated.jsonl").read_text().splitlines())}
    curated |= {r["id"]: r for r in map(json.loads, (mini_data / "gen" / "curated.jsonl").read_text().splitlines())}
    for kind in ("edit", "gen"):
        for rec in map(json.loads, (mini_data / "sft" / f"{kind}_train.jsonl").read_text().splitlines()[:6]):
            row = curated[rec["id"].rsplit(":", 1)[0]]
            msgs = reward.critic_messages(rec["mode"], row.get("instruction", row.get("prompt")), row.get("requirement"))
            parts = msgs[0]["content"]
            assert [p["type"] for p in parts].count("image") == len(rec["images"])
            assert "".join(p["text"] if p["type"] == "text" else "<image>" for p in parts) == rec["messages"][0]["content"]


def test_prompt_templates_place_the_images_after_the_text_or_first_when_unmarked():
    turn = reward.build_prompt("execution", "Remove the cat.")
    assert turn.index("Remove the cat.") < turn.index("<image><image>") < turn.index("Rate EXECUTION")
    released = dict(reward.PROMPTS, execution="Instruction: {instruction}\nScore it.")  # a template with no markers
    assert reward.build_prompt("execution", "Remove the cat.", prompts=released) == "<image><image>Instruction: Remove the cat.\nScore it."
    with pytest.raises(ValueError, match="must mark 1 image"):
        reward.build_prompt("quality", prompts=dict(reward.PROMPTS, quality="<image><image>Rate it."))
    assert reward.content_parts("a<image>b<image>") == [{"type": "text", "text": "a"}, {"type": "image"},
                                                        {"type": "text", "text": "b"}, {"type": "image"}]


class StubLM(torch.nn.Module):
    """Stands in for the VLM: the same next-token logits at every position; records its inputs.
    generate() appends canned answers (cycled) instead of decoding."""

    def __init__(self, tok, logits=None, answers=(), eos=True):
        super().__init__()
        self.tok, self.logits, self.answers, self.seen, self.eos, self.configs = tok, logits, list(answers), [], eos, []
        self.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def forward(self, input_ids, attention_mask, logits_to_keep=0, **kw):
        self.seen.append((input_ids, attention_mask))
        return type("Out", (), {"logits": self.logits.expand(input_ids.shape[0], 1, -1)})

    def generate(self, input_ids, generation_config, **kw):
        self.configs.append(generation_config)
        n, limit = input_ids.shape[0] * generation_config.num_return_sequences, generation_config.max_new_tokens
        ans = [(self.tok.encode(self.answers[i % len(self.answers)], add_special_tokens=False) + [self.tok.eos_token_id] * self.eos)[:limit]
               for i in range(n)]
        width = max(map(len, ans))
        ans = torch.tensor([a + [self.tok.pad_token_id] * (width - len(a)) for a in ans])
        for proc in kw.get("logits_processor") or []:  # as generate calls them: once per generated position
            for _ in range(width):
                proc(None, self.logits.expand(n, -1))
        return torch.cat([input_ids.repeat_interleave(generation_config.num_return_sequences, 0), ans], 1)


@pytest.fixture(scope="module")
def processor(critic_base):
    return AutoProcessor.from_pretrained(critic_base)


def stub_critic(processor, **kw):
    tok = processor.tokenizer
    return Critic(model=StubLM(tok, **kw), processor=processor, device="cpu", batch_size=4)


def test_digit_expectation_matches_a_hand_computed_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5, -1.0, 3.0, 0.0]])  # digits 1..5 at ids 0..4, two other tokens
    e = [math.exp(x) for x in logits[0].tolist()]
    z = sum(e)
    p = [x / z for x in e[:5]]
    exp, mass = digit_expectation(logits, [0, 1, 2, 3, 4])
    assert mass.item() == pytest.approx(sum(p), rel=1e-6)
    assert exp.item() == pytest.approx(sum((k + 1) * pk for k, pk in enumerate(p)) / sum(p), rel=1e-6)


def test_expected_method_reads_the_digits_after_the_forced_prefix(processor):
    tok = processor.tokenizer
    V = len(tok)
    digits = [tok.convert_tokens_to_ids(str(k)) for k in range(1, 6)]
    logits = torch.full((V,), -1e4)
    logits[digits] = torch.tensor([0.0, 1.0, 2.0, 0.5, -1.0])
    logits[tok.convert_tokens_to_ids("}")] = 1.5  # some mass off the digits
    critic = stub_critic(processor, logits=logits)
    js = critic.score("execution", edit_items(3), method="expected")
    e = [math.exp(x) for x in [0.0, 1.0, 2.0, 0.5, -1.0]]
    want = sum((k + 1) * x for k, x in enumerate(e)) / sum(e)
    assert all(j.ok and j.how == "expected" and j.scores[0] == pytest.approx(want, rel=1e-5) for j in js)
    assert f"digit mass {sum(e) / (sum(e) + math.exp(1.5)):.3f}" in js[0].text
    ids, mask = critic.model.seen[-1]
    prefix = tok.encode(reward.ANSWER_PREFIX["execution"], add_special_tokens=False)
    assert ids[:, -len(prefix):].tolist() == [prefix] * 3 and mask[:, -1].tolist() == [1, 1, 1]


def test_expected_quality_forces_the_argmax_digit_before_the_next_score(processor):
    tok = processor.tokenizer
    critic = stub_critic(processor, logits=torch.zeros(len(tok)))
    prefix, slots, sep = critic.score_slots("quality")
    logits = torch.full((len(tok),), -1e4)
    logits[slots[0][2]] = logits[slots[1][2]] = 0.0  # "3" in the first slot, " 3" (or "3") in the later ones
    critic.model.logits = logits
    critic.model.seen.clear()
    j = critic.score("quality", [{"image": img(), "prompt": ""}], method="expected")[0]
    assert j.ok and j.scores == pytest.approx([3.0, 3.0, 3.0])
    assert len(critic.model.seen) == 3  # one forward pass per score
    third = critic.model.seen[2][0][0].tolist()
    assert third[-(len(prefix) + 2 * (1 + len(sep))):] == prefix + [slots[0][2]] + sep + [slots[1][2]] + sep


def test_expected_method_fails_when_the_critic_puts_little_mass_on_digits(processor):
    critic = stub_critic(processor, logits=torch.zeros(len(processor.tokenizer)))  # uniform: 5/V on digits
    j = critic.score("execution", edit_items(1), method="expected")[0]
    assert not j.ok and j.scores is None and "digit probability mass" in j.error


def test_soft_scores_are_the_expectations_at_the_last_digit_tokens():
    p4, p3 = [0.1, 0.1, 0.1, 0.6, 0.1], [0.0, 0.2, 0.6, 0.2, 0.0]
    digits = [(2, [0.2] * 5), (4, p4), (3, p3)]  # "row 2 ... [4, 3]"
    assert reward.soft_scores([4, 3], digits)[0] == pytest.approx([0.1 + 0.2 + 0.3 + 2.4 + 0.5, 0.4 + 1.8 + 0.8])
    assert reward.soft_scores([3], [(3, [1, 1, 2, 0, 0])])[0] == pytest.approx([(1 + 2 + 6) / 4])  # renormalised
    assert reward.soft_scores([4], [(4, p4), (5, p4)]) == (None, "the last 1 digit token(s) of the answer, [5], are "
                                                               "not its score(s) [4]: no position to read the probabilities at")
    assert reward.soft_scores([4, 3], [(3, p3)])[0] is None  # fewer digit tokens than scores


def test_soft_method_reads_the_digit_probabilities_where_the_critic_wrote_its_score(processor):
    tok = processor.tokenizer
    digits = [tok.convert_tokens_to_ids(str(k)) for k in range(1, 6)]
    logits = torch.full((len(tok),), -1e4)
    logits[digits] = torch.tensor([0.0, 1.0, 2.0, 0.5, -1.0])
    logits[tok.convert_tokens_to_ids("}")] = 1.5  # mass off the digits: renormalised over them
    critic = stub_critic(processor, logits=logits, answers=['{"reasoning": "row 2 is right", "score": [4]}', "4 out of 5"])
    good, bad = critic.score("execution", edit_items(2), method="soft")
    e = [math.exp(x) for x in [0.0, 1.0, 2.0, 0.5, -1.0]]
    assert good.ok and good.how == "soft" and good.scores == pytest.approx([sum((k + 1) * x for k, x in enumerate(e)) / sum(e)])
    assert good.text == '{"reasoning": "row 2 is right", "score": [4]}'
    assert not bad.ok and bad.scores is None and "are not its score(s) [4]" in bad.error  # "4/5": the last digit is 5
    with pytest.raises(ValueError, match="> 1 only with method 'generate'"):
        critic.score("execution", edit_items(1), method="soft", samples=2)


def test_api_digits_reads_the_served_logprobs_of_every_digit_token():
    lp = lambda p: math.log(p)  # noqa: E731
    answer = {"content": [  # '{"reasoning": "row 2", "score": [4]}' as vLLM returns it, cut to the tokens that matter
        {"token": "row", "logprob": lp(0.9), "top_logprobs": [{"token": "row", "logprob": lp(0.9)}]},
        {"token": " 2", "logprob": lp(0.7), "top_logprobs": [{"token": " 2", "logprob": lp(0.7)},
                                                             {"token": " 3", "logprob": lp(0.2)}]},
        {"token": "4", "logprob": lp(0.5), "top_logprobs": [{"token": "4", "logprob": lp(0.5)}, {"token": "5", "logprob": lp(0.2)},
                                                            {"token": " 5", "logprob": lp(0.1)}, {"token": "45", "logprob": lp(0.1)},
                                                            {"token": "]", "logprob": lp(0.05)}]},
        {"token": "]}", "logprob": lp(1.0), "top_logprobs": []}]}
    digits = reward.api_digits(answer)
    assert [d for d, _ in digits] == [2, 4]
    assert digits[0][1] == pytest.approx([0, 0.7, 0.2, 0, 0])
    assert digits[1][1] == pytest.approx([0, 0, 0, 0.5, 0.3])  # "5" and " 5" both spell 5; "45" and "]" spell none
    assert reward.soft_scores([4], digits)[0] == pytest.approx([(4 * 0.5 + 5 * 0.3) / 0.8])
    assert reward.api_digits({"content": None}) == []


def test_generated_answers_are_parsed_and_failures_reported_with_the_text(processor):
    critic = stub_critic(processor, answers=['{"reasoning": "done", "score": [4]}', "I cannot judge this."])
    a, b = critic.score("execution", edit_items(2))
    assert a.ok and a.scores == [4] and a.how == "json" and a.text == '{"reasoning": "done", "score": [4]}'
    assert not b.ok and b.scores is None and b.text == "I cannot judge this." and b.error == "no score found"


def test_an_answer_cut_by_the_length_limit_is_a_failure_of_its_own_kind(processor):
    critic = stub_critic(processor, answers=["Let me check every item of the prompt in turn: first the red circle"], eos=False)
    critic.max_new_tokens = 6
    j = critic.score("execution", edit_items(1))[0]
    assert not j.ok and j.how == "cut" and "max_new_tokens=6" in j.error
    critic.model.eos, critic.model.answers = True, ["No."]  # ended by the critic: an ordinary failure
    k = critic.score("execution", edit_items(1))[0]
    assert not k.ok and k.how == "failed"
    _, stats = reward.fuse_judgements({"execution": [j, k], "consistency": [k, k]}, "cme")
    assert stats["cut"] == {"execution": 1, "consistency": 0} and stats["failed"] == 2


def test_answer_limits_default_to_the_releases_per_mode(processor):
    critic = stub_critic(processor, answers=['{"score": [3]} \\boxed{3}'])
    critic.score("execution", edit_items(1))
    critic.score("instruction", [{"image": img(), "prompt": "a red circle"}])
    assert [c.max_new_tokens for c in critic.model.configs] == [256, 8192]  # the edit and gen reward servers' limits


def test_the_gen_instruction_score_reads_boxed_first_like_the_release():
    both = 'Checklist done. {"score": [2]}\nFinal Alignment Rating: 3\n\\boxed{4}'
    assert reward.parse_score(both, 1, "instruction").scores == [4]
    assert reward.parse_score(both, 1, "execution").scores == [2]  # every other mode: JSON first
    rating = '{"score": [2]} **Final Alignment Rating**: [3]'
    assert reward.parse_score(rating, 1, "instruction").scores == [3] and reward.parse_score(rating, 1).scores == [2]


def test_a_critic_sees_images_within_llama_factorys_pixel_limits():
    # LLaMA-Factory's _preprocess_image: above 768^2 (below 32^2) pixels, scale both sides by sqrt(limit / pixels), floor
    sizes = {(1000, 1000): (768, 768), (2000, 1000): (1086, 543), (20, 10): (45, 22), (64, 64): (64, 64), (768, 768): (768, 768)}
    for size, want in sizes.items():
        assert reward.critic_image(Image.new("L", size, 7)).size == want
    im = Image.new("RGB", (64, 48), (1, 2, 3))
    assert reward.critic_image(im).tobytes() == im.tobytes()  # within the limits: the image itself


def test_in_process_and_served_critics_hand_the_same_capped_images_on(monkeypatch):
    seen = []
    critic = Critic.__new__(Critic)  # no model: only what reaches the processor matters here
    critic.prompts, critic.batch_size = reward.load_prompts(), 16
    monkeypatch.setattr(Critic, "_inputs", lambda self, turns, images: seen.append([i.size for i in images[0]]) or {})
    monkeypatch.setattr(Critic, "_generate", lambda self, mode, batch, samples, soft=False: [])
    item = {"source": Image.new("RGB", (1600, 900)), "edited": Image.new("RGB", (40, 20)), "instruction": "x"}
    critic.score("execution", [item])
    served = reward.ServedCritic.__new__(reward.ServedCritic)  # no server: only what reaches the request matters
    served.prompts, served.max_new_tokens, served.concurrency = reward.load_prompts(), None, 1
    monkeypatch.setattr(reward.ServedCritic, "complete",
                        lambda self, parts, images, *a: seen.append([i.size for i in images]) or [("", "stop", None)])
    served.score("execution", [item])
    assert seen == [[(1024, 576), (45, 22)]] * 2


def test_prompt_files_are_format_templates_like_the_releases(tmp_path):
    f = tmp_path / "prompts.json"
    f.write_text(json.dumps({"execution": 'Instruction: {instruction}\nAnswer as {{"reasoning": "...", "score": [n]}}'}))
    turn = reward.build_prompt("execution", "Remove the cat.", prompts=reward.load_prompts(f))
    assert turn.endswith('Answer as {"reasoning": "...", "score": [n]}') and "{{" not in turn
    f.write_text(json.dumps({"execution": 'Answer as {"score": [n]} for {instruction}'}))  # unescaped braces
    with pytest.raises(ValueError, match="str.format template"):
        reward.load_prompts(f)


@pytest.mark.parametrize("text,says", [
    (None, "cannot read scoring templates .FileNotFoundError"), ('{"execution": ', "cannot read scoring templates .JSONDecodeError"),
    ('["{instruction}"]', "expected a JSON object"), ('{"answer_prefix": {"execution": 1}}', "expected a JSON object"),
    ('{"execution": 3}', "template 'execution' is not a string .int."),
    ('{"judge": "{prompt}"}', r"unknown scoring mode\(s\) \['judge'\]"),
    ('{"answer_prefix": {"judge": "["}}', r"unknown scoring mode\(s\) \['judge'\]")])
def test_a_bad_template_file_is_an_error_that_names_it(tmp_path, text, says):
    f = tmp_path / "templates.json"
    if text is not None:
        f.write_text(text)
    with pytest.raises(DataError, match=re.escape(str(f)) + ": " + says):
        reward.load_prompts(f)


def test_self_ensemble_is_the_mean_of_the_samples_that_parsed(processor):
    critic = stub_critic(processor, answers=['{"score": [4]}', "garbage", '{"score": [5]}'])
    j = critic.score("execution", edit_items(1), samples=3)[0]
    assert j.ok and j.scores == [4.5] and j.how == "ensemble" and "1 of 3" in j.error
    critic.model.answers = ["garbage"]
    j = critic.score("execution", edit_items(1), samples=3)[0]
    assert not j.ok and j.scores is None


def test_batched_scores_equal_one_at_a_time_scores(critic_base):
    critic = Critic(critic_base, max_new_tokens=6, batch_size=4, min_digit_mass=0.0)  # the untrained base puts ~0.6% on digits
    items = edit_items(4)  # different instruction lengths: left padding in the batch
    batched = critic.score("consistency", items), critic.score("consistency", items, method="expected")
    critic.batch_size = 1
    single = critic.score("consistency", items), critic.score("consistency", items, method="expected")
    assert [j.text for j in batched[0]] == [j.text for j in single[0]]
    assert [j.scores[0] for j in batched[1]] == pytest.approx([j.scores[0] for j in single[1]], abs=1e-4)


def test_greedy_answers_are_plain_greedy_whatever_penalties_the_checkpoint_ships(critic_base):
    """The release decodes with vLLM's SamplingParams(temperature=0): no repetition penalty. A checkpoint's
    generation_config may carry one (transformers fills unset fields from it): scores and chat answers ignore it."""
    critic = Critic(critic_base, max_new_tokens=12, batch_size=2)
    items, image = edit_items(2), img()
    plain = [j.text for j in critic.score("execution", items)], critic.chat([image], "Describe <image>.", 12)
    critic.model.generation_config.update(repetition_penalty=3.0, no_repeat_ngram_size=2, min_new_tokens=12)
    assert ([j.text for j in critic.score("execution", items)], critic.chat([image], "Describe <image>.", 12)) == plain
    # the penalties do change this model's answers where they apply, so the equality above is not vacuous
    batch = critic._inputs(reward.check_items("execution", items), [[it["source"], it["edited"]] for it in items])
    penalised = critic.model.generate(**batch, max_new_tokens=12)[:, batch["input_ids"].shape[1]:]
    assert critic.tok.batch_decode(penalised, skip_special_tokens=True) != plain[0]


def test_digit_recorder_reads_each_generated_position_of_a_real_model(critic_base):
    """The "soft" probabilities come from generate's own pass: one (B, 5) row per generated token, the first equal to
    the digits' softmax share after the prompt (a separate forward pass), and the greedy pass unchanged."""
    critic = Critic(critic_base, max_new_tokens=5, batch_size=2)
    batch = critic._inputs(reward.check_items("execution", edit_items(2)), [[it["source"], it["edited"]] for it in edit_items(2)])
    rec = reward.DigitRecorder(critic.digit_classes)
    seqs = critic.model.generate(**batch, max_new_tokens=5, do_sample=False, logits_processor=[rec])
    plain = critic.model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(seqs, plain) and len(rec.steps) == seqs.shape[1] - batch["input_ids"].shape[1] == 5
    p = critic.model(**batch).logits[:, -1].float().softmax(-1)
    want = torch.stack([p[:, ids].sum(-1) for ids in critic.digit_classes], -1)
    assert rec.steps[0].shape == (2, 5) and torch.allclose(rec.steps[0], want, atol=1e-5)
    gen = seqs[:, batch["input_ids"].shape[1]:]
    digits = rec.digits(torch.tensor([[critic.digit_classes[3][0]] + gen[0, 1:].tolist()]))  # a "4" written first
    assert digits[0][0] == (4, rec.steps[0][0].tolist())


def test_untrained_critic_failures_are_counted_never_scored(critic_base):
    critic = Critic(critic_base, max_new_tokens=4, batch_size=4)
    rewards, stats = edit_rewards(critic, edit_items(3))
    assert rewards == [None] * 3 and stats["parse_failures"] == {"execution": 3, "consistency": 3} and stats["failed"] == 3


class FakeScorer:
    """Returns canned judgements per mode: the scorer interface edit_rewards/gen_rewards need."""

    def __init__(self, table):
        self.table = table

    def score(self, mode, items, method="generate", samples=1):
        return [Judgement(s, "", s is not None, "" if s is not None else "no score found") for s in self.table[mode]]


def test_edit_rewards_drop_or_zero_failed_items():
    scorer = FakeScorer({"execution": [[5], [3], None], "consistency": [[3], None, [5]]})
    rewards, stats = edit_rewards(scorer, [{}] * 3, fusion="cme")
    assert rewards == [pytest.approx(0.8), None, None]
    assert stats["parse_failures"] == {"execution": 1, "consistency": 1} and stats["failed"] == 2
    assert edit_rewards(scorer, [{}] * 3, fusion="sum64", on_failure="min")[0] == [pytest.approx(0.8), 0.0, 0.0]


def test_gen_rewards_qma_and_instruction_only():
    scorer = FakeScorer({"instruction": [[5], [3]], "quality": [[5, 1, 5], None]})
    assert gen_rewards(scorer, [{}] * 2)[0] == [pytest.approx(0.4), None]
    assert gen_rewards(scorer, [{}] * 2, fusion="instruction")[0] == [1.0, 0.5]
    with pytest.raises(ValueError):
        gen_rewards(scorer, [{}] * 2, fusion="cme")


# -----------------------------------------------------------------------------
# critics named by a Python factory, package.module:name (how the miniature world's judges plug in)

STANDIN = {  # a package written into tmp_path: standin/judges.py holds the factories
    "__init__.py": "",
    "judges.py": '''
import json
from reward import Judgement


class Truth:
    """Scores each item with the ground truth its record carries, as the miniature world's judges do."""

    def score(self, mode, items, method="generate", samples=1):
        return [Judgement(it["record"]["truth"][mode], json.dumps({"score": it["record"]["truth"][mode]}), True,
                          how="truth") for it in items]


def truth():
    return Truth()


def scoreless():
    return object()


not_callable = Truth()
''',
    "broken.py": "import standin_dependency_that_is_not_installed\n",
}


@pytest.fixture
def standin(tmp_path, monkeypatch):
    (tmp_path / "standin").mkdir()
    for name, text in STANDIN.items():
        (tmp_path / "standin" / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "standin.judges"
    for name in ("standin", "standin.judges", "standin.broken"):
        sys.modules.pop(name, None)


def test_a_factory_spec_opens_what_its_factory_returns_and_the_rewards_fuse_its_scores(standin):
    critic = reward.open_critic(f"{standin}:truth", device="cpu", max_new_tokens=8)  # options do not reach a factory
    assert type(critic).__name__ == "Truth"
    truth = [{"execution": [5], "consistency": [3]}, {"execution": [1], "consistency": [5]}]
    items = [dict(it, record={"truth": t}) for it, t in zip(edit_items(2), truth)]
    assert edit_rewards(critic, items, fusion="cme")[0] == [pytest.approx(cme(5, 3)), 0.0]
    gen = [{"image": img(), "prompt": "a red circle", "record": {"truth": {"instruction": [4], "quality": [5, 2, 4]}}}]
    assert gen_rewards(critic, gen)[0] == [pytest.approx(qma(4, [5, 2, 4]))]


def test_a_bad_factory_spec_is_an_error_naming_the_spec(standin):
    cases = {f"{standin}:nothing": "has no factory 'nothing'", f"{standin}:not_callable": "has no factory 'not_callable'",
             f"{standin}:scoreless": "object has no score", "standin.missing:truth": "no module 'standin.missing'",
             "nopackage_anywhere.judges:truth": "no module 'nopackage_anywhere.judges'"}
    for spec, why in cases.items():
        with pytest.raises(DataError, match=re.escape(f"critic {spec!r}: ") + ".*" + re.escape(why)):
            reward.open_critic(spec)
    with pytest.raises(ModuleNotFoundError, match="standin_dependency_that_is_not_installed"):
        reward.open_critic("standin.broken:truth")  # the module exists: what it fails to import is the error to see


def test_a_spec_that_is_an_existing_directory_or_a_url_keeps_its_meaning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "critics.edit:v2").mkdir()  # a model directory whose name reads like a factory
    assert reward.is_factory("critics.edit:v3") and not reward.is_factory("critics.edit:v2")
    with pytest.raises(DataError, match=r"critic critics.edit:v2: not a model directory"):
        reward.open_critic("critics.edit:v2")
    assert not reward.is_factory("http://host:8000/v1#firm-edit") and not reward.is_factory("runs/mini/models/edit-critic")


def test_cli_scores_through_a_factory_critic_that_reads_each_row_as_its_record(standin, tmp_path, capsys):
    img().save(tmp_path / "a.png")
    rows = [{"id": k, "mode": "instruction", "image": "a.png", "prompt": "a red circle", "human_score": s,
             "truth": {"instruction": [s]}} for k, s in (("x", 4), ("y", 2))]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reward.main(["score", "--model", f"{standin}:truth", "--input", str(tmp_path / "items.jsonl"), "--out",
                 str(tmp_path / "out.jsonl")])
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["id"], r["scores"], r["how"]) for r in got] == [("x", [4], "truth"), ("y", [2], "truth")]
    assert "MAE vs human_score 0.000" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# CLI


def test_cli_score_writes_judgements_counts_failures_and_resumes(mini_data, critic_base, tmp_path, capsys):
    out = tmp_path / "judgements.jsonl"
    argv = ["score", "--model", str(critic_base), "--input", str(mini_data / "bench" / "edit_execution.jsonl"),
            "--out", str(out), "--max-new-tokens", "3"]
    reward.main(argv)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 30 and all(not x["ok"] and x["error"] and x["scores"] is None for x in rows)  # base never parses
    assert "parse failures 30" in capsys.readouterr().out
    reward.main(argv)  # resume: nothing left to do
    assert len(out.read_text().splitlines()) == 30 and "execution: " not in capsys.readouterr().out
