"""sdterm.engine.init_image: A1111's img2img init image (resize modes, EXIF, flatten, [-1,1], Init image hash)."""

import hashlib
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from sdterm.engine.init_image import (
    RESIZE_MODES,
    InitImage,
    InitImageError,
    prepare_init_image,
    resize_mode,
    to_tensor,
)

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
LANCZOS = Image.Resampling.LANCZOS


def stripes(tmp_path, size, colours, vertical=True, name="stripes.png"):
    """Equal-width vertical (or horizontal) stripes of the colours, saved as PNG; returns (path, array)."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    n = len(colours)
    for i, c in enumerate(colours):
        if vertical:
            a[:, i * w // n:(i + 1) * w // n] = c
        else:
            a[i * h // n:(i + 1) * h // n, :] = c
    path = tmp_path / name
    Image.fromarray(a).save(path)
    return path, a


def arr(im):
    return np.asarray(im).astype(np.int64)


def near(pixel, colour, tol=40):
    return all(abs(int(p) - c) <= tol for p, c in zip(pixel, colour))


def edge_line(row0, row1):
    """Bicubic (a=-0.5) sample of a zero-size box at an image edge: weights 0.5625 and -0.0625, normalised
    by their sum 0.5 -> 1.125*edge - 0.125*next, rounded half up and clipped (PIL's 8-bit fixed point)."""
    v = np.floor(1.125 * row0.astype(np.float64) - 0.125 * row1.astype(np.float64) + 0.5)
    return np.clip(v, 0, 255).astype(np.int64)


# ----------------------------------------------------------------------------------------------- resize mode


def test_resize_mode_names_and_api_integers():
    assert RESIZE_MODES == ("just resize", "crop and resize", "resize and fill")
    for i, name in enumerate(RESIZE_MODES):
        assert resize_mode(i) == name
        assert resize_mode(str(i)) == name
        assert resize_mode(name) == name
        assert resize_mode(name.title()) == name  # A1111's UI spelling "Crop and resize"
    assert resize_mode("crop-and-resize") == "crop and resize"
    for bad in (3, -1, "fit", True, None, 1.0, "Just resize (latent upscale)"):
        with pytest.raises(ValueError) as e:
            resize_mode(bad)
        msg = str(e.value)
        assert "\n" not in msg and all(n in msg for n in RESIZE_MODES)


@pytest.mark.parametrize("w,h", [(60, 64), (64, 0), (0, 64), (64, -8), (64, 63), (64.0, 64), ("64", 64)])
def test_size_must_be_multiple_of_8(tmp_path, w, h):
    path, _ = stripes(tmp_path, (16, 16), [RED])
    with pytest.raises(ValueError) as e:
        prepare_init_image(path, w, h, "just resize")
    assert "multiple of 8" in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------- geometry


def test_just_resize_ignores_aspect(tmp_path):
    path, a = stripes(tmp_path, (40, 20), [RED, GREEN, BLUE, YELLOW])
    got = prepare_init_image(path, 16, 16, 0)
    assert isinstance(got, InitImage) and got.mode == "just resize" and got.source_size == (40, 20)
    assert got.image.mode == "RGB" and got.image.size == (16, 16)
    want = Image.fromarray(a).resize((16, 16), LANCZOS)
    assert np.array_equal(arr(got.image), arr(want))
    row = arr(got.image)[8]
    assert near(row[0], RED) and near(row[15], YELLOW)  # every stripe survives, squeezed


def test_crop_and_resize_wide_keeps_the_centre(tmp_path):
    # 40x20 into 16x16: cover -> 32x16, pasted at x = 8 - 16 = -8, so source x 10..30 (green, blue) survive.
    path, a = stripes(tmp_path, (40, 20), [RED, GREEN, BLUE, YELLOW])
    got = arr(prepare_init_image(path, 16, 16, "crop and resize").image)
    want = arr(Image.fromarray(a).resize((32, 16), LANCZOS))[:, 8:24]
    assert np.array_equal(got, want)
    assert near(got[8, 0], GREEN) and near(got[8, 15], BLUE)
    assert near(got[8, 7], GREEN) and near(got[8, 8], BLUE, tol=120)
    assert not any(near(p, RED) or near(p, YELLOW) for p in got.reshape(-1, 3))


def test_crop_and_resize_tall_keeps_the_middle_rows(tmp_path):
    path, a = stripes(tmp_path, (20, 40), [RED, GREEN, BLUE, YELLOW], vertical=False)
    got = arr(prepare_init_image(path, 16, 16, 1).image)
    want = arr(Image.fromarray(a).resize((16, 32), LANCZOS))[8:24, :]
    assert np.array_equal(got, want)
    assert near(got[0, 8], GREEN) and near(got[15, 8], BLUE)


def test_resize_and_fill_wide_bands_top_and_bottom(tmp_path):
    # 40x20 into 16x16: contain -> 16x8 at y = 8 - 4 = 4; bands of 4 rows above and below.
    w, h = 40, 20
    a = np.zeros((h, w, 3), np.uint8)
    a[:, :, 0] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]       # red ramps down the image
    a[:, :, 1] = np.linspace(255, 0, w, dtype=np.uint8)[None, :]       # green ramps across
    a[:, : w // 2, 2] = 200
    path = tmp_path / "ramp.png"
    Image.fromarray(a).save(path)
    got = arr(prepare_init_image(path, 16, 16, "resize and fill").image)
    # independent A1111 computation, from images.resize_image's calls
    src = Image.fromarray(a)
    resized = src.resize((16, 8), resample=LANCZOS)
    expect = Image.new("RGB", (16, 16))
    expect.paste(resized, box=(0, 4))
    expect.paste(resized.resize((16, 4), box=(0, 0, 16, 0)), box=(0, 0))
    expect.paste(resized.resize((16, 4), box=(0, 8, 16, 8)), box=(0, 12))
    assert np.array_equal(got, arr(expect))
    r = arr(resized)
    assert np.array_equal(got[4:12], r)
    assert not np.array_equal(r[0], r[1])  # the extrapolation below is not a plain copy of the edge row
    for y in range(4):
        assert np.array_equal(got[y], edge_line(r[0], r[1])), y
        assert np.array_equal(got[12 + y], edge_line(r[7], r[6])), y
    assert not np.array_equal(got[0], r[0])  # A1111 does not copy the edge pixels


def test_resize_and_fill_tall_bands_left_and_right(tmp_path):
    w, h = 20, 40
    a = np.zeros((h, w, 3), np.uint8)
    a[:, :, 0] = np.linspace(0, 250, w, dtype=np.uint8)[None, :]
    a[:, :, 2] = np.linspace(250, 0, h, dtype=np.uint8)[:, None]
    path = tmp_path / "tall.png"
    Image.fromarray(a).save(path)
    got = arr(prepare_init_image(path, 16, 16, 2).image)
    r = arr(Image.fromarray(a).resize((8, 16), resample=LANCZOS))
    assert np.array_equal(got[:, 4:12], r)
    for x in range(4):
        assert np.array_equal(got[:, x], edge_line(r[:, 0], r[:, 1])), x
        assert np.array_equal(got[:, 12 + x], edge_line(r[:, 7], r[:, 6])), x


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_same_aspect_is_one_lanczos_resize_in_every_mode(tmp_path, mode):
    path, a = stripes(tmp_path, (48, 24), [RED, GREEN, BLUE])
    got = prepare_init_image(path, 96, 48, mode)
    assert got.image.size == (96, 48) and got.source_size == (48, 24)
    assert np.array_equal(arr(got.image), arr(Image.fromarray(a).resize((96, 48), LANCZOS)))
    same = prepare_init_image(path, 48, 24, mode)  # already the right size: untouched pixels
    assert np.array_equal(arr(same.image), a)


# ----------------------------------------------------------------------------------------------- tensor


def test_tensor_is_a1111_float_conversion(tmp_path):
    values = np.array([0, 1, 51, 127, 128, 200, 254, 255], np.uint8)
    a = np.zeros((8, 8, 3), np.uint8)
    a[:, :, 0] = values[None, :]
    a[:, :, 1] = values[:, None]
    a[:, :, 2] = 255 - values[None, :]
    path = tmp_path / "values.png"
    Image.fromarray(a).save(path)
    t = prepare_init_image(path, 8, 8, 0).tensor
    assert t.shape == (1, 3, 8, 8) and t.dtype == torch.float32
    # A1111: np.array(image).astype(np.float32) / 255.0, moveaxis to CHW, torch, then image * 2. - 1.
    ref = torch.from_numpy(np.moveaxis(a.astype(np.float32) / 255.0, 2, 0))[None] * 2.0 - 1.0
    assert torch.equal(t, ref)
    assert t[0, 0, 0, 0].item() == -1.0 and t[0, 0, 0, 7].item() == 1.0
    assert t.min().item() >= -1.0 and t.max().item() <= 1.0
    assert torch.equal(to_tensor(Image.fromarray(a)), ref)


# ----------------------------------------------------------------------------------------------- EXIF / alpha


def test_exif_orientation_is_applied(tmp_path):
    # stored 32x16: red left half, blue right half; orientation 6 = display rotated 90 degrees clockwise,
    # so the displayed image is 16x32 with red on top.
    a = np.zeros((16, 32, 3), np.uint8)
    a[:, :16] = RED
    a[:, 16:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(a).save(path, quality=95, exif=exif.tobytes())
    got = prepare_init_image(path, 16, 32, "just resize")
    assert got.source_size == (16, 32)
    g = arr(got.image)
    assert near(g[2, 8], RED) and near(g[29, 8], BLUE)


def test_rgba_is_flattened_onto_white(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[:, :, :3] = (10, 100, 200)
    a[:, :4, 3] = 255
    a[:, 4:6, 3] = 0
    a[:, 6:, 3] = 128
    path = tmp_path / "alpha.png"
    Image.fromarray(a, "RGBA").save(path)
    g = arr(prepare_init_image(path, 8, 8, 0).image)
    assert (g[:, :4] == (10, 100, 200)).all()
    assert (g[:, 4:6] == 255).all()  # transparent -> #ffffff, not the hidden colour
    half = np.array([10, 100, 200]) * 128 / 255 + 255 * 127 / 255
    assert (np.abs(g[:, 6:] - half) <= 1).all()


def test_palette_transparency_is_flattened_onto_white(tmp_path):
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0, 30, 60, 90] + [0] * 762)
    im.paste(1, (0, 0, 4, 8))
    path = tmp_path / "palette.png"
    im.save(path, transparency=0)
    g = arr(prepare_init_image(path, 8, 8, 0).image)
    assert (g[:, :4] == (30, 60, 90)).all() and (g[:, 4:] == 255).all()


def test_animated_image_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE, GREEN)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    g = arr(prepare_init_image(path, 8, 8, 0).image)
    assert near(g[4, 4], RED, tol=10)


