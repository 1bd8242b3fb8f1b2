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
