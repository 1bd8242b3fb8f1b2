import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from cli.main import main
from tfbackdoor import detector, models, perturb, provenance
from tfbackdoor.errors import TfbdError


# ----------------------------------------------------------------------------- manipulations

def test_each_manipulation_changes_images_as_described(rng):
    x = np.full((64, 32, 32, 3), 100, np.uint8) + np.arange(64, dtype=np.uint8)[:, None, None, None] * 2
    x[:, :, :16] = 30  # two flat halves (and images that differ) so every manipulation is visible
    for k, kind in enumerate(perturb.MANIPULATIONS):
        m = perturb.RandomManipulation(kinds=[kind], seed=3)
        out = m(x).numpy()
        changed = (out != x).any(-1)
        assert out.dtype == np.uint8 and out.shape == x.shape
        assert changed.reshape(64, -1).any(1).mean() > 0.9, kind
        if kind == "white_block":
            assert (out[changed] == 255).all()
            sides = changed.reshape(64, -1).sum(1)
            assert sides.min() >= 4 and sides.max() <= 7 * 7
        if kind == "blend":
            assert (out.astype(int) >= x).all()  # additive, as the paper's Blend trigger
        if kind == "shadow":
            assert (out.astype(int) <= x).all()  # only darkens
        if kind == "noise":
            assert changed.mean() > 0.5
            assert out.astype(float).mean() > x.mean() + 3  # brightening mean


def test_color_blocks_solid_or_random_pixels_and_corner_placement():
    x = np.full((200, 32, 32, 3), 128, np.uint8)
    solid = perturb.RandomManipulation(kinds=["color_block"], pixel_color_prob=0.0, corner_prob=1.0, seed=1)(x).numpy()
    changed = (solid != x).any(-1)
    assert all(len(np.unique(solid[i][changed[i]], axis=0)) <= 1 for i in range(200))  # one colour each
    # corner_prob=1: every block touches a 6-px (0.16 * 32 + block) band of two edges at a corner
    for i in range(200):
        rows, cols = np.nonzero(changed[i])
        if len(rows):
            assert min(rows.min(), 31 - rows.max()) <= 5 and min(cols.min(), 31 - cols.max()) <= 5
    pix = perturb.RandomManipulation(kinds=["color_block"], pixel_color_prob=1.0, seed=1)(x).numpy()
    changed = (pix != x).any(-1)
    assert np.mean([len(np.unique(pix[i][changed[i]], axis=0)) > 3 for i in range(200) if changed[i].sum() > 4]) > 0.95


def test_manipulation_is_seeded_and_one_per_image():
    x = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    m = perturb.RandomManipulation()
    a, b = m(x, tf.constant([5, 6], tf.int64)).numpy(), m(x, tf.constant([5, 6], tf.int64)).numpy()
    c = m(x, tf.constant([5, 7], tf.int64)).numpy()
    assert (a == b).all() and not (a == c).all()
    kinds = m.get_random_transformation(tf.constant(x), tf.constant([5, 6], tf.int64))["kind"].numpy()
    assert kinds.shape == (32,) and set(kinds) <= set(range(5)) and len(set(kinds)) >= 3
    again = perturb.RandomManipulation.from_config(m.get_config())
    assert (again(x, tf.constant([5, 6], tf.int64)).numpy() == a).all()


