"""The oracle judge: knows the scenes and writes the texts of the paper's curation pipelines.

Difference reports, reasoning + JSON scores, checklist plans, item-by-item analyses ending in \\boxed{n}, with a
noise model in which a judge scoring directly misses details more often than one that first writes a difference
report or plan (the paper's argument for its pipelines).

As judges (the seams: reward.open_critic and curate.py --judge name them by these factories):
    toy.oracle:noisy    a critic answering as the teacher does after its difference report / plan (noise 0.15)
    toy.oracle:direct   a critic answering as the teacher does when it scores directly (noise 0.15)
    toy.oracle:teacher  curate.py's judge: the difference report or plan, then the answers
    toy.oracle:seeing   toy.oracle:noisy on the scene it reads from the image (toy.perception): a reward for RL
The others judge the scenes in the record's `toy` field (scene, out_scene, edit, degrade), not the pixels.
"""

import copy
import json
import random

from reward import EDIT_MODES, GEN_MODES, N_SCORES, Judgement, parse_score
from toy.judges import ground_truth
from toy.perception import read_back

from toy.rubrics import (consistency_score, execution_score, instruction_score, quality_scores, requested_kinds,
                         unintended_changes)
from toy.world import (Scene, change_phrase, check_items, checklist, describe, item_value, request_summary, revert,
                       scene_changes)

# -----------------------------------------------------------------------------
# the oracle judge: the texts of the paper's curation pipelines


VERDICT = {5: "fully done", 4: "done, one detail off", 3: "partly done", 2: "barely done", 1: "not done"}
GEN_VERDICT = {5: "all correct", 4: "main content right, details off", 3: "several requirements missing",
               2: "most subjects missing or wrong", 1: "irrelevant image"}


