import numpy as np
import pytest
import scipy.fft

import keras
from tfbackdoor.frequency import DCT2D, SpectrumStats, dct2d, high_frequency_ratio, idct2d


@pytest.mark.parametrize("size", [32, 224])
def test_dct_implementations_agree_with_scipy(size, rng):
    x = rng.integers(0, 256, (2, size, size, 3)).astype("float64")
    ref = scipy.fft.dctn(x, type=2, norm="ortho", axes=(1, 2))
    # float64: agreement to 1e-3 absolute (plus 1e-7 relative on the ~3e4 DC term).
    np.testing.assert_allclose(dct2d(x).numpy(), ref, rtol=1e-7, atol=1e-3)
    np.testing.assert_allclose(DCT2D(dtype="float64")(x).numpy(), ref, rtol=1e-7, atol=1e-3)
    # float32 (what models use): the DC term of a 224x224 image is ~3e4, so float32 sums carry
    # ~1e-2 absolute rounding; the agreement is 1e-3 relative, and tight in absolute terms at 32 px.
    atol = 1e-3 if size == 32 else 2e-2
    x32 = x.astype("float32")
    np.testing.assert_allclose(dct2d(x32).numpy(), ref, rtol=1e-3, atol=atol)
    np.testing.assert_allclose(DCT2D()(x32).numpy(), ref, rtol=1e-3, atol=atol)


def test_idct_inverts_dct_and_single_images(rng):
    x = rng.integers(0, 256, (3, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(idct2d(dct2d(x)).numpy(), x, atol=1e-2)
    np.testing.assert_allclose(DCT2D(inverse=True)(DCT2D()(x)).numpy(), x, atol=1e-2)
    np.testing.assert_allclose(dct2d(x[0]).numpy(), dct2d(x).numpy()[0], atol=1e-3)
    assert dct2d(x.astype("uint8")).dtype.name == "float32"


def test_dct2d_layer_config_and_saving(tmp_path, rng):
    layer = DCT2D(scale=255.0, name="d")
    again = DCT2D.from_config(layer.get_config())
    assert again.scale == 255.0 and again.inverse is False
    inp = keras.Input((32, 32, 3))
    model = keras.Model(inp, DCT2D()(inp))
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = rng.random((1, 32, 32, 3)).astype("float32") * 255
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-3)


def test_high_frequency_ratio_separates_smooth_from_sharp(rng):
    yy, xx = np.mgrid[:32, :32]
    smooth = np.repeat(((np.sin(xx / 6.0) + np.cos(yy / 5.0)) * 60 + 128)[None, ..., None], 3, -1)
    sharp = smooth.copy()
    sharp[:, ::2, :, :] = 255  # stripes: energy at the highest vertical frequency
    r = high_frequency_ratio(dct2d(np.concatenate([smooth, sharp]).astype("float32"))).numpy()
    assert r[0] < 0.01 and r[1] > 0.3


def test_spectrum_stats_stream_equals_one_shot(rng):
    x = rng.integers(0, 256, (50, 32, 32, 3)).astype("uint8")
    a, b = SpectrumStats(), SpectrumStats()
    a.update(x)
    for i in range(0, 50, 7):
        b.update(x[i:i + 7])
    ra, rb = a.result(), b.result()
    assert ra["n"] == rb["n"] == 50
    np.testing.assert_allclose(ra["mean_log_spectrum"], rb["mean_log_spectrum"], rtol=1e-5)
    assert ra["hf_ratio"] == pytest.approx(rb["hf_ratio"], rel=1e-6)
    with pytest.raises(ValueError):
        SpectrumStats().result()
