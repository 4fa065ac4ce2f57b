"""FIRM critics as rewards (Sec 3.4): scoring prompts, robust score parsing, CME / QMA fusion, critic inference.

    python reward.py score --model runs/mini/models/edit-critic --input runs/mini/data/bench/edit_execution.jsonl \\
        --out runs/mini/bench/edit_execution_judgments.jsonl            # a JSONL of items -> judgements (+ MAE)
    vllm serve /ckpt/FIRM-Edit-8B --served-model-name firm-edit --port 8000          # the critic on its own GPUs
    python reward.py score --model http://critic-host:8000/v1#firm-edit --input ... --out ...

Every script names a critic by one spec (`open_critic`): a model directory (`Critic`, scored in this process), an
OpenAI-compatible endpoint `http(s)://host:port/v1[#served model name]` (`ServedCritic`: vLLM, SGLang, `transformers
serve`; the key from $FIRM_CRITIC_API_KEY), or a Python factory `package.module:name` (e.g. the miniature world's `toy.judges:pixel`), called with no
arguments. Each has score(mode, items, method, samples) -> one Judgement per item, so `edit_rewards(critic, items)`
and `gen_rewards(...)` take any of them.

Departures from the paper and its release:
  1. The critic is served by an inference engine through the standard chat API (the release serves it with its
     own pickle-over-HTTP server, and a pickle lets any client run code on the server).
  2. A parse failure is reported with the raw text and counted, never turned into a score (the release returns 0).
     The RL caller picks what it means: drop the sample from its group or give it reward 0.
  3. Beyond the paper: method "expected", the expected score sum_k k p(k) over the digit tokens 1-5 after a
     teacher-forced answer prefix that skips the reasoning (ANSWER_PREFIX): one forward pass per score instead of
     ~100 generated tokens, and continuous (the release's "logits_non_cot" server is similar). In process only: the
     chat API gives no digit probabilities after a forced prefix. It asks for a snap judgement the critic was never
     trained to give: benchmarks/bench_reward.py measures how far it lies from the generated score.
  4. Beyond the paper: method "soft", the generated answer (reasoning and all) with each score digit replaced by its
     expectation under the critic's digit probabilities at that position: no extra pass, ties broken. Served
     critics return the probabilities as the API's logprobs (vLLM, SGLang; transformers serve has none).
  5. Beyond the paper: samples=N, EditScore-style self-ensembling (mean of N sampled answers).
  6. Scores are normalised as (s - 1) / 4, as the release's CME config ("range_1_5") and gen reward do.
  7. Answer limits per mode are the release's (MAX_NEW_TOKENS: 256 edit, 8192 gen); an answer that hits the limit
     without a score is counted as "cut", apart from other parse failures.
"""

import argparse
import base64
import copy
import functools
import http.client
import importlib
import io
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from common import DataError, append_jsonl, check_model_dir, load_image, read_jsonl_resumable, read_manifest, run_stage

# -----------------------------------------------------------------------------
# scoring prompts: our wording of the rubrics in FIRM_NOTES section 2, which the critic is trained on (curate.py
# writes them into the SFT files). str.format templates like the release's ({instruction} / {prompt} / {requirement},
# literal braces {{ }}): a checkpoint trained on other templates is scored with --prompt-file {mode: template}.

IMAGE = "<image>"  # where an image goes in a user turn (the SFT records' placeholder, LLaMA-Factory style)
# The images follow the text they are judged against: the miniature world's 1 M-parameter Qwen3-VL learns to restate
# an instruction written before the two images far faster than one after them (val loss at 700 steps 0.03 vs 0.18).
PROMPTS = {
    "execution": (
        "You judge an image edit. Image 1 is the original, image 2 is the edited result.\n"
        "Instruction: {instruction}\n{requirement}<image><image>\n"
        "Rate EXECUTION 1-5: is every requested change present and correct? Ignore unrequested changes and image quality.\n"
        "5 all requested changes correct; 4 all key parts done, one subtle detail missing; 3 main intent done but "
        "important requested parts missing or wrong; 2 barely follows; 1 nothing requested is visible.\n"
        'Explain briefly, then answer as JSON: {{"reasoning": "...", "score": [n]}}'
    ),
    "consistency": (
        "You judge an image edit. Image 1 is the original, image 2 is the edited result.\n"
        "Instruction: {instruction}\n{requirement}<image><image>\n"
        "Rate CONSISTENCY 1-5: count only changes the instruction did NOT ask for. Ignore occlusion by the edit, "
        "small lighting or quality shifts, and direct consequences of the edit.\n"
        "5 nothing else changed; 4 one significant and/or 1-2 minor unrequested changes; 3 two-three significant "
        "and/or 3-4 minor; 2 four or more significant and/or 5+ minor; 1 an almost entirely different image.\n"
        'Explain briefly, then answer as JSON: {{"reasoning": "...", "score": [n]}}'
    ),
    "instruction": (
        "You judge a generated image against its prompt.\nPrompt: {prompt}\n{requirement}<image>\n"
        "Check every subject, attribute, position and the background the prompt asks for, item by item. "
        "Rate INSTRUCTION FOLLOWING 1-5: 5 everything correct; 4 main content right, 1-2 non-critical details off; "
        "3 main subject present but several requirements missing; 2 most subjects missing or wrong; 1 irrelevant image.\n"
        "End with the final rating as \\boxed{{n}}."
    ),
    "quality": (
        "You judge the quality of an image, ignoring what it shows.\n<image>\n"
        "Rate three things 1-5 (5 best): aesthetics; technical quality (noise, blur, artefacts); structure and texture.\n"
        'Explain briefly, then answer as JSON: {{"reasoning": "...", "score": [aesthetics, technical, structure]}}'
    ),
}
N_SCORES = {"execution": 1, "consistency": 1, "instruction": 1, "quality": 3}
EDIT_MODES, GEN_MODES = ("execution", "consistency"), ("instruction", "quality")
IMAGE_FIELDS = {m: ("source", "edited") if m in EDIT_MODES else ("image",) for m in N_SCORES}  # in the critic's order
# the answer method "expected" teacher-forces: the critic's own format, reasoning left empty
ANSWER_PREFIX = {"execution": '{"reasoning": "", "score": [', "consistency": '{"reasoning": "", "score": [',
                 "instruction": "\\boxed{", "quality": '{"reasoning": "", "score": ['}
