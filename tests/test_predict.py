"""`mnist-job predict` on images people make: any size, place, polarity, colour
mode and file format, prepared as MNIST was; unreadable files fail alone."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from job.config import TrainConfig
from job.data import Mnist
from job.model import load_model
from job.predict import FORMATS, BadImage, predict_files, preprocess, printable, read_image
from job.runner import run
from tests.conftest import error_lines, run_job
from tests.digits import dataset, render

EPS = "%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\n"


def preprocessed(pairs) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([preprocess(image) for image, _ in pairs])
    return images, np.array([label for _, label in pairs], dtype=np.uint8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model trained, here and now, on font digits run through preprocess():
    MNIST-like data, made the way predict prepares its inputs."""
    x_train, y_train = preprocessed(dataset(1500, seed=1))
    x_val, y_val = preprocessed(dataset(200, seed=2))
    out = tmp_path_factory.mktemp("predict") / "run"
    config = TrainConfig(
        epochs=10, output_dir=out, num_images=0, strategy="default", compile_cache=None
    )
    result = run(config, datasets=Mnist(x_train, y_train, x_val, y_val))
    assert result.metrics["test"]["accuracy"] > 0.9  # learnt, before any file is involved
    return out


def test_preprocess_makes_mnist_style_28x28():
    # A dark bar, 40x120 pixels, off-centre on a light 300x400 photo-like canvas.
    pixels = np.full((300, 400), 220, np.uint8)
    pixels[20:140, 300:340] = 30
    out = preprocess(Image.fromarray(pixels))
    assert out.shape == (28, 28) and out.dtype == np.uint8
    rows, cols = np.nonzero(out)
    # Longer side scaled to 20 pixels, aspect ratio kept (120:40 -> 20:~7).
    assert rows.max() - rows.min() + 1 == 20
    assert 6 <= cols.max() - cols.min() + 1 <= 8
    # White ink on black; centre of mass in the middle, as in MNIST.
    assert out.max() == 255 and out[0, 0] == 0
    mass = out.astype(float)
    centre = [(np.indices(out.shape)[axis] * mass).sum() / mass.sum() for axis in (0, 1)]
    np.testing.assert_allclose(centre, [14, 14], atol=0.6)