# ----------------------------------------------------------------------------------------------- hash


def test_md5_is_a1111_init_image_hash(tmp_path):
    # A1111 hashes img.tobytes() of the image its UI hands over: RGBA (gr.Image(image_mode="RGBA")), before
    # flatten and resize. Built here from the raw RGB bytes, without PIL.
    path, a = stripes(tmp_path, (40, 20), [RED, GREEN, BLUE, YELLOW])
    rgba = np.concatenate([a, np.full(a.shape[:2] + (1,), 255, np.uint8)], axis=2)
    want = hashlib.md5(rgba.tobytes()).hexdigest()
    for mode in RESIZE_MODES:
        assert prepare_init_image(path, 16, 16, mode).md5 == want  # the original, not the resized image
    other, _ = stripes(tmp_path, (40, 20), [RED, GREEN, BLUE, RED], name="other.png")
    assert prepare_init_image(other, 16, 16, 0).md5 != want


# ----------------------------------------------------------------------------------------------- bad input


def png_claiming(width, height):
    """A tiny valid-looking PNG whose IHDR claims width x height."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 4)) + chunk(b"IEND", b""))


def truncated_png(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize("case,needle", [
    ("missing", "no such file"),
    ("text", "not an image"),
    ("empty", "empty (0 bytes)"),
    ("truncated", "truncated"),
    ("huge", "pixel limit"),
    ("bomb", "too large"),
    ("directory", "directory"),
])
def test_bad_inputs_one_line(tmp_path, case, needle):
    path = tmp_path / f"{case}.png"
    if case == "text":
        path.write_text("a prompt, not a picture\nsecond line\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(truncated_png(tmp_path))
    elif case == "huge":
        path.write_bytes(png_claiming(10_000, 10_000))     # 1e8 pixels: over the limit, under PIL's own 2x
    elif case == "bomb":
        path.write_bytes(png_claiming(20_000, 20_000))     # PIL refuses this one in Image.open itself
    elif case == "directory":
        path.mkdir()
    with pytest.raises(InitImageError) as e:
        prepare_init_image(path, 64, 64, "just resize")
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "\n" not in msg and str(path) in msg and needle in msg, msg