SCORE_SEP = ", "  # between the three quality scores
# answer limits (tokens) of the release's reward servers; the gen critic writes an item-by-item checklist first
MAX_NEW_TOKENS = {"execution": 256, "consistency": 256, "instruction": 8192, "quality": 8192}
# the pixels a critic's image may have, in training (train_reward.py) and in scoring, in process or served:
# LLaMA-Factory's defaults (image_max_pixels, image_min_pixels); the release trained its critics with LLaMA-Factory
IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS = 768 * 768, 32 * 32


def critic_image(image):
    """An image as a critic sees it: RGB, resized (aspect kept, BICUBIC) to at most IMAGE_MAX_PIXELS and at least
    IMAGE_MIN_PIXELS pixels as LLaMA-Factory's MLLM pre-processing does; the processor then fits it to its patches."""
    image, n = image.convert("RGB"), image.width * image.height
    if n == 0:
        raise ValueError(f"an image of {image.width} x {image.height} pixels")
    if n > IMAGE_MAX_PIXELS or n < IMAGE_MIN_PIXELS:
        f = math.sqrt((IMAGE_MAX_PIXELS if n > IMAGE_MAX_PIXELS else IMAGE_MIN_PIXELS) / n)
        image = image.resize((int(image.width * f), int(image.height * f)), Image.BICUBIC)
    return image


def load_prompts(path=None):
    """The default templates, replaced by any in a JSON file {mode: template, "answer_prefix": {mode: str}}."""
    prompts = dict(PROMPTS, answer_prefix=dict(ANSWER_PREFIX))
    try:
        user = json.loads(Path(path).read_text()) if path else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read scoring templates ({type(e).__name__}: {e})") from None
    prefix = user.pop("answer_prefix", {}) if isinstance(user, dict) else None
    if not isinstance(prefix, dict) or not all(isinstance(v, str) for v in prefix.values()):
        raise DataError(f"{path}: expected a JSON object {{mode: template, \"answer_prefix\": {{mode: str}}}}")
    if (set(user) | set(prefix)) - set(PROMPTS):
        raise DataError(f"{path}: unknown scoring mode(s) {sorted((set(user) | set(prefix)) - set(PROMPTS))}; "
                        f"expected some of {sorted(PROMPTS)}")
    prompts["answer_prefix"].update(prefix)
    for mode, template in user.items():  # fail at load, not at the first item
        if not isinstance(template, str):
            raise DataError(f"{path}: template {mode!r} is not a string ({type(template).__name__})")
        try:
            template.format(instruction="", prompt="", requirement="")
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(f"{path}: template {mode!r} is not a str.format template with the fields {{instruction}}, "
                            f"{{prompt}}, {{requirement}} ({type(e).__name__}: {e}); write literal braces as {{{{ }}}}") from None
    return prompts | user


def build_prompt(mode, text="", requirement=None, prompts=PROMPTS):
    """The user turn for one item (text: the edit instruction or the generation prompt), an IMAGE marker per image."""
    req, n = f"Requirement: {requirement}\n" if requirement else "", len(IMAGE_FIELDS[mode])
    turn = mark_images(prompts[mode], n, f"the {mode!r} prompt").format(instruction=text, prompt=text, requirement=req)
    return mark_images(turn, n, f"the {mode!r} prompt with its text")


def mark_images(turn, n, what="the prompt"):
    """`turn` with n IMAGE markers: as given, or all first when it has none (the Qwen chat convention)."""
    turn = turn if IMAGE in turn else IMAGE * n + turn
    if turn.count(IMAGE) != n:
        raise ValueError(f"{what} must mark {n} image(s) with {IMAGE!r}, found {turn.count(IMAGE)}")
    return turn


def content_parts(turn):
    """A user turn with IMAGE markers -> the chat-template content list [{"type": "text"|"image"}, ...]."""
    content = []
    for k, text in enumerate(turn.split(IMAGE)):
        if k > 0:
            content.append({"type": "image"})
        if text:
            content.append({"type": "text", "text": text})
    return content


def critic_messages(mode, text="", requirement=None, prompts=PROMPTS):
    """The critic's chat for one item: the SFT records' user turn (curate.py writes build_prompt there) exactly."""
    return [{"role": "user", "content": content_parts(build_prompt(mode, text, requirement, prompts))}]


# -----------------------------------------------------------------------------
# score parsing, in the release's order (PARSE_ORDER), then lenient patterns. Anything else is a failure with its
# reason, never a number.

@dataclass
class Judgement:
    scores: list  # N_SCORES[mode] numbers in 1..5 (ints when parsed, floats when expected/ensembled); None = failed
    text: str  # the critic's raw answer (ensembles: the answers joined; "expected": the digit probabilities)
    ok: bool
    error: str = ""  # why it failed: the parser's reason, the length limit, too little probability on the digits
    how: str = ""  # json | boxed | rating | pattern | expected | soft | ensemble | failed | cut | unanswered (server gone)


# the gen instruction score: \boxed{} first, then "Final Alignment Rating", then JSON; every other mode JSON first
PARSE_ORDER, DEFAULT_ORDER = {"instruction": ("boxed", "rating", "json")}, ("json", "boxed")
# (?!\d|\.\d): "45" and "4.5" are not a 4, but the full stop of "The score is 4." is fine. Runs of spaces between
# optional tokens are matched possessively (*+): a hostile answer of "score" and 20000 spaces must not backtrack for hours.
_RATING = r"Final Alignment Rating\s*+\**+\s*+:?\s*+\**+\s*+\[?\s*+([1-5])\s*\]?(?!\d|\.\d)"
_PATTERNS = [
    r'"scores?"\s*+:\s*+\[?\s*+"?([1-5](?:\s*,\s*[1-5])*)(?!\d|\.\d)',  # truncated JSON: "score": [4
    r"\bscores?\s*+(?:is|of|=|:)?\s*+\[?\s*+([1-5](?:\s*,\s*[1-5])*)\s*\]?(?!\d|\.\d)",
    r"\brating\s*+(?:is|of|=|:)?\s*+\[?\s*+([1-5](?:\s*,\s*[1-5])*)\s*\]?(?!\d|\.\d)",
    r"(?<![\d.])([1-5])\s*+(?:/|out of)\s*+5\b",
]
MAX_ANSWER_CHARS = 100_000  # ~4x the longest answer the release allows (8192 tokens); anything longer is not parsed
MAX_JSON_STARTS = 1000  # JSON objects tried per answer: bounded time on an answer made of braces


