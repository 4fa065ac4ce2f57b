"""FIRM critics as rewards: scoring prompts, robust score parsing, CME / QMA fusion (Sec 3.4).

(The critic inference API and the reward server are added below the pure functions.)
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

# -----------------------------------------------------------------------------
# scoring prompts (our wording of the rubrics in FIRM_NOTES section 2). The critic is trained on
# exactly these (train_reward.py reads them from the SFT files written by curate.py); a released
# checkpoint trained on other templates is scored with --prompt-file (a JSON {mode: template}).

PROMPTS = {
    "execution": (
        "You judge an image edit. Image 1 is the original, image 2 is the edited result.\n"
        "Instruction: {instruction}\n{requirement}"
        "Rate EXECUTION 1-5: is every requested change present and correct? Ignore unrequested changes and image quality.\n"
        "5 all requested changes correct; 4 all key parts done, one subtle detail missing; 3 main intent done but "
        "important requested parts missing or wrong; 2 barely follows; 1 nothing requested is visible.\n"
        'Explain briefly, then answer as JSON: {"reasoning": "...", "score": [n]}'
    ),
    "consistency": (
        "You judge an image edit. Image 1 is the original, image 2 is the edited result.\n"
        "Instruction: {instruction}\n{requirement}"
        "Rate CONSISTENCY 1-5: count only changes the instruction did NOT ask for. Ignore occlusion by the edit, "
        "small lighting or quality shifts, and direct consequences of the edit.\n"
        "5 nothing else changed; 4 one significant and/or 1-2 minor unrequested changes; 3 two-three significant "
        "and/or 3-4 minor; 2 four or more significant and/or 5+ minor; 1 an almost entirely different image.\n"
        'Explain briefly, then answer as JSON: {"reasoning": "...", "score": [n]}'
    ),
    "instruction": (
        "You judge a generated image against its prompt.\nPrompt: {prompt}\n{requirement}"
        "Check every subject, attribute, position and the background the prompt asks for, item by item. "
        "Rate INSTRUCTION FOLLOWING 1-5: 5 everything correct; 4 main content right, 1-2 non-critical details off; "
        "3 main subject present but several requirements missing; 2 most subjects missing or wrong; 1 irrelevant image.\n"
        "End with the final rating as \\boxed{n}."
    ),
    "quality": (
        "You judge the quality of an image, ignoring what it shows.\n"
        "Rate three things 1-5 (5 best): aesthetics; technical quality (noise, blur, artefacts); structure and texture.\n"
        'Explain briefly, then answer as JSON: {"reasoning": "...", "score": [aesthetics, technical, structure]}'
    ),
}
N_SCORES = {"execution": 1, "consistency": 1, "instruction": 1, "quality": 3}
EDIT_MODES, GEN_MODES = ("execution", "consistency"), ("instruction", "quality")


def load_prompts(path=None):
    """The default templates, with any given in a JSON file {mode: template} replacing them."""
    prompts = dict(PROMPTS)
    if path:
        user = json.loads(Path(path).read_text())
        unknown = set(user) - set(PROMPTS)
        if unknown:
            raise ValueError(f"{path}: unknown scoring mode(s) {sorted(unknown)}; expected some of {sorted(PROMPTS)}")
        prompts.update(user)
    return prompts


def build_prompt(mode, text="", requirement=None, prompts=PROMPTS):
    """The user turn for one item. `text` is the edit instruction or the generation prompt."""
    req = f"Requirement: {requirement}\n" if requirement else ""
    return prompts[mode].replace("{instruction}", text).replace("{prompt}", text).replace("{requirement}", req)


# -----------------------------------------------------------------------------
# score parsing: JSON, then \boxed{}, then lenient patterns. Anything else is a failure, never a number.


@dataclass
class Parsed:
    scores: list  # list of ints in 1..5, or None when parsing failed
    how: str  # "json" | "boxed" | "pattern" | "failed"
    error: str = ""

    @property
    def ok(self):
        return self.scores is not None


def _as_scores(value, n):
    """A JSON "score" value (list / number / numeric string) -> n ints in 1..5, or None."""
    if isinstance(value, (int, float, str)):
        value = [value]
    if not isinstance(value, list) or len(value) != n:
        return None
    out = []
    for v in value:
        if isinstance(v, str):
            v = v.strip()
            if not re.fullmatch(r"[1-5](\.0+)?", v):
                return None
            v = float(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or not 1 <= v <= 5:
            return None
        out.append(int(v))
    return out


def _json_objects(text):
    """Every balanced {...} substring that parses as a JSON object, outermost first."""
    for start in [i for i, ch in enumerate(text) if ch == "{"]:
        depth, in_str, esc = 0, False, False
        for j in range(start, len(text)):
            ch = text[j]
            if in_str:
                esc, in_str = (not esc and ch == "\\"), (in_str if (esc or ch != '"') else False)
                continue
            if ch == '"':
                in_str = True
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    try:
                        obj = json.loads(text[start:j + 1])
                    except json.JSONDecodeError:
                        break
                    if isinstance(obj, dict):
                        yield obj
                    break


_PATTERNS = [
    r"\bscores?\s*(?:is|of|=|:)?\s*\[?\s*([1-5](?:\s*,\s*[1-5])*)\s*\]?(?![\d.])",
    r"\brating\s*(?:is|of|=|:)?\s*\[?\s*([1-5](?:\s*,\s*[1-5])*)\s*\]?(?![\d.])",
    r"(?<![\d.])([1-5])\s*/\s*5\b",
]


def parse_score(text, n=1):
    """Parse a critic answer into n integer scores in 1..5.

    Order: a JSON object with a "score" field (list, number or numeric string); then the last
    \\boxed{...}; then lenient patterns ("score: 4", "Score [3, 4, 5]", "4/5"). Out-of-range or
    wrong-count scores and anything unrecognised give Parsed(None, "failed", reason).
    """
    if not isinstance(text, str) or not text.strip():
        return Parsed(None, "failed", "empty answer")
    for obj in _json_objects(text):
        if "score" in obj:
            scores = _as_scores(obj["score"], n)
            if scores is None:
                return Parsed(None, "failed", f"JSON score {obj['score']!r} is not {n} integer(s) in 1..5")
            return Parsed(scores, "json")
    boxed = re.findall(r"\\boxed\{\s*([^{}]*?)\s*\}", text)
    if boxed:
        scores = _as_scores([s.strip() for s in boxed[-1].split(",")], n)
        if scores is None:
            return Parsed(None, "failed", f"\\boxed{{{boxed[-1]}}} is not {n} integer(s) in 1..5")
        return Parsed(scores, "boxed")
    for pat in _PATTERNS:
        m = re.findall(pat, text, flags=re.IGNORECASE)
        if m:
            scores = _as_scores([s.strip() for s in m[-1].split(",")], n)
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
    E, C = normalize_score(execution), normalize_score(consistency)
    return min(1.0, max(0.0, E * (0.6 + 0.4 * C)))


def qma(instruction, quality):
    """Quality-Modulated Alignment: R = I * (0.4 + 0.6 Q), Q = (min(aesthetics, technical, structure) - 1) / 4."""
    I, Q = normalize_score(instruction), normalize_score(min(quality))
    return min(1.0, max(0.0, I * (0.4 + 0.6 * Q)))


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


def fuse(name, scores):
    """Fused reward from a dict of per-mode scores, or None when a needed score failed to parse."""
    try:
        return FUSIONS[name](scores)
    except (KeyError, TypeError):
        return None
