"""FIRM critics as rewards (Sec 3.4): scoring prompts, robust score parsing, CME / QMA fusion,
batched critic inference, and a JSON reward server for the RL scripts.

    python reward.py score --model runs/mini/models/edit-critic --input runs/mini/data/bench/edit_execution.jsonl \\
        --out runs/mini/bench/edit_execution_judgments.jsonl            # a JSONL of items -> judgements (+ MAE)
    python reward.py serve --model /ckpt/FIRM-Edit-8B                      # one critic for every mode
    python reward.py serve --edit-model /ckpt/FIRM-Edit-8B --gen-model /ckpt/FIRM-Gen-8B --port 8765
    FIRM_REWARD_TOKEN=$(openssl rand -hex 16) python reward.py serve --model DIR --host 0.0.0.0   # for other machines
    curl http://127.0.0.1:8765/health

In Python (the RL scripts): `Critic(dir).score(mode, items)` in process, or `RewardClient(url).score(...)`
against a server: the same signature, so `edit_rewards(scorer, items)` / `gen_rewards(...)` take either.

HTTP API (JSON bodies, images as base64 PNG/JPEG; field names follow the release's server):
  POST /score/{execution,consistency,instruction,quality}   (alias /mode/score_<mode>, the release's path)
       in:  {"images": [b64], "ref_images": [b64] (edit modes: the SOURCE images), "prompts": [str],
             "metadatas": [{"requirement": str}] (optional), "method": "generate"|"expected", "samples": int}
       out: {"scores": [n | [a, t, s] | null], "reasonings": [str], "ok": [bool], "errors": [str], "parse_failures": k}
  POST /reward/edit  (execution + consistency + fused "cme", "sum55", "sum64")
  POST /reward/gen   (instruction + quality + fused "qma", "instruction")
  GET  /health   (no token needed: status, modes, queue, items/batches served, parse failures)
Errors are {"error": "..."} naming the field: 400 malformed, 401 bad token, 413 too large, 503 overloaded.

Departures from the paper and its release:
  1. JSON over HTTP instead of pickle (a pickle lets any client run code on the server); binds 127.0.0.1
     unless --host says otherwise; optional bearer token ($FIRM_REWARD_TOKEN or --token-file); size limits.
  2. A parse failure is reported with the raw text and counted, never turned into a score (the release
     returns 0). The RL caller picks what it means: drop the sample from its group or give it reward 0.
  3. Beyond the paper: method "expected", the expected score sum_k k p(k) over the digit tokens 1-5 at the
     score position of an answer whose reasoning is skipped (a teacher-forced prefix, ANSWER_PREFIX): one
     forward pass per score instead of ~100 generated tokens, and continuous. The release has a similar
     "logits_non_cot" server (digit logits at the first answer token). It asks the critic for a snap
     judgement it was never trained to give: benchmarks/bench_reward.py measures how far it lies from the
     generated score before you trust it.
  4. Beyond the paper: samples=N, EditScore-style self-ensembling (mean of N sampled answers).
  5. Scores are normalised as (s - 1) / 4, as the release's CME config ("range_1_5") and gen reward do.
  6. Answer limits per mode are the release's (MAX_NEW_TOKENS: 256 edit, 8192 gen); an answer that hits the
     limit without a score is counted as "cut", apart from other parse failures.
"""

import argparse
import base64
import copy
import hmac
import io
import json
import os
import queue
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from PIL import Image

from common import (DataError, append_jsonl, check_model_dir, die, load_image, read_jsonl_resumable, read_manifest,
                    read_secret, run_stage)

# -----------------------------------------------------------------------------
# scoring prompts (our wording of the rubrics in FIRM_NOTES section 2). The critic is trained on
# exactly these (train_reward.py reads them from the SFT files written by curate.py); a released
# checkpoint trained on other templates is scored with --prompt-file (a JSON {mode: template}).
# Templates are str.format templates, as the release's are: fields {instruction} / {prompt} / {requirement},
# literal braces written {{ }}, so the release's own templates can be used unchanged.

IMAGE = "<image>"  # where an image goes in a user turn (the SFT records' placeholder, LLaMA-Factory style)
# The images follow the text they are judged against. Measured on the miniature world's 1 M-parameter Qwen3-VL:
# it learns to restate an edit instruction written before the two images far faster than one written after them
# (val loss after 700 steps 0.03 vs 0.18; 0.01 with no images at all).
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
# the answer text teacher-forced by the "expected" method: the critic's own format, reasoning left empty.
# A released checkpoint with other templates can set these in its --prompt-file ("answer_prefix": {...}).
ANSWER_PREFIX = {"execution": '{"reasoning": "", "score": [', "consistency": '{"reasoning": "", "score": [',
                 "instruction": "\\boxed{", "quality": '{"reasoning": "", "score": ['}
SCORE_SEP = ", "  # between the three quality scores


# Answer length limits per mode, as the release's reward servers generate: the edit critic 256 tokens, the gen
# critic 8192 (its prompt asks for an item-by-item checklist before the rating).
MAX_NEW_TOKENS = {"execution": 256, "consistency": 256, "instruction": 8192, "quality": 8192}