class OracleJudge:
    """Knows the scenes; writes what a teacher MLLM writes. `noise` makes it imperfect.

    mode "report" (difference-first / plan-then-score, the paper's pipelines) misses fewer
    changes and details than mode "direct" (scoring without a report or plan).
    """

    MISS = {"report": {"minor": 1.0, "significant": 0.15, "jitter": 0.25},
            "direct": {"minor": 2.5, "significant": 0.8, "jitter": 0.5}}

    def __init__(self, noise=0.0, mode="report", seed=0):
        assert mode in self.MISS, mode
        self.noise, self.mode, self.seed = noise, mode, seed

    def _rng(self, key):
        return random.Random(f"{self.seed}:{self.mode}:{key}")

    def _p(self, what):
        return min(1.0, self.noise * self.MISS[self.mode][what])

    def _jitter(self, rng, score):
        if rng.random() < self._p("jitter"):
            score = min(5, max(1, score + rng.choice([-1, 1])))
        return score

    def perceive_edit(self, key, src, out):
        """The scene the judge believes it sees: some changes missed, small ones most often."""
        rng = self._rng(key)
        missed = [c for c in scene_changes(src, out)
                  if rng.random() < self._p("significant" if c["significant"] else "minor")]
        return revert(src, out, missed)

    # -- edit: difference report (two passes), then execution and consistency answers
    def difference_report(self, src, out):
        ch = scene_changes(src, out)
        obvious = [change_phrase(src, out, c) for c in ch if c["significant"]]
        lines = ["Obvious changes: " + ("; ".join(obvious) if obvious else "none") + "."]
        n0, n1 = len(src.objects), len(out.objects)
        lines.append(f"Quantity: {n0} object(s) before, {n1} after.")
        groups = {"Shape": ("shape", "added", "removed", "size"), "Texture/color": ("color", "tint", "background"),
                  "Position/layout": ("moved", "nudged")}
        for title, kinds in groups.items():
            items = [change_phrase(src, out, c) for c in ch if c["kind"] in kinds]
            lines.append(f"{title}: " + ("; ".join(items) if items else "no change") + ".")
        return "\n".join(lines)

    def judge_edit(self, key, src, out, edit):
        """Returns {"execution": (answer_text, score), "consistency": (answer_text, score)}."""
        seen = self.perceive_edit(key, src, out)
        rng = self._rng(key + ":j")
        ex = self._jitter(rng, execution_score(src, seen, edit))
        co = self._jitter(rng, consistency_score(src, seen, edit))
        relevant = [change_phrase(src, seen, c) for c in scene_changes(src, seen) if (c["id"], c["kind"]) in requested_kinds(edit)
                    or c["kind"] in ("added", "removed")]
        seen_txt = "; ".join(relevant) if relevant else "no requested change visible"
        # Both answers first describe the two images, then say what changed (as the judge sees it), then judge it:
        # the critic learns to look first. A tiny critic describes each image far more reliably than it compares
        # two images directly, and the change list can then be read off its own two descriptions.
        changed = (f"Image 1: {describe(src)}. Image 2: {describe(seen)}. Changes: "
                   + ("; ".join(change_phrase(src, seen, c) for c in scene_changes(src, seen)) or "nothing") + ".")
        ex_reason = f"{changed} Asked: {request_summary(src, edit)}. Seen: {seen_txt}. Execution {VERDICT[ex]}."
        un = unintended_changes(src, seen, edit)
        sig = sum(c["significant"] for c in un)
        un_txt = "; ".join(change_phrase(src, seen, c) for c in un) if un else "none"
        co_reason = f"{changed} Unrequested changes: {un_txt}. {sig} significant, {len(un) - sig} minor."
        return {"execution": (answer_json(ex_reason, [ex]), ex), "consistency": (answer_json(co_reason, [co]), co)}

    # -- generation: plan, then item-by-item analysis ending in \boxed{n}; quality ratings
    def plan(self, want):
        lines = ["Analysis plan:"]
        for i, (text, kind, _) in enumerate(checklist(want), 1):
            lines.append(f"{i}. {text} ({'main subject' if kind == 'main' else kind.split('-')[1]})")
        return "\n".join(lines)

    def judge_gen(self, key, want, got, degrade):
        """Returns {"instruction": (analysis_text, score), "quality": (answer_text, [a, t, s])}."""
        rng = self._rng(key)
        res = check_items(want, got)
        seen = copy.deepcopy(got)  # details the judge overlooks are taken as matching the prompt
        for text, kind, oid, ok in res:
            if ok or rng.random() >= self._p("minor" if kind != "main" else "significant"):
                continue
            w, g = want.get(oid), seen.get(oid)
            if kind == "detail-background":
                seen.background = want.background
            elif g is not None and kind == "detail-size":
                g.size = w.size
            elif g is not None and kind == "detail-position":
                g.col, g.row = w.col, w.row
            elif kind == "main":
                seen.objects = [o for o in seen.objects if o.id != oid] + [copy.deepcopy(w)]
        score = self._jitter(rng, instruction_score(want, seen))
        # first what the prompt asks and what the image shows, then each checklist item with what was seen for it and
        # the verdict: the tiny critic describes an image far more reliably than it checks a requirement against it
        # (as the edit answers describe both images first, judge_edit), and each verdict then compares two
        # neighbouring values
        lines = [f"Asked: {describe(want)}.", f"Seen: {describe(seen)}."]
        for i, (text, kind, oid, ok) in enumerate(check_items(want, seen), 1):
            lines.append(f"{i}. {text}: {item_value(seen, kind, oid)}, {'yes' if ok else 'no'}")
        extras = [o.name for o in seen.objects if want.get(o.id) is None]
        if extras:
            lines.append("Unrequested: " + ", ".join(extras) + ".")
        lines.append(f"Overall: {GEN_VERDICT[score]}. \\boxed{{{score}}}")
        q = [self._jitter(rng, s) for s in quality_scores(degrade)]
        words = {5: "clean", 4: "slight", 3: "visible", 2: "strong", 1: "severe"}
        q_reason = f"Aesthetics {words[q[0]]}, noise {words[q[1]]}, blur {words[q[2]]}."
        return {"instruction": ("\n".join(lines), score), "quality": (answer_json(q_reason, q), q)}