def test_generic_manipulations_change_images_as_described(lossless):
    """The five generic kinds: convex mix, tiny patches, smooth fields, chroma bumps, warps."""
    from scipy.fft import dctn

    x = lossless[0][:96]
    xf = x.astype(float)
    outs = {k: perturb.RandomManipulation(kinds=[k], seed=5)(x).numpy().astype(float) for k in perturb.GENERIC_MANIPULATIONS[5:]}
    for k, out in outs.items():
        assert out.shape == x.shape and (out != xf).reshape(96, -1).any(1).mean() > 0.9, k
    # mix: convex, so every pixel stays between the image and some other image of the batch
    # (no pixel leaves [min, max] of the batch at that position) and the mean moves towards the batch mean
    assert (outs["mix"] <= xf.max(0) + 1).all() and (outs["mix"] >= xf.min(0) - 1).all()
    # small_patch: at most a 4x4 square changes
    changed = (outs["small_patch"] != xf).any(-1).reshape(96, -1).sum(1)
    assert changed.max() <= 16 and np.median(changed) >= 1
    # smooth_field: changes most pixels, by at most the amplitude, with energy at low-to-mid frequencies
    d = outs["smooth_field"] - xf
    assert np.abs(d).max() <= 41 and (np.abs(d) > 0).mean() > 0.5
    e = dctn(d, type=2, norm="ortho", axes=(1, 2)) ** 2
    assert e[:, :16, :16].sum() / e.sum() > 0.9
    # chroma_bump: small changes whose DCT energy sits on at most 3 frequencies (before rounding/clipping)
    d = outs["chroma_bump"] - xf
    assert np.abs(d).max() <= 16
    e = dctn(d, type=2, norm="ortho", axes=(1, 2)) ** 2
    top3 = np.sort(e.sum(-1).reshape(96, -1), 1)[:, -3:].sum(1) / e.sum(-1).reshape(96, -1).sum(1)
    assert np.median(top3) > 0.6
    # warp: moves pixels (large local changes) while the image mean barely moves
    d = outs["warp"] - xf
    assert np.abs(d).max() > 30 and np.abs(d.mean(axis=(1, 2, 3))).max() < 0.02 * 255


def test_manipulation_kinds_parse_and_each_image_runs_one():
    assert perturb.parse_kinds("paper") == perturb.MANIPULATIONS
    assert perturb.parse_kinds("generic") == perturb.GENERIC_MANIPULATIONS
    assert perturb.parse_kinds("mix,mix,warp") == ("mix", "mix", "warp")
    with pytest.raises(ValueError, match="nope"):
        perturb.parse_kinds("paper,nope")
    x = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    m = perturb.RandomManipulation(kinds="generic", seed=2)
    t = m.get_random_transformation(tf.constant(x), tf.constant([1, 2], tf.int64))
    out = m.transform_images(tf.constant(x), t).numpy()
    # each image gets exactly what its own kind, run on the images that drew it, gives (one
    # manipulation per image; kinds that do not use another image of the batch compare exactly)
    kinds = t["kind"].numpy()
    assert len(set(kinds)) >= 6
    for k in set(kinds) - {perturb.GENERIC_MANIPULATIONS.index("blend"), perturb.GENERIC_MANIPULATIONS.index("mix")}:
        rows = np.nonzero(kinds == k)[0]
        alone = m.transform_images(tf.constant(x[rows]), dict(t, kind=tf.fill([len(rows)], int(k)))).numpy()
        assert (alone == out[rows]).all(), perturb.GENERIC_MANIPULATIONS[k]
    again = perturb.RandomManipulation.from_config(m.get_config())
    assert (again(x, tf.constant([1, 2], tf.int64)).numpy() == m(x, tf.constant([1, 2], tf.int64)).numpy()).all()


def test_benign_processing_keeps_shape_and_jpeg_round_trip():
    x = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    b = perturb.BenignProcessing(p_jpeg=1.0, p_color=0, p_blur=0, p_resize=0)
    out = b(x, tf.constant([1, 2], tf.int64)).numpy()
    assert out.shape == x.shape and (out != x).any()
    for name, fn in perturb.BENIGN_VARIANTS.items():
        assert fn(x[None]).shape == (1, 32, 32, 3), name


def test_benign_settings_parse_and_bad_ones_are_named():
    b = perturb.parse_benign("p_color=0.7, brightness=40,contrast=0.6:1.4", seed=3)
    assert (b.p_color, b.brightness, b.contrast, b.seed) == (0.7, 40.0, (0.6, 1.4), 3)
    assert b.p_jpeg == perturb.BenignProcessing().p_jpeg                  # the rest keep their defaults
    assert perturb.parse_benign("").settings() == perturb.BenignProcessing().settings()
    for bad, word in [("foo=1", "foo=1"), ("contrast=1", "lo:hi"), ("p_color=high", "a number"), ("p_color", "KEY=VALUE")]:
        with pytest.raises(ValueError, match=word):
            perturb.parse_benign(bad)