def load_prompts(path=None):
    """The default templates, replaced by any in a JSON file {mode: template, "answer_prefix": {mode: str}}."""
    prompts = dict(PROMPTS, answer_prefix=dict(ANSWER_PREFIX))
    if path:
        user = json.loads(Path(path).read_text())
        prompts["answer_prefix"].update(user.pop("answer_prefix", {}))
        if set(user) - set(PROMPTS):
            raise ValueError(f"{path}: unknown scoring mode(s) {sorted(set(user) - set(PROMPTS))}; "
                             f"expected some of {sorted(PROMPTS)}")
        for mode, template in user.items():  # fail at load, not at the first item
            try:
                template.format(instruction="", prompt="", requirement="")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"{path}: template {mode!r} is not a str.format template with the fields {{instruction}}, "
                                 f"{{prompt}}, {{requirement}} ({type(e).__name__}: {e}); write literal braces as {{{{ }}}}") from None
        prompts.update(user)
    return prompts


def build_prompt(mode, text="", requirement=None, prompts=PROMPTS):
    """The user turn for one item, with an IMAGE marker where each image goes (source, then edited).

    `text` is the edit instruction or the generation prompt. A template without markers (e.g. a released
    checkpoint's, from --prompt-file) gets its images first, as the Qwen chat convention has them.
    """
    req = f"Requirement: {requirement}\n" if requirement else ""
    template = mark_images(prompts[mode], len(IMAGE_FIELDS[mode]), f"the {mode!r} prompt")
    turn = template.format(instruction=text, prompt=text, requirement=req)
    return mark_images(turn, len(IMAGE_FIELDS[mode]), f"the {mode!r} prompt with its text")


def mark_images(turn, n, what="the prompt"):
    """`turn` with n IMAGE markers: as given, or all first when it has none (the Qwen chat convention)."""
    if IMAGE not in turn:
        turn = IMAGE * n + turn
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
    """The critic's chat for one item: the same tokens as the SFT records' user turn (curate.py writes
    build_prompt(...) there), so the critic is scored on exactly the input it was trained on."""
    return [{"role": "user", "content": content_parts(build_prompt(mode, text, requirement, prompts))}]


# -----------------------------------------------------------------------------
# score parsing: JSON, then \boxed{}, then lenient patterns. Anything else is a failure, never a number.

@dataclass
class Parsed:
    scores: list  # list of ints in 1..5, or None when parsing failed
    how: str  # "json" | "boxed" | "rating" | "pattern" | "failed"
    error: str = ""

    @property
    def ok(self):
        return self.scores is not None


def _as_scores(value, n):
    """A "score" value (list, number, or a string "4" / "[4]" / "4, 5, 3") -> n ints in 1..5, or None."""
    if isinstance(value, str):
        value = value.strip().strip("[]").split(",")
    value = value if isinstance(value, list) else [value]
    if len(value) != n:
        return None
    out = []
    for v in value:
        if isinstance(v, str) and re.fullmatch(r"\s*[1-5](\.0+)?\s*", v):
            v = float(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v not in (1, 2, 3, 4, 5):  # NaN, 3.5, 7, "x"
            return None
        out.append(int(v))
    return out


# (?!\d|\.\d): "45" and "4.5" are not a 4, but the full stop of "The score is 4." is fine. Runs of spaces between
# optional tokens are matched possessively (*+): a hostile answer of "score" and 20000 spaces must not backtrack for hours.
_PATTERNS = [
    r'"scores?"\s*+:\s*+\[?\s*+"?([1-5](?:\s*,\s*[1-5])*)(?!\d|\.\d)',  # truncated JSON: "score": [4
    r"\bscores?\s*+(?:is|of|=|:)?\s*+\[?\s*+([1-5](?:\s*,\s*[1-5])*)\s*\]?(?!\d|\.\d)",
    r"\brating\s*+(?:is|of|=|:)?\s*+\[?\s*+([1-5](?:\s*,\s*[1-5])*)\s*\]?(?!\d|\.\d)",
    r"(?<![\d.])([1-5])\s*+(?:/|out of)\s*+5\b",
]
MAX_ANSWER_CHARS = 100_000  # ~4x the longest answer the release allows (8192 tokens); anything longer is not parsed
MAX_JSON_STARTS = 1000  # JSON objects tried per answer: bounded time on an answer made of braces


# Which reading comes first, per mode, as the release's reward servers parse: the gen instruction score from
# \\boxed{} first, then "Final Alignment Rating", then JSON; everything else JSON first.
PARSE_ORDER = {"instruction": ("boxed", "rating", "json")}
DEFAULT_ORDER = ("json", "boxed")
_RATING = r"Final Alignment Rating\s*+\**+\s*+:?\s*+\**+\s*+\[?\s*+([1-5])\s*\]?(?!\d|\.\d)"


def _json_scores(text, n):
    """The first (outermost) JSON object with a "score" field: Parsed, or None when there is none."""
    decoder = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r'\{\s*"', text)]  # an object with a key begins {" (a failed try costs O(len))
    for start in starts[:MAX_JSON_STARTS]:
        try:
            obj = decoder.raw_decode(text, start)[0]  # the object starting here; text after it is ignored
        except (ValueError, RecursionError):  # not JSON, an integer of 5000 digits, absurdly deep nesting: not an answer
            continue
        if "score" in obj:
            scores = _as_scores(obj["score"], n)
            if scores is None:
                return Parsed(None, "failed", f"JSON score {obj['score']!r} is not {n} integer(s) in 1..5")
            return Parsed(scores, "json")
    return None