def answer_json(reasoning, score):
    return json.dumps({"reasoning": reasoning, "score": score})



# -----------------------------------------------------------------------------
# the oracle as judges

NOISE = 0.15  # how often the teacher misses things (the curation pipelines' teacher and bench's oracle baselines)


def answers(judge, kind, key, truth, direct=False):
    """(difference report or plan, {mode: answer text}) of `judge` for one record's ground truth; kind edit | gen."""
    want, got = Scene.from_dict(truth["scene"]), Scene.from_dict(truth["out_scene"])
    if kind == "edit":
        ans = judge.judge_edit(key, want, got, truth["edit"])
        return (None if direct else judge.difference_report(want, got)), {m: ans[m][0] for m in EDIT_MODES}
    ans = judge.judge_gen(key, want, got, truth.get("degrade"))
    return (None if direct else judge.plan(want)), {m: ans[m][0] for m in GEN_MODES}


class OracleCritic:
    """The teacher as a critic: its answer texts, parsed as every critic's answers are (reward.parse_score).
    see=False: it judges the scene in the record (a candidate's out_scene); see=True: the scene it reads from the
    item's image (toy.perception, as the policies' own samples are labelled), so it can score RL samples."""

    def __init__(self, mode, see=False):
        self.judge, self.see = OracleJudge(NOISE, mode), see

    def score(self, mode, items, method="generate", samples=1):
        """The oracle's answer is a function of the record (and the image it reads): `method` and `samples` change
        nothing."""
        kind = "edit" if mode in EDIT_MODES else "gen"
        out = []
        for item in items:
            fields = ("scene",) + (() if self.see else ("out_scene",)) + (("edit",) if kind == "edit" else ())
            truth = ground_truth(item.get("record"), fields)
            if self.see:  # the image read back, its objects paired with the prompt's (and the edit's target's)
                seen, degrade = read_back(item["edited" if kind == "edit" else "image"], Scene.from_dict(truth["scene"]),
                                          truth["edit"] if kind == "edit" else None)
                truth = dict(truth, out_scene=seen.to_dict(), degrade=degrade)
            text = answers(self.judge, kind, item["record"]["id"], truth)[1][mode]
            parsed = parse_score(text, N_SCORES[mode], mode)
            out.append(Judgement(parsed.scores, text, parsed.ok, parsed.error, parsed.how))
        return out


def noisy():
    """The teacher's answers after its difference report / plan (bench's "oracle:0.15:report")."""
    return OracleCritic("report")


def direct():
    """The teacher's answers when it scores directly (bench's "oracle:0.15:direct")."""
    return OracleCritic("direct")


class Teacher:
    """curate.py's judge for the world: edit(record) / gen(record) -> (difference report or plan, {mode: answer}),
    read from the candidate record's own `toy` field; direct=True answers without the report or plan."""

    def __init__(self, noise=NOISE, seed=0):
        self.judges = {m: OracleJudge(noise, m, seed) for m in ("report", "direct")}

    def edit(self, record, direct=False):
        truth = ground_truth(record, ("scene", "out_scene", "edit"), "candidate")
        return answers(self.judges["direct" if direct else "report"], "edit", record["id"], truth, direct)

    def gen(self, record, direct=False):
        truth = ground_truth(record, ("scene", "out_scene"), "candidate")
        return answers(self.judges["direct" if direct else "report"], "gen", record["id"], truth, direct)


def teacher():
    return Teacher()


def seeing():
    """The teacher's answers after its difference report / plan on the scene it reads from the image: what a critic
    trained on the policies' own samples (python -m toy policy-candidates) learns to imitate, as a reward."""
    return OracleCritic("report", see=True)