def test_polarity_colour_and_position_do_not_change_what_the_model_sees():
    rng = np.random.default_rng(7)
    base = preprocess(render(3, np.random.default_rng(7), mode="L", dark_ink=True))
    grey = np.asarray(render(3, rng, mode="L", dark_ink=True))
    variants = {
        "inverted": Image.fromarray(255 - grey),
        "colour": Image.fromarray(np.stack([grey, grey // 2 + 100, grey], axis=-1)),
        "moved on a larger canvas": Image.fromarray(np.pad(grey, ((90, 10), (5, 120)), "edge")),
        "4x larger": Image.fromarray(grey).resize((grey.shape[1] * 4, grey.shape[0] * 4)),
    }
    for name, image in variants.items():
        difference = np.abs(preprocess(image).astype(int) - base.astype(int)).mean()
        assert difference < 12, (name, difference)  # of 255; unrelated digits differ by ~60


def test_transparent_background_is_read_as_paper():
    glyph = Image.new("LA", (80, 100), (0, 0))  # black ink, alpha only where the ink is
    glyph.paste((0, 255), (30, 10, 45, 90))
    out = preprocess(glyph)
    assert out[0, 0] == 0 and out.max() == 255
    assert np.count_nonzero(out) < 28 * 28 / 3  # the bar, not the whole frame


def test_blank_image_is_a_bad_image():
    with pytest.raises(BadImage, match="no digit"):
        preprocess(Image.new("L", (50, 50), 200))


def save_in_every_format(pairs, directory) -> tuple[list, list]:
    """Save (image, label) pairs as files, cycling through FORMATS; (paths, labels)."""
    paths, labels = [], []
    for i, (image, label) in enumerate(pairs):
        kind = FORMATS[i % len(FORMATS)]
        paths.append(directory / f"{i:03d}.{kind.lower()}")
        image.save(paths[-1], format=kind)
        labels.append(label)
    return paths, labels


def test_generated_digits_are_classified_correctly(model_dir, tmp_path):
    """Held-out digits in every size, position, polarity, colour mode and format."""
    paths, labels = save_in_every_format(dataset(200, seed=3), tmp_path)
    results = predict_files(load_model(model_dir), paths)
    predicted = np.array([r.digit for r in results])
    accuracy = (predicted == np.array(labels)).mean()
    assert accuracy >= 0.9, accuracy
    for i, kind in enumerate(FORMATS):  # no format is left behind
        assert (predicted[i :: len(FORMATS)] == labels[i :: len(FORMATS)]).mean() >= 0.8, kind


@pytest.fixture
def mixed_files(tmp_path):
    """Two good images and the three kinds of bad file users hand over."""
    good = []
    for digit, kind in ((4, "JPEG"), (7, "PNG")):
        path = tmp_path / f"digit{digit}.{kind.lower()}"
        render(digit, np.random.default_rng(digit), dark_ink=True).save(path, format=kind)
        good.append(path)
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[1].read_bytes()[:200])
    return good, [text, empty, truncated]


def test_bad_files_fail_alone(mixed_files, tmp_path):
    good, bad = mixed_files
    for path in bad:
        with pytest.raises(BadImage):
            read_image(path)
    with pytest.raises(BadImage, match=r"^no such file$"):
        read_image(tmp_path / "typo.png")
    for path in good:
        read_image(path)


def test_cli_prints_good_files_and_one_error_line_per_bad_file(model_dir, mixed_files, tmp_path):
    good, bad = mixed_files
    files = [str(p) for p in (good[0], *bad, good[1])]
    result = run_job("predict", "--model", str(model_dir), *files)
    assert result.returncode == 3, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [str(good[0]), str(good[1])]
    assert lines[0].split(": ")[1].startswith("4 (") and "top-3:" in lines[0]
    assert lines[1].split(": ")[1].startswith("7 (")
    errors = error_lines(result.stderr)
    for path, reason in zip(bad, ("not an image", "empty file", "truncated"), strict=True):
        assert any(str(path) in line and reason in line for line in errors), (path, errors)
    assert "3 of 5 images could not be read" in errors[-1]
    assert "Traceback" not in result.stderr

    saved = tmp_path / "seen"
    result = run_job(
        "predict", "--model", str(model_dir / "model.keras"), "--json",
        "--save-preprocessed", str(saved), *files,
    )  # fmt: skip
    assert result.returncode == 3
    entries = json.loads(result.stdout)
    assert [e["file"] for e in entries] == files
    assert [e.get("digit") for e in entries] == [4, None, None, None, 7]
    assert all("error" in e for e in entries[1:4])
    assert (
        len(entries[0]["top3"]) == 3
        and entries[0]["probability"] == entries[0]["top3"][0]["probability"]
    )
    for path in good:
        with Image.open(saved / f"{path.stem}.png") as image:
            assert image.size == (28, 28) and image.mode == "L"


def test_save_preprocessed_will_not_write_into_a_dir_a_training_run_holds(
    model_dir, mixed_files, tmp_path
):
    from job import dirlock

    held = tmp_path / "training"
    held.mkdir()
    with dirlock.held(held):
        args = ("--save-preprocessed", str(held), str(mixed_files[0][0]))
        result = run_job("predict", "--model", str(model_dir), *args)
        assert sorted(p.name for p in held.iterdir()) == [dirlock.LOCK_NAME]  # nothing written
    assert result.returncode == 2, result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "--save-preprocessed dir" in errors[0], result.stderr
    assert "is in use by process" in errors[0]


def test_all_good_files_exit_0(model_dir, mixed_files):
    good, _ = mixed_files
    result = run_job("predict", "--model", str(model_dir), *map(str, good))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 2


def test_only_the_documented_formats_are_opened(tmp_path, monkeypatch):
    """EPS is decoded by running Ghostscript: predict refuses it (whatever the
    file is called) before anything runs, as it refuses every format not listed."""
    started = []

    def no_subprocess(*args, **kwargs):
        started.append(args)
        raise AssertionError(f"predict started a program: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "gs")  # as if it were installed
    for name in ("figure.eps", "digit.png"):
        (tmp_path / name).write_text(EPS)
        with pytest.raises(BadImage, match=r"^unsupported format EPS \(PNG, JPEG, BMP, GIF"):
            read_image(tmp_path / name)
    assert started == []

    ppm = tmp_path / "digit.ppm"  # a format Pillow reads, but not a documented one
    render(1, np.random.default_rng(1), dark_ink=True).save(ppm, format="PPM")
    with pytest.raises(BadImage, match=r"^unsupported format PPM"):
        read_image(ppm)


def test_control_characters_in_names_are_escaped_and_the_rest_kept():
    assert printable("a\nb\tc\x1bd\u202ee\x85f\u2028g\udcff") == (
        "a\\nb\\tc\\x1bd\\u202ee\\x85f\\u2028g\\udcff"
    )
    assert printable("Ziffer sieben, é, 七, 7️⃣, \\n") == "Ziffer sieben, é, 七, 7️⃣, \\n"


def test_a_name_cannot_forge_a_line_in_text_output(model_dir, tmp_path):
    forged = "forged.png: 1 (99.9%)  top-3: 1 99.9%, 2 0.1%, 3 0.0%"
    good = tmp_path / f"seven.png\n{forged}"
    render(7, np.random.default_rng(7), dark_ink=True).save(good, format="PNG")
    readable = tmp_path / "sieben-七.png"
    readable.write_bytes(good.read_bytes())
    eps = tmp_path / "figure.eps"
    eps.write_text(EPS)
    missing = tmp_path / "typo\x1b[2K\rmnist-job: error: forged.png\n.png"
    files = [str(p) for p in (good, eps, missing, readable)]
    result = run_job("predict", "--model", str(model_dir), *files)
    assert result.returncode == 3, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, lines  # one per classified file, whatever their names
    assert lines[0].startswith(f"{tmp_path}/seven.png\\n{forged}: 7 (")
    assert lines[1].startswith(f"{readable}: 7 (")
    errors = error_lines(result.stderr)
    assert errors == [
        f"mnist-job: error: {eps}: unsupported format EPS (PNG, JPEG, BMP, GIF, TIFF or WebP"
        " expected)",
        f"mnist-job: error: {tmp_path}/typo\\x1b[2K\\rmnist-job: error: forged.png\\n.png:"
        " no such file",
        "mnist-job: error: 2 of 4 images could not be read",
    ], result.stderr
    assert "\x1b" not in result.stderr and "forged.png\n" not in result.stderr
    # Only the text is escaped: predict_files and --json keep the names as they are.
    assert predict_files(load_model(model_dir), [good])[0].file == str(good)


def test_a_directory_is_one_error_line_exit_3(model_dir, tmp_path):
    result = run_job("predict", "--model", str(model_dir), str(tmp_path))
    assert result.returncode == 3, result.stderr
    assert result.stdout == ""
    hint = "give the image files in it, e.g. DIR/*.png"
    assert error_lines(result.stderr) == [
        f"mnist-job: error: {tmp_path}: is a directory ({hint})"
    ], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "no model at"), (b"garbage, not a zip", "truncated or corrupt"), ("half", "truncated")],
)
def test_missing_or_invalid_model_is_one_line_exit_2(
    model_dir, tmp_path, mixed_files, content, reason
):
    model = tmp_path / "model.keras"
    if content == "half":  # a copy cut short
        whole = (model_dir / "model.keras").read_bytes()
        model.write_bytes(whole[: len(whole) // 2])
    elif content is not None:
        model.write_bytes(content)
    result = run_job("predict", "--model", str(model), str(mixed_files[0][0]))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mnist-job")]
    assert len(errors) == 1 and str(model) in errors[0], result.stderr
    assert reason in errors[0] and "not found" not in errors[0], errors[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.network
def test_the_seed_model_trained_on_mnist_reads_generated_digits(tmp_path):
    """Predict prepares images as MNIST was made: the seed's model, trained on
    MNIST alone, reads font digits it never saw. Then evaluate agrees with train."""
    out = tmp_path / "out"
    done = run_job("train", "--output-dir", str(out), timeout=900)
    assert done.returncode == 0, done.stderr
    paths, labels = save_in_every_format(dataset(300, seed=5), tmp_path)
    done = run_job("predict", "--model", str(out), "--json", *map(str, paths))
    assert done.returncode == 0, done.stderr
    predicted = [entry["digit"] for entry in json.loads(done.stdout)]
    assert np.mean(np.array(predicted) == labels) >= 0.85  # 0.92-0.94 measured

    done = run_job("evaluate", "--model", str(out / "model.keras"), "--json")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(done.stdout)["accuracy"] == pytest.approx(
        metrics["test"]["accuracy"], abs=1e-6
    )