def _boxed_scores(text, n):
    """The last \\boxed{...}: Parsed, or None when there is none."""
    boxed = [b.strip() for b in re.findall(r"\\boxed\{([^{}]*)\}", text)]
    if not boxed:
        return None
    scores = _as_scores(boxed[-1].split(","), n)
    if scores is None:
        return Parsed(None, "failed", f"\\boxed{{{boxed[-1]}}} is not {n} integer(s) in 1..5")
    return Parsed(scores, "boxed")


def _rating_scores(text, n):
    found = re.findall(_RATING, text, flags=re.IGNORECASE) if n == 1 else []
    return Parsed([int(found[-1])], "rating") if found else None


_READERS = {"json": _json_scores, "boxed": _boxed_scores, "rating": _rating_scores}


def parse_score(text, n=1, mode=None):
    """Parse a critic answer into n integer scores in 1..5.

    Order (PARSE_ORDER, the release's): for the gen instruction score the last \\boxed{...}, then "Final
    Alignment Rating: n", then JSON; for every other mode the first (outermost) JSON object with a "score" field
    (list, number or numeric string), then the last \\boxed{...}. Then lenient patterns (a truncated
    '"score": [4', "score: 4", "Score [3, 4, 5]", "4/5", "4 out of 5"; the last match wins). Out-of-range or
    wrong-count scores and anything unrecognised give Parsed(None, "failed", reason).
    """
    if not isinstance(text, str) or not text.strip():
        return Parsed(None, "failed", "empty answer")
    if len(text) > MAX_ANSWER_CHARS:
        return Parsed(None, "failed", f"answer of {len(text)} characters, longer than any critic writes ({MAX_ANSWER_CHARS})")
    for reader in PARSE_ORDER.get(mode, DEFAULT_ORDER):
        parsed = _READERS[reader](text, n)
        if parsed is not None:
            return parsed
    for pat in _PATTERNS:
        found = re.findall(pat, text, flags=re.IGNORECASE)
        scores = _as_scores(found[-1].split(","), n) if found else None
        if scores is not None:
            return Parsed(scores, "pattern")
    return Parsed(None, "failed", "no score found")


# -----------------------------------------------------------------------------
# reward fusion (Sec 3.4): "Base-and-Bonus". Inputs are raw 1-5 critic scores (ints, or floats
# from the expected-score mode); every result lies in [0, 1].

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


FUSIONS = {
    "cme": lambda s: cme(s["execution"], s["consistency"]),
    "sum55": lambda s: weighted_sum(s["execution"], s["consistency"], 0.5),
    "sum64": lambda s: weighted_sum(s["execution"], s["consistency"], 0.6),
    "qma": lambda s: qma(s["instruction"], s["quality"]),
    "instruction": lambda s: normalize_score(s["instruction"]),
}
# the modes each kind of reward scores, and the fusions it offers (the paper's first)
REWARDS = {"edit": (EDIT_MODES, ("cme", "sum55", "sum64")), "gen": (GEN_MODES, ("qma", "instruction"))}


def fuse(name, scores):
    """Fused reward from a dict of per-mode scores, or None when a needed score failed to parse."""
    try:
        return FUSIONS[name](scores)
    except (KeyError, TypeError):
        return None


# -----------------------------------------------------------------------------
# critic inference

@dataclass
class Judgement:
    scores: list  # N_SCORES[mode] numbers in 1..5 (ints when generated, floats when expected/ensembled); None = failed
    text: str  # the critic's raw answer (ensembles: the answers joined; "expected": the digit probabilities)
    ok: bool
    error: str = ""  # why it failed: the parser's message, the length limit, or too little probability on the digits
    how: str = ""  # json | boxed | rating | pattern | expected | ensemble | failed | cut (hit max_new_tokens, no score)


def check_method(method, samples, max_samples=None):
    """The ValueError names the bad argument; the server sends it back as a 400."""
    if method not in ("generate", "expected"):
        raise ValueError(f"'method' must be 'generate' or 'expected', got {method!r}")
    top = max_samples or float("inf")
    if (isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= top
            or (samples > 1 and method != "generate")):
        raise ValueError(f"'samples' must be an integer in 1..{top} (> 1 only with method 'generate'), got {samples!r}")


def digit_expectation(logits, digit_ids):
    """Expected score from next-token logits (B, V): E = sum_k k p(k) / sum_k p(k) over the digits 1..5.

    Returns (expected (B,), mass (B,)): mass = the probability the critic puts on any digit at all. We
    renormalise over the five digits (the release's logit server also includes "0") and report the mass,
    so a critic that does not want to write a digit here is visible instead of silently averaged.
    """
    p = logits.float().softmax(-1)[:, digit_ids]  # (B, 5)
    mass = p.sum(-1)
    return (p * torch.arange(1, 6, dtype=p.dtype, device=p.device)).sum(-1) / mass, mass


def item_text(mode, item):
    """The instruction of an edit item (RL manifests call it "prompt") or the prompt of a gen item."""
    return item.get("prompt") if mode in GEN_MODES or item.get("instruction") is None else item["instruction"]


