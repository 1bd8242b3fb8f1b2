"""Label signatures (tfbackdoor.signature): on real CIFAR-10 images, a 10%-poisoned label stands
out and its poisons rank first; a clean set has no suspect label."""

import numpy as np
import pytest

from tfbackdoor import signature, victim


@pytest.fixture(scope="module")
def cifar(data_dir):
    from tfbackdoor import data

    # Enough samples per label for 768 features (a label of 300 sits near the noise floor of its own
    # covariance estimate: BENCHMARKS "End-to-end defense").
    return data.load_arrays("cifar10:train", limit=20000, seed=0)


def _auroc(proj, is_poison):
    from tfbackdoor import metrics

    return metrics.auroc(proj[~is_poison], proj[is_poison])


@pytest.mark.parametrize("attack", ["sig", "lf"])
def test_a_low_frequency_trigger_the_detector_misses_is_found_by_its_label_signature(cifar, attack):
    """SIG and LF change every poisoned image the same smooth way: no per-image detector flag is
    needed; the target label's signature stands out and puts its poisons first."""
    x, y = cifar
    xp, yp, idx = victim.poison(x, y, victim.resolve_trigger(attack, 32), 0.1, 3, seed=0)
    feats = signature.features(xp, k=16)
    assert feats.shape == (len(xp), 16 * 16 * 3) and feats.dtype == np.float32
    sigs = signature.label_signatures(feats, yp)                 # no detector flags at all
    assert signature.suspect_by_signature(sigs) == [3]
    sel = yp == 3
    is_p = np.isin(np.flatnonzero(sel), idx)
    assert sigs[3]["method"] == "principal" and _auroc(sigs[3]["projection"], is_p) > 97
    flags, info = signature.screen(np.zeros(len(xp)), yp, 0.5, suspect_top=60, feats=feats)
    assert info["suspect_labels"] == [3] and flags[idx].mean() > 0.97
    assert flags[~sel].sum() == 0                                # nothing outside the suspect label
    # a detector's ordinary false positives (1.3% of every label, poisons included) must not steer
    # the direction: label 3 is not singled out by them, so its principal direction is kept
    noise = np.random.default_rng(1).random(len(xp)) < 0.013
    flags, info = signature.screen(noise.astype(float), yp, 0.5, suspect_top=60, feats=feats)
    assert info["suspect_labels"] == [3] and info["signature"][3]["method"] == "principal"
    assert flags[idx].mean() > 0.97


def test_the_detectors_flags_teach_the_discriminant(cifar):
    """With some poisons flagged by a detector, the label's direction is the discriminant between
    flagged and unflagged samples, and it ranks the poisons the detector missed above clean ones."""
    x, y = cifar
    xp, yp, idx = victim.poison(x, y, victim.resolve_trigger("badnets3", 32), 0.1, 3, seed=0)
    flags = np.zeros(len(xp), bool)
    flags[idx[: len(idx) // 2]] = True                           # a detector that caught half of them
    sigs = signature.label_signatures(signature.features(xp, k=16), yp, flags)
    assert sigs[3]["method"] == "discriminant"
    sel = np.flatnonzero(yp == 3)
    missed = np.isin(sel, idx[len(idx) // 2:])
    clean = ~np.isin(sel, idx)
    proj = sigs[3]["projection"]
    assert _auroc(np.concatenate([proj[clean], proj[missed]]), np.r_[np.zeros(clean.sum(), bool), np.ones(missed.sum(), bool)]) > 90


def test_a_clean_set_has_no_suspect_label(cifar):
    x, y = cifar
    feats = signature.features(x, k=16)
    flags, info = signature.screen(np.zeros(len(x)), y, 0.5, suspect_top=60, feats=feats)
    assert info["suspect_labels"] == [] and not flags.any()
    lams = [v["lambda"] for v in info["signature"].values()]
    assert max(lams) < signature.FACTOR * np.median(lams) / 1.5     # clean labels stay well below the bar


def test_in_a_label_the_flags_single_out_either_ranking_can_remove_a_sample(cifar):
    """There the detector's score and the discriminant both know the trigger; the screen cuts by
    the higher of a sample's two ranks, so what the detector ranks high goes as well as what the
    discriminant ranks high (a cut by the projection alone keeps about 40% of the first kind)."""
    x, y = cifar
    xp, yp, idx = victim.poison(x, y, victim.resolve_trigger("badnets3", 32), 0.1, 3, seed=0)
    feats = signature.features(xp, k=16)
    scores = np.zeros(len(xp))
    scores[idx[: len(idx) // 2]] = 0.9                           # caught: above the threshold
    clean3 = np.setdiff1d(np.flatnonzero(yp == 3), idx)
    near = np.random.default_rng(0).choice(clean3, 100, replace=False)
    scores[near] = 0.45                                          # the detector's near misses, below it
    flags, info = signature.screen(scores, yp, 0.5, suspect_top=60, feats=feats)
    assert info["suspect_labels"] == [3] and info["signature"][3]["method"] == "discriminant"
    assert flags[near].all()                                     # the detector's ranking counts
    assert flags[idx[len(idx) // 2:]].mean() > 0.9               # and so does the discriminant's
    proj_only = signature.label_signatures(feats, yp, scores > 0.5)[3]["projection"]
    sel = np.flatnonzero(yp == 3)
    from tfbackdoor import metrics
    by_proj = sel[metrics.flagged(proj_only, metrics.top_threshold(proj_only, np.inf, 60))]
    assert np.isin(near, by_proj).mean() < 0.9                   # what the max adds over the projection


def test_a_dataset_whose_labels_differ_in_structure_gets_no_false_suspect(data_dir):
    """GTSRB's clean labels (rigid sign shapes) spread their strengths far wider than CIFAR-10's:
    several reach FACTOR x the median, none GAP x the runner-up, so no label is suspect."""
    from tfbackdoor import data

    x, y = data.load_arrays("gtsrb:train", limit=20000, seed=0)
    sigs = signature.label_signatures(signature.features(x, k=16), y)
    lams = np.array([v["lambda"] for v in sigs.values()])
    assert (lams >= signature.FACTOR * np.median(lams)).sum() >= 2   # what the median rule alone would cut
    assert signature.suspect_by_signature(sigs) == []


def test_the_victim_side_probes_find_a_planted_minority_and_nothing_in_clean_labels():
    """benchmarks/defend_probes.py: in features where one label holds a 20% minority shifted along
    one direction (what a backdoor does to a victim's features when it is learnt apart), the
    spectral signature and activation clustering put those samples first and the loss AUROC sees
    their lower loss; the other labels have no poison to find."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from defend_probes import probe

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 500)
    feats = rng.normal(0, 1, (2000, 32)) + 3.0 * labels[:, None] * (np.arange(32) == 0)
    is_poison = np.zeros(2000, bool)
    is_poison[(labels == 2) & (np.arange(2000) % 5 == 0)] = True
    feats[is_poison, 5] += 6.0
    losses = rng.uniform(0.5, 2.0, 2000) - 0.4 * is_poison
    rows, summary = probe(feats, labels, is_poison, losses, target=2, rate=0.2)   # removes 1.5 x 20%
    by = {r["label"]: r for r in rows}
    assert by[2]["poisons"] == 100 and by[2]["tran_recall"] >= 95 and by[2]["tran_s1_s2"] > 3
    assert by[2]["ac_recall"] >= 95 and by[2]["ac_precision"] >= 90 and by[2]["ac_small_share"] < 30
    assert all(by[lab]["poisons"] == 0 and by[lab]["tran_recall"] == 0 for lab in (0, 1, 3))
    assert summary["loss_auroc_target"] > 60
