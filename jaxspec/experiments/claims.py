"""The paper's claims as the reproduction tests them: statement, grids, effect, direction.

`jaxspec.experiments.results` turns these and the committed cell files under
`results/<grid>/` into RESULTS.md. A claim names the per-seed paired effect
its verdict rests on (a metric every cell of its grid records, e.g.
`gain_vs_control_top1` = specialist - control on the same test images) and
the direction the paper states; the verdict is read off the 95% t-interval
over seeds. A claim whose grids have not run yet is listed as pending with
the command that will run it; none is dropped.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Claim:
    id: str
    title: str
    paper: str  # the statement, with its table or figure
    grids: tuple[str, ...] = ()  # directories under results/, in the order they are reported
    effect: str = ""  # the paired per-seed metric the verdict rests on
    direction: int = 1  # the sign the paper claims for `effect`
    primary: tuple[tuple[str, object], ...] = ()  # the cells (axis, value) the verdict is read from
    design: str = ""  # what the grids run, and what was cut to fit the budget
    columns: tuple[str, ...] = ()  # per-cell means shown beside the effect
    # (axis, a, b, metric): the effect is cell(axis=a) - cell(axis=b) in `metric`, for cells equal otherwise;
    # for grids that put the compared models in different cells (students, methods, groupings).
    contrast: tuple[str, str, str, str] = ()
    pool: str = ""  # an axis whose values are also averaged per seed into a row "all" (e.g. the groups)
    # The two models (`*_hits`) or model scores (`replicates`) the effect compares, when its name does not
    # say (`gain_vs_control_top1` says specialist, control); e.g. ("specialist_F", "generalist_F") for dF.
    pair: tuple[str, str] = ()


CLAIMS = (
    Claim(
        id="C1",
        title="A specialist beats the generalist on its classes",
        paper="Table 1: specialists extracted from the generalist and fine-tuned on D_S beat the generalist "
        "restricted to S, on every group and on average.",
        grids=("c1_sweep", "c1"),
        effect="gain_vs_control_top1",
        primary=(("group", "animals"),),
        design="A sweep on animals (3 seeds): specialist length 10/30/100 epochs of D_S x lr 1e-4/3e-5 x "
        "BatchNorm statistics updated/frozen, each against the `continued` control of equal length "
        "(the generalist trained on all classes as long, same lr and statistics). One setting is chosen on "
        "the validation split by the rule fixed in advance (highest mean specialist validation top-1; "
        "ties to the shorter schedule), then run at 5 seeds on animals and the 5 lexicographic groups, and on "
        "animals at the number of seeds (15) whose t-interval half-width is 0.3 points at the sweep's per-seed "
        "s.d. (`configs/experiments/c1.py`, the same number of steps for every group; the row `all` averages "
        "the groups per seed, over the seeds that ran every group).",
        columns=("generalist_top1", "control_top1", "specialist_top1", "specialist_val_top1"),
        pool="group",
    ),
    Claim(
        id="C9",
        title="An SKD student beats a student trained from scratch",
        paper="SKD (seed 001): a small specialist distilled from the generalist beats the same small network "
        "trained from scratch on D_S.",
        grids=("c9_skd",),
        effect="skd_vs_scratch_top1",
        contrast=("student", "skd", "scratch", "top1"),
        pool="subset_size",
        primary=(("subset_size", "all"),),
        design="SKD at its default steps (`configs/experiments/skd.py`), 3 seeds, each with its own teacher and "
        "student-size generalist; students scored after BatchNorm re-estimation.",
    ),
    Claim(
        id="C4a",
        title="Extraction beats a fresh head",
        paper="Section 2, Fig. 5a: keeping the generalist's rows of the last layer (extraction) beats a freshly "
        "initialized head fine-tuned the same way.",
        grids=("c4_methods",),
        effect="extract_vs_fresh_head_specialist_top1",
        contrast=("method", "extract", "fresh_head", "specialist_top1"),
        pair=("extract", "fresh_head"),
        design="The six methods of `configs/experiments/methods.py` on animals at equal steps from one generalist "
        "per seed, 5 seeds, with validation curves; the effect is extract - fresh_head in specialist test top-1.",
        columns=("extract_specialist_top1", "fresh_head_specialist_top1"),
    ),
    Claim(
        id="C4b",
        title="A fresh head beats head-only-then-full",
        paper="Section 2, Fig. 5a: a fresh head fine-tuned with the whole network beats training the head alone "
        "first and then the whole network.",
        grids=("c4_methods",),
        effect="fresh_head_vs_head_then_full_specialist_top1",
        contrast=("method", "fresh_head", "head_then_full", "specialist_top1"),
        pair=("fresh_head", "head_then_full"),
        design="C4a's grid: fresh_head - head_then_full in specialist test top-1, same cells and seeds.",
        columns=("fresh_head_specialist_top1", "head_then_full_specialist_top1"),
    ),
    Claim(
        id="C3",
        title="Semantic groups gain more than random groups of equal size",
        paper="Table 3: specializing on a semantic group gains more than on a random group of the same size.",
        grids=("c3_semantic",),
        effect="semantic_vs_random_gain_vs_control_top1",
        contrast=("draw", "semantic", "random", "gain_vs_control_top1"),
        pair=("semantic", "random"),
        pool="group",
        primary=(("group", "all"), ("method", "extract")),
        design="`configs/experiments/c3_semantic.py`: six fine semantic groups inside one source (tops, footwear, "
        "livestock, wildlife; digits 3/5/8 and 4/7/9 by shape) against a random group of the same size from the "
        "same source, drawn anew by each seed; extracted and from random init (`scratch`); one generalist per "
        "seed, 5 seeds. The effect is the semantic cell's gain over the equal-length control minus the random "
        "cell's, per seed, averaged over the six groups (row `all`; the verdict on extraction). The two cells "
        "score different test images, so there is no bootstrap over shared images: the t-interval over seeds "
        "is the interval.",
        columns=("semantic_gain_vs_control_top1", "random_gain_vs_control_top1"),
    ),
    Claim(
        id="C2",
        title="The routed system beats the generalist on all classes",
        paper="Table 2: the generalist routes each image to its group's specialist; the system beats the "
        "generalist over all classes.",
        grids=("c2_routed",),
        effect="gain_top1",
        pair=("routed", "generalist"),
        primary=(("grouping", "semantic"),),
        design="`configs/experiments/table2.py`: lexicographic, semantic and confusion groupings, one generalist "
        "per seed, >= 5 seeds, with the routing accuracy and the `continued` control; the effect is routed - "
        "generalist top-1 on all test images (the verdict on the semantic grouping, the paper's headline).",
        columns=("generalist_top1", "control_top1", "routed_top1", "routing_accuracy"),
    ),
    Claim(
        id="C5",
        title="Head-only training cannot forget the irrelevant classes",
        paper="Appendix A: training only the head on D_S leaves probability mass on the irrelevant classes.",
        grids=("c5_forgetting",),
        effect="head_vs_full_end_test_irrelevant_prob",
        contrast=("train", "head", "full", "end_test_irrelevant_prob"),
        pair=("head", "full"),
        primary=(("label_smoothing", 0.0),),
        design="`configs/experiments/forgetting.py`: from each seed's generalist, the full head (all |C| outputs "
        "in the softmax) trained on D_S = animals with the body and its statistics frozen (`head`), against the "
        "same phase with the whole network trainable (`full`), label smoothing 0.1 and 0, 3 seeds; bias and "
        "mass over steps in the grid's `forgetting.png`. The effect is the probability mass left on the "
        "irrelevant classes of S's test images after head-only training minus after full training, per seed: "
        '"cannot forget" read as "forgets less than the network could in as many steps" (verdict at '
        "smoothing 0, whose target puts no floor under the mass); a mean over images of a continuous score, so "
        "the t-interval over seeds is the interval.",
        columns=("head_end_test_irrelevant_prob", "full_end_test_irrelevant_prob"),
    ),
    Claim(
        id="C6",
        title="Generalist-specialist similarity (CKA) falls with depth",
        paper="Fig. 3: linear CKA between generalist and specialist activations decreases with depth.",
        grids=("c6_cka",),
        effect="cka_drop",
        design="`configs/experiments/c6_cka.py`: minibatch linear CKA of each layer of the seed's generalist with "
        "the same layer of its animals specialist (extracted, fine-tuned), on the animals test images, one "
        "generalist per seed, 3 seeds, the curve with its band over seeds in the grid's `cka.png`. The effect is "
        "CKA at the first layer (stem) minus CKA at the last layer both share (pre_logits), per seed; CKA is "
        "not a mean over images, so the t-interval over seeds is the interval.",
        columns=("cka_stem", "cka_last_conv", "cka_pre_logits"),
    ),
    Claim(
        id="C7",
        title="A detector specialized by domain constraining beats the generalist and one trained from scratch",
        paper="Table 4: for S = animals and other groups, the generalist specialized by domain constraining and "
        "output suppression beats the generalist restricted to S and a detector trained on D_S from scratch "
        "(F, mAP@0.5, mAP@0.5:0.95).",
        grids=("detector_claims",),
        effect="dF",
        pair=("specialist_F", "generalist_F"),
        primary=(("group", "animals"), ("method", "suppress")),
        design="The results detector (`configs/detect_animals.py:full`, one generalist per seed, 3 seeds): "
        "on animals, clothing and digits the specialist by output suppression (and by head slicing) against "
        "the generalist restricted to S, with the `continued` control; on animals also a detector trained from "
        "scratch on D_S with the generalist's recipe (its row's dF is scratch - generalist). Effects in F points; "
        "the bootstrap resamples the test images (mAP re-accumulated per resample). The same grid holds C8's "
        "cells, on the same generalists.",
        columns=("generalist_F", "control_F", "specialist_F", "dF_vs_control", "dmAP50", "dmAP50_95"),
    ),
    Claim(
        id="C8",
        title="Gradual specialization beats direct specialization",
        paper="Table 5: generalist -> animals -> horse beats generalist -> horse at equal total steps.",
        grids=("detector_claims",),
        effect="animals>horse_vs_horse_specialist_F",
        contrast=("group", "animals>horse", "horse", "specialist_F"),
        pair=("animals>horse_specialist_F", "horse_specialist_F"),
        primary=(("method", "suppress"),),
        design="In C7's grid, on its generalists: the `animals>horse` chain (two stages of the specialist's "
        "recipe, each on its own D_S) against direct `horse` trained as many steps as both stages together; "
        "F on the horse test scenes, 3 seeds.",
    ),
    Claim(
        id="T7",
        title="Which layers to freeze while specializing a detector",
        paper="Table 7: freezing early layers while specializing changes F little; frozen BatchNorm statistics matter.",
        grids=("t7_freezing",),
        design="`configs/experiments/table7.py:full` on animals: five freezing ranges (none, backbone 0-9, neck "
        "10-12, neck 10-23, all but the head) x BatchNorm statistics frozen or not, 3 seeds, each seed starting "
        "from the C7/C8 grid's generalist (YOLOv5n: a YOLOv5s generalist at the results recipe would take "
        "several hours per seed on 2 cores), with the `continued` control.",
    ),
    Claim(
        id="L",
        title="Lesioning a task's units and competitive retraining",
        paper="Seed 004: lesioned units of task A are not recovered when retraining on A and B together.",
        grids=("lesion",),
        design="`configs/experiments/lesion.py`: A = animals, B = clothing, retraining 5 epochs, one generalist "
        "per seed, 3 seeds. The layer is chosen on validation before the cells (`lesion.layer=auto`): every layer "
        "a parameter lesion can silence is scored by A's accuracy lost when its top 20% of units (ranked one "
        "unit at a time) are silenced together, and the costliest is used; the scores are the cells' "
        "`layer_impact_*`.",
    ),
)