class Critic:
    """A critic model directory (tiny critic, Qwen3-VL-8B-Instruct, FIRM-Edit-8B, ...), loaded once.

    score(mode, items, method="generate", samples=1) -> list[Judgement], one per item, in order.
      edit items: {"source": PIL, "edited": PIL, "instruction": str (or "prompt"), "requirement": str|None}
      gen items:  {"image": PIL, "prompt": str, "requirement": str|None}
      "generate": batched greedy decoding (left padding, KV cache), then parse_score on the text; at most
          max_new_tokens tokens (None: MAX_NEW_TOKENS[mode], the release's limits). An answer that hit the limit
          without a score is a failure of its own kind ("cut"): raise the limit rather than blame the critic.
      "expected": digit_expectation after the teacher-forced ANSWER_PREFIX, one forward pass per score;
          fails when the digits get < min_digit_mass of the probability.
      samples > 1 (generate only): the mean over the sampled answers that parsed (EditScore's self-ensemble),
          drawn with the checkpoint's generation_config and torch's global RNG.
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
        self.prompts = load_prompts(prompt_file)
        self.max_new_tokens, self.batch_size, self.min_digit_mass = max_new_tokens, batch_size, min_digit_mass
        self._slots = {}

    @torch.inference_mode()
    def score(self, mode, items, method="generate", samples=1):
        if mode not in N_SCORES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {list(N_SCORES)}")
        check_method(method, samples)
        keys, chats, images = IMAGE_FIELDS[mode], [], []
        for i, it in enumerate(items):  # a bad item raises before any model work, naming its index and field
            for k in keys:
                if not hasattr(it.get(k), "convert"):
                    raise ValueError(f"item {i}: field '{k}' must be a PIL image, got {type(it.get(k)).__name__}")
            text = item_text(mode, it)
            if not isinstance(text, str) and mode != "quality":
                raise ValueError(f"item {i}: field '{'instruction' if mode in EDIT_MODES else 'prompt'}' must be a string")
            msgs = critic_messages(mode, text or "", it.get("requirement"), self.prompts)
            chats.append(self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
            images.append([it[k].convert("RGB") for k in keys])
        out = []
        for s in range(0, len(items), self.batch_size):
            batch = self.processor(text=chats[s:s + self.batch_size], images=images[s:s + self.batch_size],
                                   return_tensors="pt", padding=True).to(self.device)
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
            out += self._generate(mode, batch, samples) if method == "generate" else self._expected(mode, batch)
        return out

    def _generate(self, mode, batch, samples):  # -> one Judgement per item
        gc = copy.deepcopy(self.model.generation_config)
        limit = self.max_new_tokens or MAX_NEW_TOKENS[mode]
        gc.update(max_new_tokens=limit, do_sample=samples > 1, num_return_sequences=samples)
        if samples == 1:  # greedy: drop the checkpoint's sampling settings (Qwen3-VL ships temperature 0.7 etc.)
            gc.update(temperature=None, top_p=None, top_k=None)
        seqs = self.model.generate(**batch, generation_config=gc)[:, batch["input_ids"].shape[1]:]  # (B * samples, <= limit)
        texts = self.tok.batch_decode(seqs, skip_special_tokens=True)
        eos = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]
        ended = torch.isin(seqs, torch.tensor([e for e in eos if e is not None], device=seqs.device)).any(1).tolist()
        cut = [not e and seqs.shape[1] >= limit for e in ended]  # stopped by the limit, not by the critic
        out = []
        for i in range(0, len(texts), samples):  # generate returns each item's samples next to each other
            group = texts[i:i + samples]
            text, parsed = "\n---\n".join(group), [parse_score(t, N_SCORES[mode], mode) for t in group]
            parsed = [Parsed(None, "cut", f"answer cut at max_new_tokens={limit} before a score") if c and not p.ok else p
                      for p, c in zip(parsed, cut[i:i + samples])]
            good = [p.scores for p in parsed if p.ok]
            if samples == 1:
                out.append(Judgement(parsed[0].scores, text, parsed[0].ok, parsed[0].error, parsed[0].how))
            elif not good:
                out.append(Judgement(None, text, False, f"none of {samples} samples parsed", "failed"))
            else:
                missed = f"{samples - len(good)} of {samples} samples did not parse" if len(good) < samples else ""
                out.append(Judgement([sum(s) / len(good) for s in zip(*good)], text, True, missed, "ensemble"))
        return out

    def score_slots(self, mode):
        """Token ids of the forced answer: (prefix ids, [ids of the digits 1..5 per score slot], separator ids).

        Read off the tokenizer: the strings <answer so far> + "1".."5" must differ in their last token only
        (so a tokenizer that writes " 5" after ", " or merges "[5" still gets the right candidates).
        """
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
        ctx = ids(prefix).repeat(B, 1)  # (B, T) the forced answer so far
        values, masses = [], []  # per slot: B floats each
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
                best = ids(digits)[logits[:, digits].argmax(-1)]
                ctx = torch.cat([ctx, best[:, None], ids(sep).repeat(B, 1)], 1)
        out = []
        for vals, ms in zip(zip(*values), zip(*masses)):  # one item at a time
            text = ", ".join(f"E={v:.3f} (digit mass {m:.3f})" for v, m in zip(vals, ms))
            if min(ms) < self.min_digit_mass:
                error = f"digit probability mass {min(ms):.3f} < {self.min_digit_mass} at the score position"
                out.append(Judgement(None, text, False, error, "failed"))
            else:
                out.append(Judgement(list(vals), text, True, "", "expected"))
        return out


# -----------------------------------------------------------------------------
# rewards for the RL scripts: a parse failure never raises, it is counted

def edit_rewards(scorer, items, fusion="cme", on_failure="drop", method="generate", samples=1):
    """Edit rewards in [0, 1] from a Critic or a RewardClient: fusion "cme" (paper), "sum55" or "sum64".

    A parse failure in either mode makes that item's reward None with on_failure="drop" (the default:
    the RL caller drops the sample from its group, so a broken answer neither rewards nor punishes the
    policy), or 0.0 with on_failure="min". stats: {"n", "parse_failures": {mode: count}, "failed",
    "mean_score": {mode: mean raw score}, "errors": first few messages}.
    """
    return _rewards("edit", scorer, items, fusion, on_failure, method, samples)


def gen_rewards(scorer, items, fusion="qma", on_failure="drop", method="generate", samples=1):
    """Generation rewards in [0, 1]: fusion "qma" (paper: instruction x quality) or "instruction" alone.
    Failures as in edit_rewards."""
    return _rewards("gen", scorer, items, fusion, on_failure, method, samples)


def _rewards(kind, scorer, items, fusion, on_failure, method, samples):
    modes, fusions = REWARDS[kind]
    if fusion not in fusions:
        raise ValueError(f"{kind} fusion must be one of {fusions}, got {fusion!r}")
    if on_failure not in ("drop", "min"):
        raise ValueError(f"on_failure must be 'drop' or 'min', got {on_failure!r}")
    modes = ("instruction",) if fusion == "instruction" else modes  # no quality pass for a reward that ignores it
    per_mode = {m: scorer.score(m, items, method=method, samples=samples) for m in modes}
    return fuse_judgements(per_mode, fusion, on_failure)


def fuse_judgements(per_mode, fusion, on_failure="drop"):
    """{mode: [Judgement] * n} -> (n rewards, stats); an item with a failed mode gets None ("drop") or 0.0 ("min")."""
    n = len(next(iter(per_mode.values())))
    rewards = []
    for i in range(n):
        scores = {m: js[i].scores if N_SCORES[m] > 1 else js[i].scores[0] for m, js in per_mode.items() if js[i].ok}
        r = fuse(fusion, scores)
        rewards.append(r if r is not None else (None if on_failure == "drop" else 0.0))
    good = {m: [j.scores for j in js if j.ok] for m, js in per_mode.items()}
    stats = {"n": n, "parse_failures": {m: n - len(g) for m, g in good.items()},
             "cut": {m: sum(j.how == "cut" for j in js) for m, js in per_mode.items()},  # of the failures: hit the limit
             "failed": sum(not all(js[i].ok for js in per_mode.values()) for i in range(n)),
             "mean_score": {m: sum(map(min, g)) / len(g) if g else None for m, g in good.items()},  # quality: the min
             "errors": [j.error for js in per_mode.values() for j in js if not j.ok][:5]}
    return rewards, stats


# -----------------------------------------------------------------------------
# the wire format (JSON, base64 images; the release's field names) and the client

class RequestError(Exception):
    """A request the server refuses: HTTP status + a message naming the field."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def encode_image(im, fmt="PNG"):
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def decode_image(s, where):
    if not isinstance(s, str):
        raise RequestError(400, f"{where}: expected a base64 string, got {type(s).__name__}")
    try:
        data = base64.b64decode(s.split(",", 1)[1] if s.startswith("data:") else s, validate=True)  # data: URLs too
        im = Image.open(io.BytesIO(data))
        if im.format in ("PNG", "JPEG"):
            return im.convert("RGB")
    except ValueError as e:  # binascii.Error
        raise RequestError(400, f"{where}: not valid base64 ({e})") from None
    except (OSError, Image.DecompressionBombError) as e:  # OSError includes PIL's UnidentifiedImageError
        raise RequestError(400, f"{where}: not a readable PNG or JPEG image ({e})") from None
    raise RequestError(400, f"{where}: {im.format} image; send PNG or JPEG")


