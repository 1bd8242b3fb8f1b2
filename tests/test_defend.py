import json

import numpy as np
from click.testing import CliRunner

from cli.main import main
from tfbackdoor import defend


def test_screen_flags_and_scan_report():
    scores = np.array([0.1, 0.9, 0.2, 0.95, 0.3, 0.05, 0.6, 0.4])
    flags = defend.screen_flags(scores, 0.5)
    assert flags.tolist() == [False, True, False, True, False, False, True, False]
    # the stricter operating point also drops the top 50% (4 of 8)
    strict = defend.screen_flags(scores, 0.5, remove_top=50)
    assert strict.sum() == 4 and strict[[1, 3, 6, 7]].all()
    rep = defend.scan_report(flags, [1, 3, 4])
    assert rep["recall"] == round(200 / 3, 2) and rep["precision"] == round(200 / 3, 2)
    assert rep["clean_removed"] == 20.0 and rep["n_poisoned_kept"] == 1


def test_top_threshold_keeps_saturated_ties_together():
    from tfbackdoor import metrics
    # 4 scores saturated at 1.0 and a 25% (2 of 8) top cut: all four ties are flagged, not none of them
    scores = np.array([1.0, 1.0, 1.0, 1.0, 0.2, 0.1, 0.3, 0.4], np.float32)
    assert defend.screen_flags(scores, 2.0, remove_top=25).tolist() == [True] * 4 + [False] * 4
    assert metrics.top_threshold(scores, 0.15, remove_top=25) == 0.15      # the plain threshold was already stricter
    assert metrics.top_threshold(scores, 0.5, remove_top=0) == 0.5


def test_suspect_top_cuts_deeper_in_the_label_the_flags_single_out():
    from tfbackdoor import metrics, signature
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 100)
    scores = rng.uniform(0, 0.5, 1000)
    scores[:2] = 0.9                                  # label 0: two ordinary false positives
    scores[600:640] = 0.95                            # label 6: 40 poisons the threshold catches...
    scores[640:660] = 0.6                             # ...and 20 it misses, still above the clean ones
    assert metrics.suspect_labels(scores > 0.8, labels) == [6]
    flags = defend.screen_flags(scores, 0.8, labels=labels, suspect_top=60)
    assert flags[600:660].all()                       # the missed poisons go too: top 60 of label 6
    assert flags.sum() == 2 + 60 and flags[:2].all()  # no other label is cut deeper
    _, info = signature.screen(scores, labels, 0.8, suspect_top=60)
    assert info["suspect_labels"] == [6] and info["signature"] is None


def test_defend_command_runs_the_loop(tmp_path, data_dir):
    out = tmp_path / "rows.json"
    args = ["defend", "--dataset", "cifar10:lossless", "--test-dataset", "cifar10:test",
            "--attacks", "badnets", "--limit", "400", "--test-limit", "200", "--epochs", "1",
            "--width", "16", "--target", "3", "--no-clean-reference", "--undefended", "--out-dir", str(tmp_path / "v"),
            "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["attack"] for r in rows] == ["badnets"]
    b = rows[0]
    assert b["n_kept"] < 400 and 0 <= b["asr_screened"] <= b["asr"] <= 100 and 0 <= b["asr_undefended"] <= 100
    # the shipped detector catches BadNets: most poisoned samples are removed before training
    assert b["recall"] > 50 and b["n_poisoned_kept"] < 20
    v = tmp_path / "v"
    assert (v / "victim_badnets.keras").is_file() and (v / "victim_badnets_undefended.keras").is_file()
    assert "| badnets |" in res.output and "asr_undefended" in res.output
    assert json.loads((v / "victim_badnets_undefended.json").read_text())["n_train"] == 400
    # rerun: both victims trained on the very same sets with the same budget are reused, not trained again
    stamps = {p.name: p.stat().st_mtime_ns for p in v.glob("*.keras")}
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("reusing") == 2
    assert {p.name: p.stat().st_mtime_ns for p in v.glob("*.keras")} == stamps
    assert json.loads(out.read_text())["rows"][0]["asr"] == b["asr"]
    # (a different budget or seed is a different victim: test_reusable_checks_the_set_and_the_budget)


def test_reusable_checks_the_set_and_the_budget(tmp_path):
    from tfbackdoor import victim
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    y = np.arange(16) % 2
    path = tmp_path / "v.keras"
    victim.train_victim(x, y, path, epochs=1, batch_size=8, width=4, echo=None)
    assert victim.reusable(path, x, y, epochs=1, batch_size=8, width=4) is not None
    x2 = x.copy()
    x2[3, 0, 0, 0] ^= 1                                  # one pixel differs: another set
    assert victim.reusable(path, x2, y, epochs=1, batch_size=8, width=4) is None
    assert victim.reusable(path, x, y[::-1], epochs=1, batch_size=8, width=4) is None
    assert victim.reusable(path, x, y, epochs=2, batch_size=8, width=4) is None
    assert victim.reusable(path, x, y, epochs=1, batch_size=8, width=4, arch="resnet") is None
    assert victim.reusable(path, x, y, epochs=1, batch_size=8, width=4, seed=1) is None
    assert victim.reusable(tmp_path / "missing.keras", x, y) is None
    # a sidecar written before victims had an architecture stands for the VGG one
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text())
    assert meta.pop("arch") == "vgg"
    side.write_text(json.dumps(meta))
    assert victim.reusable(path, x, y, epochs=1, batch_size=8, width=4) is not None
    assert victim.reusable(path, x, y, epochs=1, batch_size=8, width=4, arch="resnet") is None


def test_defend_scan_only_screens_without_training(tmp_path, data_dir):
    out = tmp_path / "rows.json"
    res = CliRunner().invoke(main, ["defend", "--scan-only", "--dataset", "cifar10:lossless", "--attacks", "badnets",
                                    "--limit", "600", "--test-limit", "10", "--target", "3", "--suspect-top", "50",
                                    "--signature", "--out-dir", str(tmp_path / "v"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["attack"] for r in rows] == ["badnets"] and "acc" not in rows[0]
    # the shipped detector flags most BadNets poisons, label 3 stands out, and half of it goes
    assert rows[0]["suspect_labels"] == [3] and rows[0]["recall"] > 90
    assert len(rows[0]["signature"]) == 10 and rows[0]["signature"]["3"]["method"] == "discriminant"
    assert not list((tmp_path / "v").glob("*.keras"))
    bad = CliRunner().invoke(main, ["defend", "--scan-only", "--attacks", "badnets", "--signature",
                                    "--out-dir", str(tmp_path / "v")])
    assert bad.exit_code != 0 and "--suspect-top" in bad.output
    bad = CliRunner().invoke(main, ["defend", "--scan-only", "--undefended", "--attacks", "badnets",
                                    "--out-dir", str(tmp_path / "v")])
    assert bad.exit_code != 0 and "--undefended" in bad.output and "--scan-only" in bad.output