def _as_scores(value, n):
    """A "score" value (list, number, or a string "4" / "[4]" / "4, 5, 3") -> n ints in 1..5, or None."""
    value = value.strip().strip("[]").split(",") if isinstance(value, str) else value
    value = value if isinstance(value, list) else [value]
    value = [float(v) if isinstance(v, str) and re.fullmatch(r"\s*[1-5](\.0+)?\s*", v) else v for v in value]
    if len(value) != n or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v not in (1, 2, 3, 4, 5)
                              for v in value):  # NaN, 3.5, 7, "x", true
        return None
    return [int(v) for v in value]


def _read(how, text, n):
    """One reading of an answer: None when it has none, else (n scores or None, why they are not scores)."""
    if how == "json":  # the first (outermost) object with a "score" field; an object with a key begins {"
        for m in list(re.finditer(r'\{\s*"', text))[:MAX_JSON_STARTS]:
            try:
                obj = json.JSONDecoder().raw_decode(text, m.start())[0]  # the object starting here, nothing after it
            except (ValueError, RecursionError):  # not JSON, an integer of 5000 digits, absurd nesting: not an answer
                continue
            if "score" in obj:
                return _as_scores(obj["score"], n), f"JSON score {obj['score']!r} is not {n} integer(s) in 1..5"
    elif how == "boxed" and (boxed := re.findall(r"\\boxed\{([^{}]*)\}", text)):  # the last \boxed{...}
        return _as_scores(boxed[-1].strip().split(","), n), f"\\boxed{{{boxed[-1].strip()}}} is not {n} integer(s) in 1..5"
    elif how == "rating" and n == 1 and (found := re.findall(_RATING, text, flags=re.IGNORECASE)):
        return [int(found[-1])], ""
    return None


def parse_score(text, n=1, mode=None):
    """A critic's answer -> a Judgement of n integer scores in 1..5 (how: the reading that found them), or a failure
    (how "failed") with its reason. The readings in PARSE_ORDER (JSON: a "score" field as a list, number or numeric
    string), then lenient patterns: a truncated '"score": [4', "score: 4", "Score [3, 4, 5]", "4/5", "4 out of 5"
    (the last match wins)."""
    text = text if isinstance(text, str) else ""
    failed = lambda why: Judgement(None, text, False, why, "failed")  # noqa: E731
    if not text.strip():
        return failed("empty answer")
    if len(text) > MAX_ANSWER_CHARS:
        return failed(f"answer of {len(text)} characters, longer than any critic writes ({MAX_ANSWER_CHARS})")
    for how in PARSE_ORDER.get(mode, DEFAULT_ORDER):
        if (found := _read(how, text, n)) is not None:
            return Judgement(found[0], text, True, "", how) if found[0] is not None else failed(found[1])
    for pat in _PATTERNS:
        found = re.findall(pat, text, flags=re.IGNORECASE)
        if found and (scores := _as_scores(found[-1].split(","), n)):
            return Judgement(scores, text, True, "", "pattern")
    return failed("no score found")


# -----------------------------------------------------------------------------
# reward fusion (Sec 3.4): "Base-and-Bonus". Inputs are raw 1-5 critic scores (ints, or floats from the
# expected-score mode); every result lies in [0, 1].

def normalize_score(s):
    """s in 1..5 -> (s - 1) / 4, clipped to [0, 1]."""
    return min(1.0, max(0.0, (float(s) - 1.0) / 4.0))


def cme(execution, consistency):
    """Consistency-Modulated Execution: R = E * (0.6 + 0.4 C). E = 0 gives 0 whatever C is."""
    return normalize_score(execution) * (0.6 + 0.4 * normalize_score(consistency))


def qma(instruction, quality):
    """Quality-Modulated Alignment: R = I * (0.4 + 0.6 Q), Q = (min(aesthetics, technical, structure) - 1) / 4."""
    return normalize_score(instruction) * (0.4 + 0.6 * normalize_score(min(quality)))


def weighted_sum(a, b, weight_a=0.5):
    """The naive fusion the paper ablates (Table 5): w * A + (1 - w) * B on normalised scores."""
    return min(1.0, max(0.0, weight_a * normalize_score(a) + (1 - weight_a) * normalize_score(b)))


FUSIONS = {  # name -> fused reward from {mode: score}; edit fusions, then gen fusions, the paper's first
    "cme": lambda s: cme(s["execution"], s["consistency"]),
    "sum55": lambda s: weighted_sum(s["execution"], s["consistency"], 0.5),
    "sum64": lambda s: weighted_sum(s["execution"], s["consistency"], 0.6),
    "qma": lambda s: qma(s["instruction"], s["quality"]),
    "instruction": lambda s: normalize_score(s["instruction"]),
}
FUSION_MODES = {"cme": EDIT_MODES, "sum55": EDIT_MODES, "sum64": EDIT_MODES, "qma": GEN_MODES, "instruction": ("instruction",)}


def fuse(name, scores):
    """Fused reward from a dict of per-mode scores, or None when a score it needs is absent (failed to parse).
    Anything else wrong (an unknown fusion, a score of the wrong type) is a bug and raises."""
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}; expected one of {list(FUSIONS)}")
    return None if any(scores.get(m) is None for m in FUSION_MODES[name]) else FUSIONS[name](scores)


# -----------------------------------------------------------------------------
# critics: a model directory scored in this process, an OpenAI-compatible endpoint, a Python factory

METHODS = ("generate", "soft", "expected")  # how a critic turns an answer into a score (Critic's docstring)