def items_to_request(mode, items, fmt="PNG"):
    edit = mode in EDIT_MODES
    body = {"images": [encode_image(it["edited" if edit else "image"], fmt) for it in items],
            "prompts": [item_text(mode, it) or "" for it in items],
            "metadatas": [{"requirement": it.get("requirement")} for it in items]}
    if edit:
        body["ref_images"] = [encode_image(it["source"], fmt) for it in items]
    return body


def request_to_items(kind, body, max_items):
    """Validate a request body and turn it into Critic items; the RequestError names what is wrong."""
    def need(ok, message, status=400):
        if not ok:
            raise RequestError(status, message)

    edit = kind == "edit"
    need(isinstance(body, dict), "request body must be a JSON object")
    images = body.get("images")
    need(isinstance(images, list) and images, "field 'images' must be a non-empty list of base64 images")
    n = len(images)
    need(n <= max_items, f"field 'images': {n} items > the server's limit of {max_items} per request", 413)
    for field in ("prompts", "ref_images") if edit else ("prompts",):
        v = body.get(field)
        need(isinstance(v, list) and len(v) == n, f"field '{field}' must be a list with one entry per image ({n}), "
                                                  f"got {len(v) if isinstance(v, list) else type(v).__name__}")
    metas = body.get("metadatas") or [{}] * n
    need(isinstance(metas, list) and len(metas) == n and all(isinstance(m, dict) for m in metas),
         f"field 'metadatas' must be a list of {n} objects")
    method, samples = body.get("method", "generate"), body.get("samples", 1)
    try:
        check_method(method, samples, max_samples=32)
    except ValueError as e:
        raise RequestError(400, f"field {e}") from None
    items = []
    for i, (prompt, meta) in enumerate(zip(body["prompts"], metas)):
        need(isinstance(prompt, str), f"field 'prompts'[{i}] must be a string")
        need(isinstance(meta.get("requirement"), (str, type(None))),
             f"field 'metadatas'[{i}].requirement must be a string or null")
        it = {"requirement": meta.get("requirement") or None, ("instruction" if edit else "prompt"): prompt,
              ("edited" if edit else "image"): decode_image(images[i], f"field 'images'[{i}]")}
        if edit:
            it["source"] = decode_image(body["ref_images"][i], f"field 'ref_images'[{i}]")
        items.append(it)
    return items, method, samples


