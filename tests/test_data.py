import warnings

import numpy as np
import pytest
from PIL import Image

from tfbackdoor import data
from tfbackdoor.errors import TfbdError


def _write_tree(root, rng):
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / "cats" / "a.png")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(root / "cats" / "grey.jpg")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "dogs" / "b.jpg")
    (root / "dogs" / "corrupt.png").write_bytes(b"this is not a png")
    (root / "dogs" / "notes.txt").write_text("ignored: not an image extension")


def test_dir_spec_resizes_expands_grey_and_skips_corrupt(tmp_path, rng):
    _write_tree(tmp_path / "t", rng)
    skipped = []
    with pytest.warns(UserWarning, match="corrupt.png"):
        x, y = data.load_arrays(f"dir:{tmp_path / 't'}", image_size=16, skipped=skipped)
    assert x.shape == (3, 16, 16, 3) and x.dtype == np.uint8
    assert sorted(y.tolist()) == [0, 0, 1]
    assert [s[0].endswith("corrupt.png") for s in skipped] == [True]


def test_npz_spec_and_subsets_are_deterministic(tmp_path, rng):
    p = tmp_path / "d.npz"
    np.savez(p, x=rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8), y=np.arange(30))
    x1, y1 = data.load_arrays(f"npz:{p}", limit=10, seed=3)
    x2, y2 = data.load_arrays(f"npz:{p}", limit=10, seed=3)
    x3, y3 = data.load_arrays(f"npz:{p}", limit=10, seed=4)
    assert (y1 == y2).all() and not (y1 == y3).all() and len(y1) == 10
    xa, ya = data.load_arrays(f"npz:{p}")
    assert (ya == np.arange(30)).all()  # no limit: original order
    xr, _ = data.load_arrays(f"npz:{p}", image_size=16, limit=2)
    assert xr.shape == (2, 16, 16, 3)
    both, yb = data.load_arrays(f"npz:{p}+npz:{p}")
    assert len(both) == 60