def check_items(mode, items, prompts=PROMPTS, method="generate", samples=1):
    """The critic's user turn (content parts) for each item. A bad argument or item raises before any model work,
    naming the item's index and field; keys a critic does not read (e.g. "record") pass unchecked."""
    if mode not in N_SCORES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {list(N_SCORES)}")
    if method not in METHODS:
        raise ValueError(f"'method' must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1 or (samples > 1 and method != "generate"):
        raise ValueError(f"'samples' must be an integer >= 1 (> 1 only with method 'generate'), got {samples!r}")
    turns = []
    for i, it in enumerate(items):
        for k in IMAGE_FIELDS[mode]:
            if not hasattr(it.get(k), "convert"):
                raise ValueError(f"item {i}: field '{k}' must be a PIL image, got {type(it.get(k)).__name__}")
        # an edit item's instruction (RL manifests call it "prompt"), a gen item's prompt
        text = it.get("prompt") if mode in GEN_MODES or it.get("instruction") is None else it["instruction"]
        if not isinstance(text, str) and mode != "quality":
            raise ValueError(f"item {i}: field '{'instruction' if mode in EDIT_MODES else 'prompt'}' must be a string")
        turns.append(critic_messages(mode, text or "", it.get("requirement"), prompts)[0]["content"])
    return turns


def soft_scores(scores, digits):
    """The parsed integer scores -> their expectations where the critic wrote them (method "soft"), or a failure.
    digits: the answer's digit tokens in order, as (digit, [p(1), ..., p(5)]) with the probabilities the critic gave
    the digits 1-5 at that token's position. The scores are the last len(scores) digit tokens, which must spell them
    (a score read from elsewhere, e.g. "4/5", has no position of its own). -> Judgement-like (floats or None, why)."""
    last = digits[-len(scores):] if len(digits) >= len(scores) else []
    if [d for d, _ in last] != list(scores):
        return None, (f"the last {len(scores)} digit token(s) of the answer, {[d for d, _ in last]}, are not its "
                      f"score(s) {list(scores)}: no position to read the probabilities at")
    if any(sum(ps) <= 0 for _, ps in last):
        return None, "no probability on the digits 1-5 at the score's position"
    return [sum(k * p for k, p in enumerate(ps, 1)) / sum(ps) for _, ps in last], ""


def judge_answers(mode, texts, cut, limit, digits=None):
    """One item's answer(s) -> its Judgement: one answer's parse ("cut" when the length limit stopped it before a
    score), or the mean of the samples that parsed (EditScore's self-ensemble). digits (method "soft"): per answer,
    its digit tokens and their probabilities (soft_scores); each parsed score becomes its expectation."""
    parsed = [parse_score(t, N_SCORES[mode], mode) for t in texts]
    for i, j in enumerate(parsed if digits is not None else []):
        if j.ok:
            soft, why = soft_scores(j.scores, digits[i])
            parsed[i] = Judgement(soft, j.text, True, "", "soft") if soft else Judgement(None, j.text, False, why, "failed")
    parsed = [Judgement(None, j.text, False, f"answer cut at max_new_tokens={limit} before a score", "cut")
              if c and not j.ok else j for j, c in zip(parsed, cut)]
    if len(texts) == 1:
        return parsed[0]
    text, good = "\n---\n".join(texts), [j.scores for j in parsed if j.ok]
    if not good:
        return Judgement(None, text, False, f"none of {len(texts)} samples parsed", "failed")
    missed = f"{len(texts) - len(good)} of {len(texts)} samples did not parse" if len(good) < len(texts) else ""
    return Judgement([sum(s) / len(good) for s in zip(*good)], text, True, missed, "ensemble")


def digit_expectation(logits, digit_ids):
    """Expected score from next-token logits (B, V): E = sum_k k p(k) / sum_k p(k) over the digits 1..5, and the
    mass sum_k p(k). Renormalised over the five digits (the release's logit server also includes "0"), the mass
    reported: a critic that does not want to write a digit here is visible, not silently averaged."""
    p = logits.float().softmax(-1)[:, digit_ids]  # (B, 5)
    mass = p.sum(-1)  # (B,)
    return (p * torch.arange(1, 6, dtype=p.dtype, device=p.device)).sum(-1) / mass, mass


class DigitRecorder:
    """A logits processor that records, at every generated position, the probability of each digit 1-5 (summed over
    the tokens that spell it) and changes nothing: the "soft" method's probabilities come from the greedy pass itself."""

    def __init__(self, classes):
        self.classes, self.steps = classes, []  # classes: [token ids] per digit 1..5; steps: (B, 5) per position

    def __call__(self, input_ids, scores):  # on the device: no host sync per generated token
        p = scores.float().softmax(-1)
        self.steps.append(torch.stack([p[:, ids].sum(-1) for ids in self.classes], -1))
        return scores

    def digits(self, seqs):
        """Per generated row: [(digit, [p(1..5)])] at each position where it wrote a digit token, in order."""
        value = {i: k for k, ids in enumerate(self.classes, 1) for i in ids}
        probs = torch.stack(self.steps, 1).tolist()  # (B, T, 5), one copy to the host
        return [[(value[t], probs[row][pos]) for pos, t in enumerate(seqs[row].tolist()) if t in value]
                for row in range(seqs.shape[0])]


class Critic:
    """A critic model directory (the tiny critic, Qwen3-VL-8B-Instruct, FIRM-Edit-8B, ...), loaded once.

    score(mode, items, method="generate", samples=1) -> list[Judgement], one per item, in order. Items, for every
    critic (ServedCritic and the factories' objects take the same):
      edit: {"source": PIL, "edited": PIL, "instruction": str (or "prompt"), "requirement": str|None}
      gen:  {"image": PIL, "prompt": str, "requirement": str|None}
      optional "record": the dataset / prompt record (dict) the item came from. Model critics ignore it, as any
      other key; the miniature world's judges read their ground truth from item["record"]["toy"].
    "generate": batched greedy decoding (left padding, KV cache), then parse_score; at most max_new_tokens tokens
        (None: MAX_NEW_TOKENS[mode]). An answer stopped by the limit before a score fails as "cut".
    "soft": as "generate", then each parsed score replaced by its expected value under the digit probabilities at
        the position where the critic wrote it, after its own reasoning (soft_scores): no extra pass.
    "expected": digit_expectation after the teacher-forced answer prefix, one forward pass per score; fails when
        the digits get < min_digit_mass of the probability.
    samples > 1 (generate only): the mean of the sampled answers that parsed, drawn with the checkpoint's
        generation_config and torch's global RNG.
    chat(images, text, max_new_tokens) -> a free-form greedy answer (curate's model judge).
    `model` / `processor` may replace model_dir (the tests pass a stub model and the real processor).
    """

    def __init__(self, model_dir=None, device=None, dtype=None, prompt_file=None, max_new_tokens=None, batch_size=16,
                 min_digit_mass=0.5, model=None, processor=None):
        from transformers import AutoModelForImageTextToText, AutoProcessor
        if model is None:  # a local directory: never a silent hub download
            check_model_dir(model_dir or "", "critic")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.processor = processor or AutoProcessor.from_pretrained(model_dir)
        if self.processor.chat_template is None:  # transformers reads chat_template.jinja and chat_template.json
            raise ValueError(f"{model_dir}: no chat template (chat_template.jinja or chat_template.json)")
        self.model = model or AutoModelForImageTextToText.from_pretrained(model_dir, dtype=self.dtype).to(self.device).eval()
        self.tok = self.processor.tokenizer
        self.tok.padding_side = "left"  # the last position of every row is its real last token (generate + digits)
        self.prompts, self.max_new_tokens = load_prompts(prompt_file), max_new_tokens
        self.batch_size, self.min_digit_mass, self._slots = batch_size, min_digit_mass, {}

    @torch.inference_mode()
    def score(self, mode, items, method="generate", samples=1):
        turns = check_items(mode, items, self.prompts, method, samples)
        images = [[critic_image(it[k]) for k in IMAGE_FIELDS[mode]] for it in items]
        out = []
        for s in range(0, len(items), self.batch_size):
            batch = self._inputs(turns[s:s + self.batch_size], images[s:s + self.batch_size])
            out += (self._expected(mode, batch) if method == "expected" else
                    self._generate(mode, batch, samples, soft=method == "soft"))
        return out

    def _inputs(self, turns, images):
        """User turns (content parts) and their images -> one left-padded batch on the device, pixels in our dtype."""
        chats = [self.processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                                    tokenize=False) for parts in turns]
        batch = self.processor(text=chats, images=images if any(images) else None, return_tensors="pt",
                               padding=True).to(self.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        return batch

    def _decoding(self, max_new_tokens, samples=1):
        """samples=1: plain greedy decoding, as the release's SamplingParams(temperature=0); the checkpoint's penalties
        (Qwen2.5-VL ships repetition_penalty 1.05) are set to neutral, as transformers fills a None from the checkpoint.
        samples > 1: the checkpoint's sampling settings (Qwen3-VL: temperature 0.7, top_p 0.8, top_k 20)."""
        gc = copy.deepcopy(self.model.generation_config)
        gc.update(max_new_tokens=max_new_tokens, do_sample=samples > 1, num_return_sequences=samples)
        if samples == 1:
            gc.update(temperature=None, top_p=None, top_k=None, repetition_penalty=1.0, no_repeat_ngram_size=0,
                      min_new_tokens=0)
        return gc

    def _generate(self, mode, batch, samples, soft=False):  # -> one Judgement per item
        limit = self.max_new_tokens or MAX_NEW_TOKENS[mode]
        gc = self._decoding(limit, samples)
        recorder = DigitRecorder(self.digit_classes) if soft else None
        seqs = self.model.generate(**batch, generation_config=gc, logits_processor=[recorder] if soft else None)
        seqs = seqs[:, batch["input_ids"].shape[1]:]  # (B * samples, <= limit)
        texts = self.tok.batch_decode(seqs, skip_special_tokens=True)
        digits = recorder.digits(seqs) if soft else None
        eos = [e for e in (gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]) if e is not None]
        ended = torch.isin(seqs, torch.tensor(eos, device=seqs.device)).any(1).tolist()
        cut = [not e and seqs.shape[1] >= limit for e in ended]  # stopped by the limit, not by the critic
        # generate returns each item's samples next to each other
        return [judge_answers(mode, texts[i:i + samples], cut[i:i + samples], limit,
                              None if digits is None else digits[i:i + samples])
                for i in range(0, len(texts), samples)]

    @functools.cached_property
    def digit_classes(self):
        """[ids of the tokens that spell k] for k = 1..5: "k", and " k" where the tokenizer has it as one token (the
        tiny world's does; Qwen's writes digits apart from spaces)."""
        forms = [[self.tok.encode(f + str(k), add_special_tokens=False) for k in range(1, 6)] for f in ("", " ")]
        if any(len(ids) != 1 for ids in forms[0]):
            raise ValueError("method 'soft' needs the digits 1-5 to be single tokens")
        return [[form[k][0] for form in forms if all(len(x) == 1 for x in form)] for k in range(5)]

    @torch.inference_mode()
    def chat(self, images, text, max_new_tokens=512):
        """A free-form question about `images` (curate's difference reports and plans): the greedy answer."""
        batch = self._inputs([content_parts(mark_images(text, len(images), "the judge prompt"))], [images])
        seq = self.model.generate(**batch, generation_config=self._decoding(max_new_tokens))[0, batch["input_ids"].shape[1]:]
        return self.tok.decode(seq, skip_special_tokens=True)

    def score_slots(self, mode):
        """Token ids of the forced answer: (prefix ids, [ids of the digits 1..5 per score slot], separator ids).
        Read off the tokenizer: <answer so far> + "1".."5" must differ in their last token only (so a tokenizer that
        writes " 5" after ", " or merges "[5" still gets the right candidates)."""
        if mode not in self._slots:
            text, contexts, slots = self.prompts["answer_prefix"][mode], [], []
            for _ in range(N_SCORES[mode]):
                ids = [self.tok.encode(text + str(k), add_special_tokens=False) for k in range(1, 6)]
                if any(x[:-1] != ids[0][:-1] for x in ids) or len({x[-1] for x in ids}) != 5:
                    raise ValueError(f"method 'expected' needs the digits 1-5 to be single tokens after {text!r}")
                contexts.append(ids[0][:-1])
                slots.append([x[-1] for x in ids])
                text += "1" + SCORE_SEP
            # a later slot's context = the previous context + its digit + the separator's tokens
            sep = contexts[-1][len(contexts[-2]) + 1:] if len(contexts) > 1 else []
            self._slots[mode] = (contexts[0], slots, sep)
        return self._slots[mode]

    def _expected(self, mode, batch):
        prefix, slots, sep = self.score_slots(mode)
        B, ids = batch["input_ids"].shape[0], lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)
        ctx, values, masses = ids(prefix).repeat(B, 1), [], []  # (B, T) the forced answer so far; per slot B floats
        for j, digits in enumerate(slots):
            inputs = dict(batch, input_ids=torch.cat([batch["input_ids"], ctx], 1),
                          attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(ctx)], 1))
            if "mm_token_type_ids" in batch:  # the forced answer is text (type 0)
                inputs["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(ctx)], 1)
            logits = self.model(**inputs, logits_to_keep=1).logits[:, -1]  # (B, V): left padding -> real last token
            e, m = digit_expectation(logits, digits)
            values.append(e.tolist())
            masses.append(m.tolist())
            if j + 1 < len(slots):  # condition the next score on this one's most likely digit
                best = ids(digits)[logits[:, digits].argmax(-1)]  # (B,)
                ctx = torch.cat([ctx, best[:, None], ids(sep).repeat(B, 1)], 1)
        out = []
        for vals, ms in zip(zip(*values), zip(*masses)):  # one item at a time
            text = ", ".join(f"E={v:.3f} (digit mass {m:.3f})" for v, m in zip(vals, ms))
            low = f"digit probability mass {min(ms):.3f} < {self.min_digit_mass} at the score position"
            out.append(Judgement(None, text, False, low, "failed") if min(ms) < self.min_digit_mass
                       else Judgement(list(vals), text, True, "", "expected"))
        return out


TOP_LOGPROBS = 20  # log-probabilities per position a served critic returns for method "soft" (the API's maximum)


def api_digits(logprobs):
    """The chat API's logprobs of one answer, {"content": [{"token", "logprob", "top_logprobs": [{"token", "logprob"},
    ...]}, ...]}, -> its digit tokens as soft_scores takes them: (digit, [p(1), ..., p(5)]) at every position whose
    token spells a digit 1-5 ("4" or " 4"), each p summed over the tokens that spell it among the top log-probabilities
    (a digit outside them counts 0: the server's top_logprobs bounds what it can show)."""
    value = lambda t: int(t.strip()) if isinstance(t, str) and t.strip() in ("1", "2", "3", "4", "5") and t in (
        t.strip(), " " + t.strip()) else None
    out = []
    for pos in logprobs.get("content") or []:
        if (d := value(pos.get("token"))) is not None:
            p = [0.0] * 5
            for alt in pos.get("top_logprobs") or []:
                if (k := value(alt.get("token"))) is not None:
                    p[k - 1] += math.exp(alt["logprob"])
            out.append((d, p))
    return out


API_KEY_ENV = "FIRM_CRITIC_API_KEY"  # the endpoint's key, read from the environment only: never argv, never a file


class CriticServerError(DataError):
    """The endpoint refuses the request itself (wrong model name, wrong key, a field it does not take): retrying
    cannot help, so the run stops (exit status 2, common.run_stage) with the server's own words."""


def api_content(parts, images):
    """Chat-template content parts ({"type": "image"} placeholders) -> the chat API's, images as PNG data URLs."""
    left, out = iter(images), []
    for p in parts:
        if p["type"] == "image":
            buf = io.BytesIO()
            next(left).convert("RGB").save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            p = {"type": "image_url", "image_url": {"url": url}}
        out.append(p)
    return out


class ServedCritic:
    """A critic behind an OpenAI-compatible /v1/chat/completions (vLLM, SGLang, `transformers serve`), with Critic's
    score and chat: the same prompts and items, the same parsing, failures counted with their raw text.

    url: the API base, e.g. http://host:8000/v1; model: the served model name (None: the only one served).
    Each process (every RL rank) keeps `concurrency` requests in flight, each waiting at most `timeout` s (an engine
    queues: allow for the queue too). Connection errors, timeouts and 5xx answers are retried `retries` times with
    exponential backoff; an item still unanswered is a counted failure (how "unanswered"), so a critic server that
    dies costs one step's rewards, not the run. 4xx answers (wrong model name, wrong key) raise CriticServerError.
    samples=1 asks for temperature 0; samples=N for N choices (the API's `n`) at the server's sampling defaults, and
    a server that returns fewer (transformers serve ignores `n`) is an error.
    """

    def __init__(self, url, model=None, prompt_file=None, max_new_tokens=None, timeout=600, retries=3, concurrency=8):
        self.url, self.api_key = url.rstrip("/"), os.environ.get(API_KEY_ENV) or None
        self.prompts, self.max_new_tokens = load_prompts(prompt_file), max_new_tokens
        self.timeout, self.retries, self.concurrency = timeout, retries, concurrency
        try:
            served = [m.get("id") for m in self._call("GET", "/models").get("data", [])]
        except OSError as e:  # nothing listens there (yet): a wrong URL, or a server still loading its model
            raise CriticServerError(f"no critic server answers at {self.url}: {e}") from None
        if model is None and len(served) != 1:
            raise CriticServerError(f"{self.url} serves {served}: name one as {self.url}#<served model name>")
        if model is not None and model not in served:
            raise CriticServerError(f"{self.url} does not serve {model!r}; it serves {served}")
        self.model = model or served[0]

    def __repr__(self):
        return f"ServedCritic({self.url}#{self.model})"

    def _call(self, method, path, body=None):
        """One request with retries: the decoded JSON answer, CriticServerError on a 4xx, OSError when unreachable."""
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                said = e.read()[:500].decode(errors="replace")
                if e.code in (401, 403):
                    raise CriticServerError(f"{self.url}{path}: HTTP {e.code}, the key was refused (${API_KEY_ENV} "
                                            f"{'is not set' if not self.api_key else 'holds another key'}): {said}") from None
                if e.code < 500:
                    raise CriticServerError(f"{self.url}{path}: HTTP {e.code}: {said}") from None
                error = OSError(f"{self.url}{path}: HTTP {e.code}: {said}")
            except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:  # refused, reset, timed out, cut off
                error = e
            if attempt < self.retries:
                time.sleep(min(30.0, 2.0 ** attempt))
        raise OSError(f"{self.url}{path}: no answer after {self.retries + 1} tries: {error}")

    def complete(self, parts, images, max_tokens, samples=1, digits=False):
        """One user turn -> [(text, finish_reason, digit tokens (api_digits) or None)], one per sample. digits=True
        asks for the top TOP_LOGPROBS log-probabilities at every position (vLLM, SGLang; method "soft")."""
        body = {"model": self.model, "messages": [{"role": "user", "content": api_content(parts, images)}],
                "max_tokens": max_tokens} | ({"temperature": 0} if samples == 1 else {"n": samples})
        body |= {"logprobs": True, "top_logprobs": TOP_LOGPROBS} if digits else {}
        choices = self._call("POST", "/chat/completions", body).get("choices") or []
        if len(choices) != samples:
            raise CriticServerError(f"{self.url}: asked for {samples} answers (n), got {len(choices)}; this server does "
                                    "not sample several answers per request: use samples=1")
        if digits and any(not isinstance(c.get("logprobs"), dict) for c in choices):
            raise CriticServerError(f"{self.url}: asked for logprobs (method 'soft'), got none: this server does not "
                                    "return them; use method 'generate'")
        return [((c.get("message") or {}).get("content") or "", c.get("finish_reason"),
                 api_digits(c["logprobs"]) if digits else None) for c in choices]

    def chat(self, images, text, max_new_tokens=512):
        """A free-form question about `images` (curate's difference reports and plans): the greedy answer."""
        return self.complete(content_parts(mark_images(text, len(images), "the judge prompt")), images, max_new_tokens)[0][0]

    def score(self, mode, items, method="generate", samples=1):
        if method == "expected":
            raise ValueError("method 'expected' needs the critic in process (a model directory): the chat API gives "
                             "no digit probabilities after a forced answer prefix")
        turns, limit = check_items(mode, items, self.prompts, method, samples), self.max_new_tokens or MAX_NEW_TOKENS[mode]

        def judge(k):
            try:
                answers = self.complete(turns[k], [critic_image(items[k][f]) for f in IMAGE_FIELDS[mode]], limit, samples,
                                        method == "soft")
            except OSError as e:  # the server is gone or failing: this item has no score, counted, the run goes on
                return Judgement(None, "", False, str(e), "unanswered")
            return judge_answers(mode, [t for t, _, _ in answers], [f == "length" for _, f, _ in answers], limit,
                                 [d for _, _, d in answers] if method == "soft" else None)
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(judge, range(len(items))))