def judgements_to_response(mode, js):
    one = N_SCORES[mode] == 1
    return {"scores": [(j.scores[0] if one else j.scores) if j.ok else None for j in js],
            "reasonings": [j.text for j in js], "ok": [j.ok for j in js], "errors": [j.error for j in js],
            "how": [j.how for j in js], "parse_failures": sum(not j.ok for j in js)}


def response_to_judgements(resp):
    return [Judgement(None if s is None else (s if isinstance(s, list) else [s]), t, ok, e, h)
            for s, t, ok, e, h in zip(resp["scores"], resp["reasonings"], resp["ok"], resp["errors"], resp["how"])]


class RewardClient:
    """The reward server as a scorer: .score(mode, items, method, samples) like Critic.score.

    Items go in requests of `chunk`; each HTTP call has a `timeout` (s); connection errors, timeouts and
    5xx answers are retried with exponential backoff (1, 2, 4, ... s); a 4xx answer (a bad request)
    raises ValueError at once. Keep `timeout` above the time the server needs to work through the
    requests queued before yours (all RL ranks together): a timed-out call is sent again.
    """

    def __init__(self, url="http://127.0.0.1:8765", token=None, timeout=600, retries=3, chunk=64):
        self.url, self.timeout, self.retries, self.chunk = url.rstrip("/"), timeout, retries, chunk
        self.token = token or os.environ.get("FIRM_REWARD_TOKEN")

    def _call(self, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {self.token}"} if self.token else {})
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(2 ** (attempt - 1), 30))
            try:
                req = urllib.request.Request(self.url + path, data=data, headers=headers, method="POST" if data else "GET")
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                msg = e.read().decode(errors="replace")
                try:
                    msg = json.loads(msg)["error"]
                except (ValueError, KeyError, TypeError):
                    pass
                if e.code < 500:
                    raise ValueError(f"reward server {self.url}{path} refused the request ({e.code}): {msg}") from None
                last = f"HTTP {e.code}: {msg}"
            except (urllib.error.URLError, OSError, ValueError) as e:  # refused, reset, timed out, torn answer
                last = f"{type(e).__name__}: {e}"
        raise ConnectionError(f"reward server {self.url}{path} failed {self.retries + 1} times; last error: {last}")

    def score(self, mode, items, method="generate", samples=1):
        out = []
        for i in range(0, len(items), self.chunk):
            body = items_to_request(mode, items[i:i + self.chunk]) | {"method": method, "samples": samples}
            out += response_to_judgements(self._call(f"/score/{mode}", body))
        return out

    def health(self):
        return self._call("/health")


# -----------------------------------------------------------------------------
# the reward server: HTTP threads parse and validate; ONE worker thread owns the model(s) and batches
# the requests of concurrent clients (same mode/method/samples) together up to max_batch items.

class Batcher:
    def __init__(self, critics, max_batch=16, wait_ms=5.0):
        self.critics, self.max_batch, self.window = critics, max_batch, wait_ms / 1000
        self.queue, self.t0 = queue.Queue(), time.time()
        self.stats = {"items": 0, "batches": 0, "requests": 0, "parse_failures": {m: 0 for m in critics}}
        threading.Thread(target=self._loop, daemon=True, name="critic-worker").start()

    def score(self, modes, items, method, samples, timeout):
        """{mode: [Judgement]}: one job per mode, all queued before waiting on any (an HTTP thread calls this)."""
        jobs = {m: {"key": (m, method, samples), "items": items, "done": threading.Event(), "out": None, "err": None}
                for m in modes}
        for job in jobs.values():
            self.queue.put(job)
        self.stats["requests"] += 1
        for job in jobs.values():
            if not job["done"].wait(timeout):
                for j in jobs.values():
                    j["cancelled"] = True  # nobody waits for them any more: the worker skips them
                raise RequestError(503, f"the critic did not answer within {timeout} s (queue {self.queue.qsize()} jobs)")
            if job["err"]:
                raise RuntimeError(job["err"])
        return {m: job["out"] for m, job in jobs.items()}

    def _loop(self):
        pending = []  # jobs taken off the queue and not yet scored, oldest first
        while True:
            if not pending:
                pending.append(self.queue.get())
            deadline = time.time() + self.window  # a short window for more requests to join this batch
            while sum(len(j["items"]) for j in pending if j["key"] == pending[0]["key"]) < self.max_batch:
                try:
                    pending.append(self.queue.get(timeout=max(0.0, deadline - time.time())))
                except queue.Empty:
                    break
            pending = [j for j in pending if not j.get("cancelled")]
            if not pending:
                continue
            key, group, n = pending[0]["key"], [], 0  # the oldest job, and what fits beside it
            for j in pending:
                if j["key"] == key and (not group or n + len(j["items"]) <= self.max_batch):
                    group.append(j)
                    n += len(j["items"])
            pending = [j for j in pending if all(j is not g for g in group)]
            mode, method, samples = key
            try:
                js = self.critics[mode].score(mode, [it for j in group for it in j["items"]], method, samples)
                self.stats["parse_failures"][mode] += sum(not j.ok for j in js)
                self.stats["items"] += n
                self.stats["batches"] += 1
                for j in group:
                    j["out"], js = js[:len(j["items"])], js[len(j["items"]):]
            except Exception as e:  # a crash in the model (e.g. out of memory) fails these requests, never the server
                torch.cuda.empty_cache()  # a no-op without CUDA
                for j in group:
                    j["err"] = f"critic failed: {type(e).__name__}: {e}"
            for j in group:
                j["done"].set()