@pytest.mark.parametrize("arrays,match", [
    (dict(x=np.zeros((4, 8, 8, 5), np.uint8), y=np.zeros(4)), "expected \\(N, H, W, 3\\)"),
    (dict(x=np.full((4, 8, 8, 3), 300.0), y=np.zeros(4, int)), "dtype float64"),
    (dict(x=np.zeros((4, 8, 8, 3), np.uint8), y=np.zeros(3, int)), "4 images but y has 3"),
    (dict(images=np.zeros((4, 8, 8, 3), np.uint8)), "must hold arrays 'x' and 'y'"),
])
def test_bad_npz_files_name_the_problem(tmp_path, arrays, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(TfbdError, match=match):
        data.load_arrays(f"npz:{p}")


def test_missing_corrupt_and_unknown_specs(tmp_path):
    with pytest.raises(TfbdError, match="file not found"):
        data.load(f"npz:{tmp_path / 'nope.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    with pytest.raises(TfbdError, match="junk.npz"):
        data.load(f"npz:{tmp_path / 'junk.npz'}")
    with pytest.raises(TfbdError, match="unknown dataset 'cifar11'"):
        data.load("cifar11")
    with pytest.raises(TfbdError, match="directory not found"):
        data.load(f"dir:{tmp_path / 'none'}")


def test_tfds_offline_message_says_how_to_use_a_local_copy():
    with pytest.raises(TfbdError, match="npz:PATH"):
        data.load("tfds:no_such_dataset_xyz:train")


def test_short_names_on_real_data(data_dir):
    for spec, size in [("cifar10:test", 32), ("cifar10:lossless", 32), ("gtsrb:test", 32), ("tsrd:train", 32)]:
        x, y = data.load_arrays(spec, limit=20, seed=0)
        assert x.shape == (20, size, size, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    x, y = data.load_arrays("lfw62", limit=3, image_size=128)
    assert x.shape == (3, 128, 128, 3)
    assert (x[..., 0] == x[..., 1]).all()  # greyscale expanded to RGB
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the real CIFAR-10 copy has no unreadable files
        x, y = data.load_arrays("cifar10:test", limit=50)
    assert set(y.tolist()) <= set(range(10))


def test_crops_spec_makes_seeded_lossless_crops_at_any_size(tmp_path, rng):
    yy, xx = np.mgrid[0:200, 0:300]
    photo = np.stack([xx % 256, yy % 256, (xx * yy) % 256], -1).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    Image.fromarray(photo[:20, :20]).save(tmp_path / "tiny.png")  # smaller than 1.5 x size: unused
    x, y = data.load_arrays(f"crops:{tmp_path}:40")
    assert x.shape == (40, 32, 32, 3) and x.dtype == np.uint8 and (y == 0).all()
    again, _ = data.load_arrays(f"crops:{tmp_path}:40")
    assert (x == again).all()                                   # deterministic
    assert len({a.tobytes() for a in x}) == 40                  # all different
    big, _ = data.load_arrays(f"crops:{tmp_path}:5", image_size=64)
    assert big.shape == (5, 64, 64, 3)
    sub, _ = data.load_arrays(f"crops:{tmp_path}:40", limit=10, seed=3)
    assert len(sub) == 10
    with pytest.raises(TfbdError, match="no readable image"):
        data.load_arrays(f"crops:{tmp_path}:4", image_size=256)
    with pytest.raises(TfbdError, match="directory not found"):
        data.load_arrays(f"crops:{tmp_path / 'nope'}")


def test_photo_crops_of_the_real_photos(data_dir):
    assert data.CROP_SOURCES["photos:crops"] == "photos"   # photos:crops = 20,000 of these
    x, y = data.load_arrays(f"crops:{data_dir / 'photos'}:50")
    assert x.shape == (50, 32, 32, 3) and x.std() > 20


# ----------------------------------------------------------------------------- bad input (issue 15)

def _bomb_png(path, width, height):
    """A valid PNG header declaring ``width x height`` with only a few rows of data (a few KB)."""
    import struct
    import zlib

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (3 * width + 1) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_dir_decompression_bombs_are_skipped_with_a_reason_before_decoding(tmp_path, rng, monkeypatch):
    import resource

    root = tmp_path / "t"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / c / "ok.png")
    _bomb_png(root / "a" / "bomb.png", 23000, 23000)        # 1.6 GB decoded: beyond Pillow's own limit
    _bomb_png(root / "b" / "bomb.webp", 9000, 9000)         # the Pillow path (not a TF format by name)
    _bomb_png(root / "b" / "bomb2.png", 9000, 9000)         # 81 MP: Pillow alone would not even warn
    skipped = []
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.warns(data.SkippedItems) as record:
        x, y = data.load_arrays(f"dir:{root}", image_size=16, skipped=skipped)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 300_000   # KB: nothing was decoded
    assert x.shape == (2, 16, 16, 3) and sorted(y.tolist()) == [0, 1]           # the rest is all there
    reasons = {s[0].split("/")[-1]: s[1] for s in skipped}
    assert sorted(reasons) == ["bomb.png", "bomb.webp", "bomb2.png"]
    assert reasons["bomb2.png"].startswith("image too large: its header declares 9000x9000 = 81.0 megapixels, "
                                           "more than the limit of 40 (set TFBD_MAX_PIXELS")
    assert reasons["bomb.png"].startswith("image too large: its header declares 529.0 megapixels")
    assert all(r.startswith("image too large") for r in reasons.values())
    assert record[0].message.items == skipped
    monkeypatch.setenv("TFBD_MAX_PIXELS", "1000")    # configurable: 50 x 40 = 2000 px is now too large
    with pytest.warns(data.SkippedItems, match="ok.png \\(image too large: its header declares 50x40"):
        with pytest.raises(TfbdError, match="no readable images"):
            data.load_arrays(f"dir:{root}", image_size=16)


def test_dir_file_name_that_is_not_utf8_is_scored_with_an_escaped_id(tmp_path, rng):
    import os

    root = tmp_path / "t"
    (root / "a").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "a" / "ok.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(os.fsencode(root / "a") + b"/bad\xff.jpg")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(os.fsencode(root / "a") + b"/bad\xfe.webp")
    x, y, ids = data.materialize(data.load(f"dir:{root}", with_ids=True), "t")
    assert len(x) == 3
    assert sorted(i.split("/")[-1] for i in ids) == ["bad\\xfe.webp", "bad\\xff.jpg", "ok.png"]
    assert data.report_missing(f"dir:{root}", ids) == []


def test_dir_symlink_loops_and_a_class_folder_linked_to_the_root_are_reported(tmp_path, rng):
    import os

    root = tmp_path / "t"
    for c, n in (("a", 2), ("b", 1)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    os.symlink(".", root / "self")            # a class folder that is the dataset folder itself
    os.symlink("..", root / "a" / "up")       # a loop back to the dataset folder
    os.symlink("ring", root / "b" / "ring")   # a link to itself
    os.symlink(root / "a", root / "b" / "again")   # a folder already listed (as class a)
    skipped = []
    with pytest.warns(data.SkippedItems, match="symlink loop"):
        x, y = data.load_arrays(f"dir:{root}", skipped=skipped)
    assert sorted(y.tolist()) == [0, 0, 1]    # no image twice, none under the label of 'self'
    reasons = {s[0][len(str(root)) + 1:]: s[1] for s in skipped}
    assert reasons.keys() == {"self", "a/up", "b/ring", "b/again"}
    assert "the dataset folder or one of its parents; skipped" in reasons["self"]
    assert reasons["a/up"].startswith("symlink loop")
    assert "already listed" in reasons["b/again"]


def test_flat_folder_is_unlabelled_and_a_plain_path_gets_a_hint(tmp_path, rng):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(flat / f"{i}.png")
    x, y = data.load_arrays(f"dir:{flat}")
    assert len(x) == 3 and (y == data.UNLABELLED).all() and data.UNLABELLED == -1
    with pytest.raises(TfbdError, match=f"unknown dataset '{flat}': did you mean dir:{flat}\\?"):
        data.load(str(flat))
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 8, 8, 3), np.uint8), y=np.zeros(2, int))
    with pytest.raises(TfbdError, match="did you mean npz:"):
        data.load(str(tmp_path / "d.npz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TfbdError, match="no class sub-folders and no image files"):
        data.load(f"dir:{tmp_path / 'empty'}")


def test_prepare_camera_like_leaves_out_camera_photos_and_writes_camera_sized_q92_frames(tmp_path):
    """benchmarks/prepare_camera_like.py: a source photo that is a camera photo (same stem), a small
    one, a greyscale one and a corrupt file are left out or reported; every other photo gives
    ``--crops`` 224x224 JPEG frames, the first its centre square; the folder appears whole."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import prepare_camera_like

    rng = np.random.default_rng(0)
    cam, src, out = tmp_path / "camera", tmp_path / "src", tmp_path / "out"
    cam.mkdir(), src.mkdir()
    photo = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    photo(224, 224).save(cam / "n001_cat.jpg")
    photo(300, 400).save(src / "n001_cat.JPEG")          # the camera photo's source: left out
    photo(300, 400).save(src / "n002_dog.JPEG")
    photo(260, 260).save(src / "n003_owl.png")
    photo(200, 300).save(src / "n004_small.JPEG")        # short side < 256
    Image.fromarray(np.full((300, 300, 3), 90, np.uint8)).save(src / "n005_grey.png")
    (src / "n006_broken.jpg").write_bytes(b"not a jpeg")
    assert prepare_camera_like.main(["--src", str(src), "--out", str(out), "--camera", str(cam), "--crops", "3"]) == 0
    frames = sorted(p.name for p in out.glob("*.jpg"))
    assert frames == [f"{s}_{k}.jpg" for s in ("n002_dog", "n003_owl") for k in range(3)]
    with Image.open(out / "n002_dog_1.jpg") as im:
        assert im.size == (224, 224) and im.format == "JPEG"
    rows = (out / "sources.tsv").read_text().splitlines()
    assert rows[1].split("\t")[:3] == ["n002_dog_0.jpg", "n002_dog.JPEG", "50,0,350,300"]   # the centre square
    report = json.loads((out / "excluded.json").read_text())
    assert {e["file"] for e in report["excluded"]} == {"n001_cat.JPEG", "n004_small.JPEG", "n005_grey.png"}
    assert [e["file"] for e in report["unreadable"]] == ["n006_broken.jpg"]
    assert not (tmp_path / "out.tmp").exists()
    assert prepare_camera_like.main(["--src", str(tmp_path / "nope"), "--out", str(out), "--camera", str(cam)]) == 2
