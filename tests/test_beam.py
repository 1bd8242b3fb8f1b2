"""The Beam scan (issue 17) gives the single-machine scan's results, and dead-letters bad items.

Needs the [beam] extra (``pip install -e '.[beam]'``); skipped otherwise. Marked ``beam``
(deselect with ``-m 'not beam'``); about 30-60 s on 2 loaded cores, most of it Beam and TF start-up.
"""

import csv
import glob
import io
import json
import tarfile

import numpy as np
import pytest

beam = pytest.importorskip("apache_beam", reason="apache_beam not installed (pip install -e '.[beam]'); "
                                                  "the Beam scan test is skipped")

pytestmark = pytest.mark.beam


def _rows(paths):
    out = {}
    for p in paths:
        with open(p, newline="") as f:
            for r in csv.DictReader(f):
                assert r["id"] not in out, f"duplicate id {r['id']}"
                out[r["id"]] = r
    return out


def _tar_shard(path, items):
    with tarfile.open(path, "w") as tar:
        for key, data, cls in items:
            for name, blob in ((f"{key}.png", data), (f"{key}.cls", None if cls is None else str(cls).encode())):
                if blob is None:
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


def test_beam_scan_equals_plain_scan(data_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from PIL import Image

    from cli.main import main
    from tfbackdoor import detector, shards

    monkeypatch.setenv("TFBD_MAX_PIXELS", "100000")
    n, n_tfr = 300, 200
    model = detector.load(None)
    plain = detector.scan(model, "cifar10:lossless", tmp_path / "plain.csv", limit=n, seed=0)
    assert plain["n"] == n
    expected = _rows([tmp_path / "plain.csv"])
    ids = list(expected)

    # The first 200 of those images as TFRecord shards (tfbd shard), the other 100 as tar shards.
    res = CliRunner().invoke(main, ["shard", "--dataset", "cifar10:lossless", "--limit", str(n_tfr), "--seed", "0",
                                    "--out", f"tfrecord:{tmp_path}/tfr/part", "--shards", "3"])
    assert res.exit_code == 0, res.output
    assert len(glob.glob(f"{tmp_path}/tfr/part-*-of-00003.tfrecord")) == 3
    from tfbackdoor import data

    x, y = data.load_arrays("cifar10:lossless", limit=n, seed=0)
    rest = list(range(n_tfr, n))
    _tar_shard(tmp_path / "web-000.tar", [(ids[i], shards.encode_png(x[i]), int(y[i])) for i in rest[:50]])
    big = io.BytesIO()
    Image.fromarray(np.zeros((400, 400, 3), np.uint8)).save(big, format="PNG")
    _tar_shard(tmp_path / "web-001.tar", [(ids[i], shards.encode_png(x[i]), int(y[i])) for i in rest[50:]]
               + [("bad/corrupt", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 3), ("bad/huge", big.getvalue(), 1)])
    # A corrupt record: an Example whose image bytes are not an image.
    import tensorflow as tf

    with tf.io.TFRecordWriter(f"{tmp_path}/tfr/part-corrupt.tfrecord") as w:
        w.write(shards.example("bad/tfrecord", 0, b"not an image at all"))

    spec = f"tfrecord:{tmp_path}/tfr/part-*.tfrecord+tar:{tmp_path}/web-*.tar"
    res = CliRunner().invoke(main, ["scan", "--dataset", spec, "--out", str(tmp_path / "beam" / "report.csv"),
                                    "--runner", "direct", "--num-workers", "1",
                                    "--beam-option", "direct_running_mode=in_memory",
                                    "--write-clean", f"tfrecord:{tmp_path}/clean/clean"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    got = _rows(glob.glob(f"{tmp_path}/beam/report-*-of-*.csv"))
    assert set(got) == set(expected)
    for i, r in expected.items():
        assert abs(float(got[i]["score"]) - float(r["score"])) <= 1e-6 + 1e-9, i
        assert (got[i]["flagged"], got[i]["label"]) == (r["flagged"], r["label"]), i
    assert summary["n"] == n and summary["flagged"] == plain["flagged"]

    dead = _rows(glob.glob(f"{tmp_path}/beam/report.dead-letter-*-of-*.csv"))
    assert "bad/tfrecord" in dead and "bad/corrupt" in dead
    assert "corrupt" in dead["bad/corrupt"]["reason"] or "unreadable" in dead["bad/corrupt"]["reason"]
    if hasattr(data, "max_pixels"):   # the header size limit of dir: inputs (TFBD_MAX_PIXELS)
        assert "too large" in dead["bad/huge"]["reason"]
        assert summary["bad_items"] == 3
    else:
        assert summary["bad_items"] == 2

    # The sanitised set: every unflagged image, readable again by any command (and equal pixels).
    clean = data.load(f"tfrecord:{tmp_path}/clean/clean-*.tfrecord", image_size=32, with_ids=True)
    cx, _, cids = data.materialize(clean)
    assert sorted(cids) == sorted(i for i, r in expected.items() if r["flagged"] == "0")
    pos = {i: k for k, i in enumerate(ids)}
    assert all(np.array_equal(cx[k], x[pos[i]]) for k, i in enumerate(cids))

    # The plain scan reads the new specs too: same scores from the TFRecord shards.
    with pytest.warns(UserWarning, match="bad/tfrecord"):
        detector.scan(model, f"tfrecord:{tmp_path}/tfr/part-*.tfrecord", tmp_path / "plain_tfr.csv")
    tfr = _rows([tmp_path / "plain_tfr.csv"])
    assert set(tfr) == set(ids[:n_tfr])
    assert all(tfr[i]["score"] == expected[i]["score"] for i in tfr)