def make_server(critics, host="127.0.0.1", port=8765, token=None, max_bytes=64 << 20, max_items=256, max_batch=16,
                wait_ms=5.0, request_timeout=600, quiet=False):
    """A ThreadingHTTPServer for critics {mode: Critic}; call .serve_forever() (port 0 = any free port)."""
    batcher = Batcher(critics, max_batch, wait_ms)

    class Handler(BaseHTTPRequestHandler):
        timeout = 120  # seconds a client may take to send its request (a stalled client frees its thread)

        def log_message(self, fmt, *args):
            if not quiet:
                sys.stderr.write(f"[reward] {self.address_string()} {fmt % args}\n")

        def _send(self, status, obj):
            data = json.dumps(obj).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client left; nothing to tell it
                pass

        def do_GET(self):
            if self.path != "/health":
                return self._send(404, {"error": f"no such endpoint {self.path}; GET /health"})
            self._send(200, {"status": "ok", "modes": sorted(critics), "queued": batcher.queue.qsize(),
                             "uptime_s": round(time.time() - batcher.t0, 1), **batcher.stats})

        def do_POST(self):
            try:
                self._send(200, self._post())
            except RequestError as e:
                self._send(e.status, {"error": str(e)})
            except Exception as e:  # a bug or a crashed critic fails this request only
                self._send(500, {"error": f"{type(e).__name__}: {e}"})

        def _read_body(self):
            """The body, read in full even when refused, so the client gets our answer, not a reset socket."""
            size = self.headers.get("Content-Length", "")
            size = int(size) if size.isdigit() else -1
            if size < 0:
                self.close_connection = True
                raise RequestError(411, "a valid Content-Length header is required")
            if size > max_bytes:
                self.close_connection = True
                left = size if size <= 8 * max_bytes else 0  # drain a moderately large one; drop a huge one
                while left > 0:
                    chunk = self.rfile.read(min(1 << 16, left))
                    left = left - len(chunk) if chunk else 0
                raise RequestError(413, f"request of {size} bytes > the limit of {max_bytes} bytes (--max-request-mb)")
            return self.rfile.read(size)

        def _post(self):
            data = self._read_body()
            if token and not hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {token}"):
                raise RequestError(401, "missing or wrong bearer token (header 'Authorization: Bearer <token>')")
            where, _, name = self.path.rstrip("/").replace("/mode/score_", "/score/").rpartition("/")  # + release path
            kind = name if where == "/reward" and name in REWARDS else None
            mode = name if where == "/score" and name in N_SCORES else None
            if not (kind or mode):
                raise RequestError(404, f"no such endpoint {self.path}; "
                                        f"POST /score/<{'|'.join(N_SCORES)}>, /reward/edit, /reward/gen")
            modes = REWARDS[kind][0] if kind else (mode,)
            if any(m not in critics for m in modes):
                raise RequestError(404, f"this server has no critic for {[m for m in modes if m not in critics]}; "
                                        f"it serves {sorted(critics)}")
            try:
                body = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"request body is not valid JSON ({e})") from None
            items, method, samples = request_to_items("edit" if modes[0] in EDIT_MODES else "gen", body, max_items)
            results = batcher.score(modes, items, method, samples, request_timeout)
            if mode:
                return judgements_to_response(mode, results[mode])
            per = {m: judgements_to_response(m, results[m]) for m in modes}
            out = {k: {m: per[m][k] for m in modes} for k in ("scores", "reasonings", "ok", "errors", "parse_failures")}
            out["rewards"] = {f: fuse_judgements(results, f)[0] for f in REWARDS[kind][1]}
            return out

    return ThreadingHTTPServer((host, port), Handler)


# -----------------------------------------------------------------------------
# CLI