FACTORY = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")  # package.module:name


def is_factory(spec):
    """Whether `spec` names a Python factory package.module:name (an existing directory of that name stays one)."""
    return bool(FACTORY.fullmatch(str(spec))) and not os.path.isdir(spec)


def load_factory(spec):
    """What the factory package.module:name returns, called with no arguments; DataError naming the spec if none."""
    module, _, name = str(spec).partition(":")
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
            raise  # the module is there, but something it imports is not: that error is the one to see
        raise DataError(f"critic {spec!r}: no module {module!r} to import ({e})") from None
    if not callable(getattr(found, name, None)):
        raise DataError(f"critic {spec!r}: module {module!r} ({found.__file__}) has no factory {name!r}")
    return getattr(found, name)()


def open_critic(spec, device=None, dtype=None, prompt_file=None, max_new_tokens=None, batch_size=16, **served):
    """The critic named by `spec`, one way in every script:
      http(s)://host:port/v1[#served model name]: ServedCritic (`served`: its timeout, retries, concurrency);
      a model directory: Critic, scored in this process;
      package.module:name, e.g. toy.judges:pixel: what name() returns, called with no arguments (the options here do
        not reach it); it must have score(mode, items, method, samples) -> [Judgement].
    """
    if re.match(r"https?://", str(spec)):
        url, _, name = spec.partition("#")
        return ServedCritic(url, name or None, prompt_file, max_new_tokens, **served)
    if not is_factory(spec):
        return Critic(spec, device, dtype, prompt_file, max_new_tokens, batch_size)
    critic = load_factory(spec)
    if not callable(getattr(critic, "score", None)):
        raise DataError(f"critic {spec!r}: {type(critic).__name__} has no score(mode, items, method, samples) method")
    return critic