def test_stronger_colour_processing_clips_more_training_images():
    """--benign p_color=1,brightness=60 reaches the pipeline: many more saturated pixels than none."""
    x = np.full((64, 32, 32, 3), 230, np.uint8)   # saturates when the brightness delta is >= 25
    strong = perturb.parse_benign("p_color=1,brightness=60,p_jpeg=0")
    none = perturb.parse_benign("p_color=0,p_jpeg=0,p_blur=0,p_resize=0")
    def saturated(benign):
        ds = detector.training_dataset(x, batch_size=64, seed=1, domain="image", benign=benign)
        inputs = next(iter(ds))[0].numpy()[:64]                             # the clean half
        return (inputs == 255).mean()
    assert saturated(none) == 0 and saturated(strong) > 0.15   # expected 35/120


def test_training_pipeline_is_balanced_and_in_dct():
    x = np.random.default_rng(2).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    batches = list(detector.training_dataset(x, batch_size=16, seed=1))
    labels = np.concatenate([b[1].numpy() for b in batches])
    assert len(labels) == 80 and labels.sum() == 40
    inp = batches[0][0].numpy()
    assert inp.shape == (32, 32, 32, 3) and inp.dtype == np.float32
    assert np.abs(inp[:, 0, 0]).mean() > 500  # DC coefficient of 0..255 images


# ----------------------------------------------------------------------------- models

@pytest.mark.parametrize("arch,size", [("cnn6", 32), ("large", 128), ("edge", 64)])
def test_model_shapes(arch, size):
    m = detector.build(arch, size)
    out = m(np.zeros((2, size, size, 3), np.float32))
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out.numpy().sum(1), 1.0, rtol=1e-5)
    spec = detector.spec_of(m)
    assert (spec.arch, spec.image_size, spec.domain) == (arch, size, "dct")


def test_edge_arch_patchifies_early_and_checks_its_size():
    """The camera-frame arch divides the side by 4 in its first layer (its cost argument) and
    refuses a side it cannot pool down evenly, naming the size."""
    m = models.edge(128)
    assert tuple(m.get_layer("stem").output.shape[1:3]) == (32, 32)
    assert m.count_params() < 600_000
    with pytest.raises(TfbdError, match="multiple of 32.*100"):
        models.edge(100)


def test_cnn6_matches_the_paper_layout():
    m = models.cnn6(32)
    convs = [l for l in m.layers if isinstance(l, tf.keras.layers.Conv2D) or l.__class__.__name__ == "Conv2D"]
    assert [c.filters for c in convs] == [32, 32, 64, 64, 128, 128]
    drops = [l.rate for l in m.layers if l.__class__.__name__ == "Dropout"]
    assert drops == [0.2, 0.3, 0.4]
    assert m.count_params() < 400_000


def test_reference_detector_loads(data_dir):
    ref = detector.load_reference(data_dir / "reference" / "cnn6_cifar10_paper.h5")
    x = np.zeros((1, 32, 32, 3), np.uint8)
    assert detector.score(ref, x).shape == (1,)


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_dir):
    """A detector trained 1 epoch on 300 real lossless CIFAR-10 images (shape of the flow, not accuracy)."""
    d = tmp_path_factory.mktemp("tiny")
    out = d / "det.keras"
    r = CliRunner().invoke(main, ["train-detector", "--dataset", "cifar10:lossless", "--limit", "300", "--epochs", "1",
                                  "--batch-size", "32", "--out", str(out), "--log-dir", str(d / "tb")])
    assert r.exit_code == 0, r.output
    return out


def test_train_writes_detector_with_threshold_and_tensorboard(tiny):
    m = detector.load(tiny)
    spec = detector.spec_of(m)
    assert 0 < spec.threshold < 1 and spec.info["calibration"]["n"] == 12
    assert spec.info["dataset"] == "cifar10:lossless"
    assert any((tiny.parent / "tb").rglob("events.out.tfevents*"))