def get_args(argv=None):
    ap = argparse.ArgumentParser(description="FIRM critics: score items or serve rewards")
    sub = ap.add_subparsers(dest="cmd", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    serve, score = sub.add_parser("serve", formatter_class=fmt), sub.add_parser("score", formatter_class=fmt)
    for p in (serve, score):
        # critic
        p.add_argument("--model", default=None, help="critic model directory (serve: for every mode)")
        p.add_argument("--prompt-file", default=None,
                       help="JSON {mode: template, answer_prefix: {...}} a checkpoint was trained with")
        p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
        p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                       help="default bf16 on GPU, fp32 on CPU")
        p.add_argument("--batch-size", type=int, default=16, help="items per forward/generate batch")
        p.add_argument("--max-new-tokens", type=int, default=None, help="tokens per generated answer (default: the "
                       "release's per-mode limit, 256 edit / 8192 gen)")
        p.add_argument("--min-digit-mass", type=float, default=0.5, help="'expected': fail below this digit probability")
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
        p.add_argument("--token-file", default=None, help="file holding the bearer token the server requires / the client "
                       "sends (default: $FIRM_REWARD_TOKEN); never the token itself: argv is visible to every user")
    # serve
    serve.add_argument("--edit-model", default=None, help="critic for execution/consistency")
    serve.add_argument("--gen-model", default=None, help="critic for instruction/quality")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes it to the network)")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--max-request-mb", type=float, default=64, help="request size limit in MiB")
    serve.add_argument("--max-items", type=int, default=256, help="items per request")
    serve.add_argument("--batch-wait-ms", type=float, default=5, help="ms to wait for more requests to join a batch")
    serve.add_argument("--request-timeout", type=float, default=600, help="s a request may wait for the critic")
    # score
    score.add_argument("--url", default=None, help="score through a reward server instead of loading --model")
    score.add_argument("--input", required=True,
                       help="JSONL: edit {id, source, edited, instruction} or gen {id, image, prompt}")
    score.add_argument("--out", required=True, help="JSONL of judgements (resumes: ids already there are skipped)")
    score.add_argument("--mode", default=None, choices=list(N_SCORES), help="default: each row's 'mode' field")
    score.add_argument("--method", default="generate", choices=["generate", "expected"])
    score.add_argument("--samples", type=int, default=1, help="self-ensemble size (generate only)")
    return ap.parse_args(argv)


def load_critic(args, path):
    return Critic(path, args.device, args.dtype, args.prompt_file, args.max_new_tokens, args.batch_size, args.min_digit_mass)


def run_serve(args):
    paths = {m: args.edit_model or args.model for m in EDIT_MODES} | {m: args.gen_model or args.model for m in GEN_MODES}
    paths = {m: p for m, p in paths.items() if p}
    if not paths:
        die("give --model DIR, or --edit-model DIR and/or --gen-model DIR")
    loaded = {p: load_critic(args, p) for p in set(paths.values())}  # one copy of a model serving several modes
    token = read_secret("FIRM_REWARD_TOKEN", args.token_file)
    server = make_server({m: loaded[p] for m, p in paths.items()}, args.host, args.port, token,
                         int(args.max_request_mb * (1 << 20)), args.max_items, args.batch_size, args.batch_wait_ms,
                         args.request_timeout)
    print(f"serving {sorted(paths)} on http://{args.host}:{server.server_address[1]} "
          f"({'token required' if token else 'no token'}; max batch {args.batch_size})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()


def run_score(args):
    if not (args.url or args.model):
        die("give --model DIR or --url URL")
    fields = {"id": "id", "mode": "str?", "instruction": "str?", "prompt": "str?", "requirement": "str?",
              "source": "image?", "edited": "image?", "image": "image?", "human_score": "scores?"}
    lines, base, seen = read_manifest(args.input, fields, unique=None, images="decode", lines=True), Path(args.input).parent, {}
    for n, r in lines:  # every row checked before the first is scored
        r["mode"] = args.mode or r.get("mode")
        if r["mode"] not in N_SCORES:
            raise DataError(f"{args.input}:{n}: field 'mode' is {r['mode']!r}, not one of {list(N_SCORES)}; or give --mode")
        for field in IMAGE_FIELDS[r["mode"]]:
            if field not in r:
                raise DataError(f"{args.input}:{n}: missing field '{field}' (mode {r['mode']})")
        if (str(r["id"]), r["mode"]) in seen:
            raise DataError(f"{args.input}:{n}: field 'id': duplicate {r['id']!r} in mode {r['mode']} (first on line "
                            f"{seen[str(r['id']), r['mode']]})")
        seen[str(r["id"]), r["mode"]] = n
    rows = [r for _, r in lines]
    done = {(r["id"], r["mode"]) for r in read_jsonl_resumable(args.out)}
    todo = [r for r in rows if (r["id"], r["mode"]) not in done]
    scorer = RewardClient(args.url, read_secret("FIRM_REWARD_TOKEN", args.token_file)) if args.url else load_critic(args, args.model)
    t0, step = time.time(), 4 * args.batch_size  # append every few batches: a killed run resumes
    for mode in N_SCORES:
        group = [r for r in todo if r["mode"] == mode]
        for i in range(0, len(group), step):
            chunk = group[i:i + step]
            items = [{**{k: load_image(r[k], base) for k in IMAGE_FIELDS[mode]}, "instruction": r.get("instruction"),
                      "prompt": r.get("prompt"), "requirement": r.get("requirement")} for r in chunk]
            for r, j in zip(chunk, scorer.score(mode, items, method=args.method, samples=args.samples)):
                append_jsonl(args.out, {"id": r["id"], "mode": mode, "scores": j.scores, "ok": j.ok, "how": j.how,
                                        "error": j.error, "text": j.text, "human_score": r.get("human_score")})
            print(f"{mode}: {i + len(chunk)}/{len(group)} items, {time.time() - t0:.1f} s", flush=True)
    out = read_jsonl_resumable(args.out)
    for mode in sorted({r["mode"] for r in out}):
        rs = [r for r in out if r["mode"] == mode]
        good = [r for r in rs if r["ok"] and r.get("human_score") is not None]
        mae = sum(abs(r["scores"][0] - r["human_score"]) for r in good) / len(good) if good else float("nan")
        print(f"{mode:<12} n={len(rs):<5} parse failures {sum(not r['ok'] for r in rs):<5} MAE vs human_score {mae:.3f} "
              f"(over {len(good)} parsed items)")


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    {"serve": run_serve, "score": run_score}[args.cmd](args)


if __name__ == "__main__":
    run_stage(main)