# -----------------------------------------------------------------------------
# rewards for the RL scripts: a failed score never raises, it is counted

def edit_rewards(scorer, items, fusion="cme", on_failure="drop", method="generate", samples=1):
    """Edit rewards in [0, 1] from any critic: fusion "cme" (the paper), "sum55" or "sum64" (Table 5). An item with a
    failed score gets None with on_failure="drop" (the default: the RL caller drops the sample from its group, so a
    broken answer neither rewards nor punishes the policy), or 0.0 with on_failure="min". stats: fuse_judgements'."""
    return _rewards("edit", EDIT_MODES, scorer, items, fusion, on_failure, method, samples)


def gen_rewards(scorer, items, fusion="qma", on_failure="drop", method="generate", samples=1):
    """Generation rewards in [0, 1]: fusion "qma" (the paper: instruction x quality) or "instruction" alone (no
    quality pass). Failures as in edit_rewards."""
    return _rewards("gen", GEN_MODES, scorer, items, fusion, on_failure, method, samples)


def _rewards(kind, modes, scorer, items, fusion, on_failure, method, samples):
    fusions = [f for f, needs in FUSION_MODES.items() if set(needs) <= set(modes)]
    if fusion not in fusions:
        raise ValueError(f"{kind} fusion must be one of {fusions}, got {fusion!r}")
    if on_failure not in ("drop", "min"):
        raise ValueError(f"on_failure must be 'drop' or 'min', got {on_failure!r}")
    per_mode = {m: scorer.score(m, items, method=method, samples=samples) for m in FUSION_MODES[fusion]}
    return fuse_judgements(per_mode, fusion, on_failure)