def test_evaluate_json_keys(tiny):
    r = CliRunner().invoke(main, ["evaluate", "--detector", str(tiny), "--dataset", "cifar10:lossless", "--limit", "64",
                                  "--attacks", "badnets,trojan_wm", "--benign", "jpeg75", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert [x["attack"] for x in rows] == ["clean", "badnets", "trojan_wm", "benign:jpeg75"]
    for row in rows[1:3]:
        assert set(row) == {"attack", "acc", "bdr", "fpr", "auroc", "n"} and row["n"] == 64
        assert 0 <= row["bdr"] <= 100 and row["acc"] == pytest.approx((100 - row["fpr"] + row["bdr"]) / 2, abs=0.02)


def test_evaluate_clean_vs_poisoned_sets(tiny, tmp_path):
    from tfbackdoor import data, triggers

    x, y = data.load_arrays("cifar10:lossless", limit=40, seed=9)
    np.savez(tmp_path / "c.npz", x=x, y=y)
    np.savez(tmp_path / "p.npz", x=triggers.get("trojan_sq")(x).numpy(), y=y)
    r = CliRunner().invoke(main, ["evaluate", "--detector", str(tiny), "--clean", f"npz:{tmp_path / 'c.npz'}",
                                  "--poisoned", f"npz:{tmp_path / 'p.npz'}", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)[0]["n"] == 40


def test_scan_streams_reports_and_skips_bad_items(tiny, tmp_path):
    from PIL import Image

    root = tmp_path / "ds"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out, clean = tmp_path / "r.csv", tmp_path / "clean.npz"
    r = CliRunner().invoke(main, ["scan", "--detector", str(tiny), "--dataset", f"dir:{root}", "--out", str(out),
                                  "--threshold", "0.5", "--write-clean", f"npz:{clean}"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    rows = list(csv.DictReader(out.open()))
    assert summary["n"] == 10 and len(rows) == 11 and summary["skipped"][0].endswith("broken.jpg")
    flagged = sum(int(row["flagged"]) for row in rows if row["score"])
    with np.load(clean) as d:
        assert d["x"].shape == (10 - flagged, 32, 32, 3) and d["y"].shape == (10 - flagged,)


def test_scan_remove_top_flags_the_highest_scores_too_and_writes_the_rest(tiny, tmp_path, data_dir):
    """--remove-top 25: the 25% highest scores are flagged on top of the threshold's verdicts (a
    threshold of 1.0 flags nothing by itself), the sanitised set holds exactly the others."""
    out, clean = tmp_path / "r.csv", tmp_path / "clean.npz"
    r = CliRunner().invoke(main, ["scan", "--detector", str(tiny), "--dataset", "cifar10:test", "--limit", "40",
                                  "--out", str(out), "--threshold", "1.0", "--remove-top", "25",
                                  "--write-clean", f"npz:{clean}"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    rows = list(csv.DictReader(out.open()))
    scores = np.array([float(row["score"]) for row in rows])
    flags = np.array([row["flagged"] == "1" for row in rows])
    assert summary["remove_top"] == 25 and summary["detector_threshold"] == 1.0 and summary["threshold"] < 1.0
    assert flags.sum() >= 10 and scores[flags].min() >= scores[~flags].max()
    with np.load(clean) as d:
        assert len(d["x"]) == 40 - flags.sum() == summary["clean_written"]
    bad = CliRunner().invoke(main, ["scan", "--detector", str(tiny), "--dataset", "cifar10:test", "--out",
                                    str(tmp_path / "b.csv"), "--remove-top", "100"])
    assert bad.exit_code != 0 and "--remove-top must be in [0, 100)" in bad.output
    # --suspect-top: the summary names the labels it cut deeper in (a list, maybe empty), nothing else changes
    r = CliRunner().invoke(main, ["scan", "--detector", str(tiny), "--dataset", "cifar10:test", "--limit", "40",
                                  "--out", str(tmp_path / "s.csv"), "--suspect-top", "50"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["suspect_top"] == 50 and isinstance(summary["suspect_labels"], list)


def test_finetune_excludes_its_samples_from_evaluation(tiny, tmp_path):
    out = tmp_path / "ft.keras"
    r = CliRunner().invoke(main, ["finetune", "--detector", str(tiny), "--dataset", "gtsrb:test", "--samples", "20",
                                  "--epochs", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = detector.load(out)
    excluded = detector.spec_of(m).info["exclude"]["gtsrb:test"]
    assert len(excluded) == 20
    x = detector.load_eval_images(m, "gtsrb:test", limit=500, seed=0)
    assert len(x) == 500                                  # still 500 images, none of them fine-tuned on
    from tfbackdoor import data
    x_ft, _, ids = data.materialize(data.load("gtsrb:test", with_ids=True, limit=20, seed=0), "gtsrb:test")
    assert set(ids) == set(excluded)
    flat = {im.tobytes() for im in x}
    assert not any(im.tobytes() in flat for im in x_ft)
    plain = detector.load_eval_images(detector.load(tiny), "gtsrb:test", limit=500, seed=0)
    assert len({im.tobytes() for im in plain} & flat) == 500 - 20   # the same seeded images, bar the 20


def test_finetune_takes_a_count_per_part_and_balances_them(tiny, tmp_path):
    out = tmp_path / "mix.keras"
    r = CliRunner().invoke(main, ["finetune", "--detector", str(tiny), "--dataset", "gtsrb:test+cifar10:lossless",
                                  "--samples", "40,10", "--repeat", "1", "--epochs", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    info = detector.spec_of(detector.load(out)).info
    assert len(info["exclude"]["gtsrb:test"]) == 40 and len(info["exclude"]["cifar10:lossless"]) == 10
    assert info["finetune"][-1]["n"] == 80          # the 10 lossless images repeated 4 times beside the 40
    r = CliRunner().invoke(main, ["finetune", "--detector", str(tiny), "--dataset", "gtsrb:test+cifar10:lossless",
                                  "--samples", "40,10,5", "--out", str(tmp_path / "bad.keras")])
    assert r.exit_code == 2 and "3 counts for 2 dataset parts" in r.output and not (tmp_path / "bad.keras").exists()


def test_trigger_reaches_the_poisoned_side_at_the_requested_share(rng):
    """The defense-upgrade pipeline: with extra_poison, that share of the poisoned half is exactly the
    triggered clean image (the rest keep a random manipulation)."""
    from tfbackdoor import triggers

    x = rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
    trig = triggers.get("badnets")
    for share, lo, hi in [(1.0, 1.0, 1.0), (0.5, 0.35, 0.65)]:
        ds = detector.training_dataset(x, batch_size=64, seed=3, domain="image", benign=False, extra_poison=trig,
                                       extra_share=share)
        hits = total = 0
        for inputs, labels in ds:
            inputs = inputs.numpy().astype(np.uint8)
            n = len(inputs) // 2
            assert (labels.numpy() == np.repeat([0, 1], n)).all()
            same = (inputs[n:] == trig(inputs[:n]).numpy()).all(axis=(1, 2, 3))
            hits, total = hits + int(same.sum()), total + n
        assert lo <= hits / total <= hi, (share, hits, total)


def test_finetune_with_a_trigger_records_it_and_recalibrates(tiny, tmp_path):
    out = tmp_path / "tuned.keras"
    r = CliRunner().invoke(main, ["finetune", "--detector", str(tiny), "--dataset", "cifar10:train", "--samples", "128",
                                  "--repeat", "1", "--epochs", "1", "--trigger", "smooth", "--trigger-share", "1",
                                  "--calibration", "100", "--target-fpr", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = detector.load(out)
    info = detector.spec_of(m).info
    rec = info["finetune"][-1]
    assert rec["trigger"] == "smooth" and rec["trigger_share"] == 1 and rec["n"] == 128
    assert rec["calibration"]["n"] == 100 and detector.spec_of(m).threshold == rec["calibration"]["threshold"]
    assert detector.spec_of(m).threshold != detector.spec_of(detector.load(tiny)).threshold
    assert len(info["exclude"]["cifar10:train"]) == 228   # trained on, or set the threshold
    r = CliRunner().invoke(main, ["finetune", "--detector", str(tiny), "--dataset", "cifar10:lossless", "--samples",
                                  "10", "--trigger", "smooth", "--trigger-share", "1.5", "--out", str(tmp_path / "x.keras")])
    assert r.exit_code == 2 and "--trigger-share" in r.output and not (tmp_path / "x.keras").exists()


def test_resume_after_interruption(tmp_path, data_dir):
    """A run killed during its second epoch resumes from the checkpoint instead of starting over."""
    out = tmp_path / "r.keras"
    cmd = [sys.executable, "-m", "cli.main", "train-detector", "--dataset", "cifar10:lossless", "--limit", "256",
           "--epochs", "2", "--batch-size", "16", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "Epoch 2/2" in line:
            proc.kill()  # interrupted mid-training, as by a crash or a lost machine
            break
    proc.wait()
    assert proc.returncode != 0 and not out.exists()
    assert (tmp_path / "r.keras.ckpt" / "backup").exists()
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Epoch 2/2" in r.stdout and "Epoch 1/2" not in r.stdout
    assert out.exists() and not (tmp_path / "r.keras.ckpt" / "backup").exists()


def test_mirrored_training_on_two_logical_cpus(tmp_path, data_dir):
    out = tmp_path / "m.keras"
    code = (
        "import tfbackdoor.detector as d; d.configure_logical_cpus(2);"
        "import tensorflow as tf; s = d.make_strategy('mirrored'); print('replicas', s.num_replicas_in_sync);"
        "from cli.main import main; main(['train-detector','--dataset','cifar10:lossless','--limit','128',"
        f"'--epochs','1','--batch-size','32','--strategy','mirrored','--out',r'{out}'])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "replicas 2" in r.stdout, r.stderr[-2000:]
    assert out.exists(), r.stderr[-2000:]


def test_bad_detector_files(tmp_path):
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    with pytest.raises(TfbdError, match="junk.keras: cannot load"):
        detector.load(tmp_path / "junk.keras")
    import keras

    inp = keras.Input((4,))
    keras.Model(inp, keras.layers.Dense(2)(inp)).save(tmp_path / "other.keras")
    with pytest.raises(TfbdError, match="not a tfbackdoor detector"):
        detector.load(tmp_path / "other.keras")
    r = CliRunner().invoke(main, ["scan", "--detector", str(tmp_path / "other.keras"), "--dataset", "cifar10:test",
                                  "--out", str(tmp_path / "r.csv")])
    assert r.exit_code == 2 and "not a tfbackdoor detector" in r.output
    with pytest.raises(TfbdError, match="expects images of shape"):
        detector.score(detector.build(), np.zeros((2, 16, 16, 3), np.uint8))


def test_init_continues_from_a_detector_and_checks_it_fits(tiny, tmp_path, data_dir):
    from tfbackdoor import data

    x, _ = data.load_arrays("cifar10:lossless", limit=64, seed=4)
    before = detector.load(tiny)
    out = tmp_path / "cont.keras"
    m = detector.train(x, out, epochs=1, batch_size=16, init=str(tiny), info={"dataset": "again"}, verbose=0)
    norm = m.get_layer("input_norm").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(norm, before.get_layer("input_norm").get_weights()))
    info = detector.spec_of(detector.load(out)).info
    # where it started, recorded without this machine's absolute path (detector.portable_info)
    assert info["init"]["path"] == tiny.name and info["init"]["info"]["dataset"] == "cifar10:lossless"
    with pytest.raises(TfbdError, match="cannot continue as cnn6/image"):
        detector.train(x, tmp_path / "bad.keras", epochs=1, domain="image", init=str(tiny), verbose=0)


def test_diagnostics_sweep_is_monotonic_and_finds_clipping(tiny, data_dir):
    """benchmarks/detector_diagnostics.py: a higher threshold never flags more, and the BadNets
    patch statistics are computed where BadNets puts its square."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "benchmarks"))
    import detector_diagnostics

    m = detector.load(tiny)
    x = detector.load_eval_images(m, "cifar10:lossless", limit=64, seed=3)
    x[0, 26:30, 26:30, :] = 255                                 # one image whose corner BadNets cannot change
    res = detector_diagnostics.diagnose(m, x, [0.9, 0.5, 0.1])
    assert res["n"] == 64 and res["sweep"][0]["shipped"]
    fixed = res["sweep"][1:]
    assert [r["threshold"] for r in fixed] == [0.9, 0.5, 0.1]
    for hi, lo in zip(fixed, fixed[1:]):
        assert hi["fpr"] <= lo["fpr"] and hi["worst_benign_fpr"] <= lo["worst_benign_fpr"]
        assert all(hi["bdr"][k] <= lo["bdr"][k] for k in hi["bdr"])
    assert res["badnets"]["near_white_share"] >= 1.5            # at least that one image in 64
    assert set(res["clipping"]) == {"brighter", "darker", "contrast"}


def test_worst_calibration_bounds_every_set(tiny, data_dir):
    """rule="worst": every source, as is and after each benign variant, flags at most target_fpr
    percent at the returned threshold; the pooled rule only bounds their mix."""
    from tfbackdoor import data
    m = detector.load(tiny)
    a, _ = data.load_arrays("cifar10:test", limit=200, seed=5)
    b, _ = data.load_arrays("gtsrb:test", limit=200, seed=5)
    pooled = detector.calibrate_threshold(m, [a, b], 5.0, rule="pooled")
    worst = detector.calibrate_threshold(m, [a, b], 5.0, rule="worst")
    assert worst >= pooled
    for xs in (a, b):
        for v in [None] + list(perturb.BENIGN_VARIANTS):
            s = detector.score(m, xs if v is None else perturb.BENIGN_VARIANTS[v](xs).numpy())
            assert (s > worst).mean() <= 0.05 + 1e-9, v
    with pytest.raises(TfbdError, match="unknown calibration rule"):
        detector.calibrate_threshold(m, a, 1.0, rule="median")


def test_saved_info_is_portable_and_keeps_the_same_exclusions(tmp_path):
    """No absolute path of the training machine is recorded; exclusions still match loaded ids."""
    from tfbackdoor import specs

    root = str(specs.data_root())
    info = {"command": f"tfbd finetune --detector /elsewhere/runs/det.keras --dataset npz:{root}/natural/natural32.npz",
            "exclude": {"cifar10:train": [f"{root}/cifar10/train/dog/0001.jpg", "dog/0001.jpg"],
                        "cifar10:lossless": ["cifar10:lossless#5"]}}
    model = detector.build(info=info)
    detector.save(model, tmp_path / "d.keras")
    saved = detector.spec_of(detector.load(tmp_path / "d.keras")).info
    assert saved["command"] == "tfbd finetune --detector det.keras --dataset npz:$TFBD_DATA/natural/natural32.npz"
    assert saved["exclude"] == {"cifar10:train": ["dog/0001.jpg"], "cifar10:lossless": ["cifar10:lossless#5"]}
    # a model that recorded absolute ids and one that recorded relative ids leave out the same image
    legacy = detector.build(info={"exclude": {"cifar10:train": [f"{root}/cifar10/train/dog/0001.jpg"]}})
    assert detector.excluded_ids(legacy, "cifar10:train") == detector.excluded_ids(model, "cifar10:train") == {"dog/0001.jpg"}
    assert detector.relative_id("cifar10:train", f"{root}/cifar10/train/dog/0001.jpg") == "dog/0001.jpg"


def test_bulky_exclusions_go_to_a_manifest_beside_the_model(tmp_path, rng):
    """Issue 15 item 16: tens of thousands of excluded ids live in NAME.keras.manifest.json (sha256 in the model)."""
    import hashlib
    import shutil
    import zipfile

    ids = [f"cifar10:lossless#{i}" for i in range(1500)]
    nested = [f"n{i}" for i in range(1000)]
    model = detector.build(info={"exclude": {"cifar10:lossless": ids, "gtsrb:test": ["00001.png"]},
                                 "init": {"path": "a.keras", "info": {"exclude": {"x": nested}}}})
    out = tmp_path / "d.keras"
    detector.save(model, out)
    man = detector.manifest_path(out)
    assert man.name == "d.keras.manifest.json" and man.is_file()
    assert detector.exclusions(model)["cifar10:lossless"] == ids          # in memory they stay inline
    with zipfile.ZipFile(out) as z:
        config = z.read("config.json").decode()
    assert "lossless#1499" not in config and '"n999"' not in config     # the model holds a reference only
    m = detector.load(out)
    info = detector.spec_of(m).info
    assert "exclude" not in info and "exclude" not in info["init"]["info"]
    ref = info["exclude_manifest"]
    assert ref["file"] == man.name and ref["counts"] == {"cifar10:lossless": 1500, "gtsrb:test": 1}
    assert ref["sha256"] == hashlib.sha256(man.read_bytes()).hexdigest()
    assert detector.exclusions(m) == {"cifar10:lossless": ids, "gtsrb:test": ["00001.png"]}
    assert detector.excluded_ids(m, "cifar10:lossless") == set(ids)
    assert json.loads(man.read_bytes())["sections"]["init.info.exclude"] == {"x": nested}

    # fine-tuning a manifest model (in place) merges its new ids in and writes a manifest beside the new file
    ft = detector.finetune(m, rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), tmp_path / "sub" / "ft.keras",
                           epochs=1, repeat=1, batch_size=8, source_spec="npz:new.npz", sample_ids=["new#0"], verbose=0)
    again = detector.exclusions(detector.load(tmp_path / "sub" / "ft.keras"))
    assert again == {**detector.exclusions(ft), "cifar10:lossless": ids} and again["npz:new.npz"] == ["new#0"]
    assert detector.manifest_path(tmp_path / "sub" / "ft.keras").is_file()

    # the model alone still loads and scores; what needs the list says which file is missing, on one line
    (tmp_path / "moved").mkdir()
    shutil.copy(out, tmp_path / "moved" / "renamed.keras")
    shutil.copy(man, tmp_path / "moved" / "renamed.keras.manifest.json")
    assert detector.exclusions(detector.load(tmp_path / "moved" / "renamed.keras"))["cifar10:lossless"] == ids
    lone = detector.load(shutil.copy(out, tmp_path / "sub" / "alone.keras"))
    assert detector.score(lone, np.zeros((1, 32, 32, 3), np.uint8)).shape == (1,)
    with pytest.raises(TfbdError) as e:
        detector.load_eval_images(lone, "cifar10:lossless", limit=5)
    assert str(e.value).startswith(f"{tmp_path / 'sub' / 'd.keras.manifest.json'}: exclusion manifest not found: "
                                   "alone.keras keeps the ids of its 1501 ")
    # a changed manifest is refused, by the library and by the CLI (one line, exit 2)
    man.write_bytes(man.read_bytes().replace(b'"cifar10:lossless#7"', b'"cifar10:lossless#8"'))
    with pytest.raises(TfbdError, match="sha256 does not match the one recorded in d.keras"):
        detector.exclusions(detector.load(out))
    np.savez(tmp_path / "s.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.zeros(4, int))
    r = CliRunner().invoke(main, ["evaluate", "--detector", str(out), "--dataset", f"npz:{tmp_path / 's.npz'}",
                                  "--attacks", "badnets", "--limit", "4"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == (f"tfbd: error: {man}: sha256 does not match the one recorded in "
                                                 "d.keras (the manifest was changed or belongs to another model)")


def test_inline_exclusions_of_older_models_still_work(tmp_path, monkeypatch):
    """Models saved before manifests (the shipped ones) keep their lists inline and still load and exclude."""
    from tfbackdoor import specs

    shipped = detector.load(specs.shipped_model("detector_cifar10_smooth_tuned.keras"))
    assert "exclude_manifest" not in detector.spec_of(shipped).info
    assert len(detector.exclusions(shipped)["cifar10:train"]) > detector.MANIFEST_MIN_IDS
    assert not detector.manifest_path(specs.shipped_model("detector_cifar10_smooth_tuned.keras")).exists()
    ids = [f"cifar10:lossless#{i}" for i in range(1500)]
    out = tmp_path / "d.keras"
    detector.save(detector.build(info={"exclude": {"cifar10:lossless": ids}}), out)
    assert detector.manifest_path(out).is_file()
    monkeypatch.setattr(provenance, "MANIFEST_MIN_IDS", 10**9)       # saved as before manifests: inline
    detector.save(detector.build(info={"exclude": {"cifar10:lossless": ids}}), out)
    assert not detector.manifest_path(out).exists()                 # the earlier, now stale, manifest went
    m = detector.load(out)
    assert detector.spec_of(m).info["exclude"]["cifar10:lossless"] == ids
    assert detector.excluded_ids(m, "cifar10:lossless") == set(ids)