def rl_rewards(kind, scorer, items, fusion, method="generate"):
    """An RL step's rewards: edit_rewards / gen_rewards with failures dropped (None: that sample leaves its group)
    and, when there are any, one line on stdout saying why (a dead server, answers cut by the limit, no score)."""
    rewards, stats = (edit_rewards if kind == "edit" else gen_rewards)(scorer, items, fusion, method=method)
    if note := failure_note(stats):
        print(f"[reward] {note}", flush=True)
    return rewards


def fuse_judgements(per_mode, fusion, on_failure="drop"):
    """{mode: [Judgement] * n} -> (n rewards, stats); an item with a failed mode gets None ("drop") or 0.0 ("min").
    stats: n, parse_failures / cut / unanswered {mode: count}, failed (items), mean_score {mode: mean raw score},
    errors (the first five messages)."""
    n = len(next(iter(per_mode.values())))
    rewards = []
    for i in range(n):
        r = fuse(fusion, {m: js[i].scores if N_SCORES[m] > 1 else js[i].scores[0] for m, js in per_mode.items() if js[i].ok})
        rewards.append(r if r is not None else (None if on_failure == "drop" else 0.0))
    good = {m: [j.scores for j in js if j.ok] for m, js in per_mode.items()}
    count = lambda how: {m: sum(j.how == how for j in js) for m, js in per_mode.items()}  # noqa: E731
    return rewards, {"n": n, "parse_failures": {m: n - len(g) for m, g in good.items()},
                     "cut": count("cut"), "unanswered": count("unanswered"),  # of the failures: the limit, the server
                     "failed": sum(not all(js[i].ok for js in per_mode.values()) for i in range(n)),
                     "mean_score": {m: sum(map(min, g)) / len(g) if g else None for m, g in good.items()},  # quality: min
                     "errors": [j.error for js in per_mode.values() for j in js if not j.ok][:5]}


def failure_note(stats):
    """One line on a batch's failed rewards (None when there are none): how many, of which kind, the first error."""
    if not stats["failed"]:
        return None
    kinds = [f"{k} {what}" for k, what in ((sum(stats["cut"].values()), "answer(s) cut by the length limit"),
                                          (sum(stats["unanswered"].values()), "not answered by the server")) if k]
    kinds = f" ({', '.join(kinds)})" if kinds else ""
    return f"{stats['failed']} of {stats['n']} rewards failed{kinds}: {stats['errors'][0][:200]}"


# -----------------------------------------------------------------------------
# CLI

def get_args(argv=None):
    ap = argparse.ArgumentParser(description="FIRM critics: score a JSONL of items")
    sub = ap.add_subparsers(dest="cmd", required=True)
    score = sub.add_parser("score", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    score.add_argument("--input", required=True,
                       help="JSONL: edit {id, source, edited, instruction} or gen {id, image, prompt}")
    score.add_argument("--out", required=True, help="JSONL of judgements (resumes: ids already there are skipped)")
    score.add_argument("--mode", default=None, choices=list(N_SCORES), help="default: each row's 'mode' field")
    # the critic
    score.add_argument("--model", required=True, help="a model directory (scored in this process), an OpenAI-compatible "
                       "endpoint http://host:port/v1[#served model name] (key: $FIRM_CRITIC_API_KEY), or package.module:name")
    score.add_argument("--method", default="generate", choices=METHODS,
                       help="'expected' needs a model directory; 'soft' a model directory or a server that returns logprobs")
    score.add_argument("--samples", type=int, default=1, help="self-ensemble size (generate only)")
    score.add_argument("--prompt-file", default=None,
                       help="JSON {mode: template, answer_prefix: {...}} a checkpoint was trained with")
    score.add_argument("--max-new-tokens", type=int, default=None,
                       help="tokens per answer (default: the release's, 256 edit / 8192 gen)")
    score.add_argument("--min-digit-mass", type=float, default=0.5, help="'expected': fail below this digit probability")
    # in process
    score.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    score.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                       help="default bf16 on GPU, fp32 on CPU")
    score.add_argument("--batch-size", type=int, default=16, help="items per forward/generate batch")
    score.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    return ap.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # every row checked before the first is scored
    fields = {"id": "id", "mode": "str?", "instruction": "str?", "prompt": "str?", "requirement": "str?",
              "source": "image?", "edited": "image?", "image": "image?", "human_score": "scores?"}
    lines, seen = read_manifest(args.input, fields, unique=None, images="decode", lines=True), {}
    for n, r in lines:
        r["mode"] = args.mode or r.get("mode")
        if r["mode"] not in N_SCORES:
            raise DataError(f"{args.input}:{n}: field 'mode' is {r['mode']!r}, not one of {list(N_SCORES)}; or give --mode")
        if missing := [f for f in IMAGE_FIELDS[r["mode"]] if f not in r]:
            raise DataError(f"{args.input}:{n}: missing field '{missing[0]}' (mode {r['mode']})")
        if (key := (str(r["id"]), r["mode"])) in seen:
            raise DataError(f"{args.input}:{n}: field 'id': duplicate {r['id']!r} in mode {r['mode']} "
                            f"(first on line {seen[key]})")
        seen[key] = n
    done = {(r["id"], r["mode"]) for r in read_jsonl_resumable(args.out)}
    todo, base = [r for _, r in lines if (r["id"], r["mode"]) not in done], Path(args.input).parent
    critic = open_critic(args.model, args.device, args.dtype, args.prompt_file, args.max_new_tokens, args.batch_size)
    if isinstance(critic, Critic):
        critic.min_digit_mass = args.min_digit_mass
    t0, step = time.time(), 4 * args.batch_size  # append every few batches: a killed run resumes
    for mode in N_SCORES:
        group = [r for r in todo if r["mode"] == mode]
        for i in range(0, len(group), step):
            chunk = group[i:i + step]
            items = [{**{k: load_image(r[k], base) for k in IMAGE_FIELDS[mode]}, "instruction": r.get("instruction"),
                      "prompt": r.get("prompt"), "requirement": r.get("requirement"), "record": r} for r in chunk]
            for r, j in zip(chunk, critic.score(mode, items, method=args.method, samples=args.samples)):
                append_jsonl(args.out, {"id": r["id"], "mode": mode, "scores": j.scores, "ok": j.ok, "how": j.how,
                                        "error": j.error, "text": j.text, "human_score": r.get("human_score")})
            print(f"{mode}: {i + len(chunk)}/{len(group)} items, {time.time() - t0:.1f} s", flush=True)
    out = read_jsonl_resumable(args.out)  # this run's judgements and any earlier run's
    for mode in sorted({r["mode"] for r in out}):
        rs = [r for r in out if r["mode"] == mode]
        good = [r for r in rs if r["ok"] and r.get("human_score") is not None]
        mae = sum(abs(r["scores"][0] - r["human_score"]) for r in good) / len(good) if good else float("nan")
        print(f"{mode:<12} n={len(rs):<5} parse failures {sum(not r['ok'] for r in rs):<5} MAE vs human_score {mae:.3f} "
              f"(over {len(good)} parsed items)")


if __name__ == "__main__":
    run_stage(main)
