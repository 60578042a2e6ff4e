"""`convert` end to end: layout, labels, pixels, awkward files, zip in and out, resume, user errors."""
import json
import zipfile

import numpy as np
import PIL.Image
import pytest

import dataset_tools as dt

# Indices of class_tree's images that convert (0 and 6 are unreadable) and their labels.
EXPECTED_LABELS = [["00000/img00000001.png", 0], ["00000/img00000002.png", 0], ["00000/img00000003.png", 1],
                   ["00000/img00000004.png", 1], ["00000/img00000005.png", 2]]
SOURCES = ["n01/broken.JPEG", "n01/gray.png", "n01/rgb.JPEG", "n02/cmyk.jpg", "n02/rgba.png",
           "n03/palette.gif", "n03/truncated.jpg"]


def test_layout_labels_and_summary(converted, class_tree, read_tree):
    dest, process = converted
    assert set(read_tree(dest)) == {"dataset.json"} | {name for name, _ in EXPECTED_LABELS}
    assert process.stdout.startswith(f"{class_tree}: 7 images, 3 distinct labels\n")
    assert json.loads((dest / "dataset.json").read_text()) == {"labels": EXPECTED_LABELS}
    summary = "converted 5 images, skipped 2 unreadable: n01/broken.JPEG, n03/truncated.jpg"
    assert process.stdout.strip().splitlines()[-1] == summary
    warnings = [line for line in process.stderr.splitlines() if "warning: skipping unreadable" in line]
    assert len(warnings) == 2 and "n01/broken.JPEG" in warnings[0] and "n03/truncated.jpg" in warnings[1]


def test_pixels_are_the_transformed_sources(converted, class_tree):
    dest, _ = converted
    for name, _ in EXPECTED_LABELS:
        index = int(name[-12:-4])
        source = dt.decode_rgb((class_tree / SOURCES[index]).read_bytes())
        expected = np.asarray(dt.center_crop_dhariwal(source, 32, 32))
        with PIL.Image.open(dest / name) as out:
            assert out.mode == "RGB" and out.size == (32, 32)
            np.testing.assert_array_equal(np.asarray(out), expected)


def test_zip_destination_holds_the_same_files(converted, class_tree, tmp_path, read_tree):
    dest = tmp_path / "images.zip"
    assert dt.main(["convert", f"--source={class_tree}", f"--dest={dest}", "--resolution=32x32", "--workers=0"]) == 0
    with zipfile.ZipFile(dest) as z:
        assert {name: z.read(name) for name in z.namelist()} == read_tree(converted[0])
    assert not (tmp_path / "images.zip.partial").exists()


def test_zip_source_gives_the_same_files(converted, class_tree, tmp_path, read_tree):
    archive = tmp_path / "tree.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(class_tree.rglob("*")):
            z.write(path, path.relative_to(class_tree).as_posix())
        z.writestr("__MACOSX/n01/._rgb.JPEG", b"macOS metadata")  # would become class 0 if counted
    dest = tmp_path / "images"
    assert dt.main(["convert", f"--source={archive}", f"--dest={dest}", "--resolution=32x32", "--workers=2"]) == 0
    assert read_tree(dest) == read_tree(converted[0])


def test_dataset_json_source_keeps_its_labels(tmp_path):
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    PIL.Image.new("RGB", (40, 30), (1, 2, 3)).save(source / "sub/b.jpg")
    PIL.Image.new("RGB", (30, 40), (4, 5, 6)).save(source / "a.png")
    (source / "dataset.json").write_text(json.dumps({"labels": [["sub/b.jpg", 7], ["a.png", 3]]}))
    dest = tmp_path / "images"
    assert dt.main(["convert", f"--source={source}", f"--dest={dest}", "--resolution=16x16", "--workers=0"]) == 0
    labels = json.loads((dest / "dataset.json").read_text())["labels"]
    assert labels == [["00000/img00000000.png", 3], ["00000/img00000001.png", 7]]  # sorted by source path


@pytest.mark.parametrize("transform", ["center-crop", "center-crop-wide"])
def test_other_transforms_and_max_images(class_tree, tmp_path, transform):
    dest = tmp_path / "images"
    argv = ["convert", f"--source={class_tree}", f"--dest={dest}", "--resolution=24x16",
            f"--transform={transform}", "--max-images=3", "--workers=0"]
    assert dt.main(argv) == 0
    labels = json.loads((dest / "dataset.json").read_text())["labels"]
    assert [name for name, _ in labels] == ["00000/img00000001.png", "00000/img00000002.png"]
    for name, _ in labels:
        with PIL.Image.open(dest / name) as out:
            assert out.size == (24, 16)


def test_interrupted_and_damaged_run_resumes_to_identical_files(converted, class_tree, tmp_path, monkeypatch,
                                                                read_tree, capsys):
    dest = tmp_path / "images"
    argv = ["convert", f"--source={class_tree}", f"--dest={dest}", "--resolution=32x32", "--workers=0"]
    decode, calls = dt.decode_rgb, []

    def decode_then_interrupt(data):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as if Ctrl-C arrived while decoding the 4th source file
        return decode(data)

    monkeypatch.setattr(dt, "decode_rgb", decode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        dt.main(argv)
    monkeypatch.undo()
    assert sorted(read_tree(dest)) == ["00000/img00000001.png", "00000/img00000002.png"]
    # A file cut short (as by a crash of a non-atomic copy) and a temp file left by a killed write.
    first = dest / "00000/img00000001.png"
    first.write_bytes(first.read_bytes()[:100])
    (dest / "00000/.img00000003.png.tmp").write_bytes(b"partial")
    capsys.readouterr()
    assert dt.main(argv) == 0
    assert read_tree(dest) == read_tree(converted[0])
    assert "converted 5 images (1 already done), skipped 2" in capsys.readouterr().out


def test_zip_destination_resumes_from_its_partial_folder(class_tree, tmp_path, capsys):
    """An interrupted zip conversion leaves `<dest>.partial/`; the rerun continues it."""
    partial, dest = tmp_path / "images.zip.partial", tmp_path / "images.zip"
    common = [f"--source={class_tree}", "--resolution=32x32", "--workers=0"]
    assert dt.main(["convert", *common, f"--dest={partial}", "--max-images=4"]) == 0
    assert dt.main(["convert", *common, f"--dest={dest}"]) == 0
    assert "(3 already done)" in capsys.readouterr().out
    resumed = dest.read_bytes()
    assert dt.main(["convert", *common, f"--dest={tmp_path / 'fresh.zip'}"]) == 0
    assert (tmp_path / "fresh.zip").read_bytes() == resumed


def no_class_folders(tmp_path):
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
    return str(tmp_path)


@pytest.mark.parametrize("argv, message", [
    (lambda t: ["convert", f"--source={t}/missing", f"--dest={t}/o"], "no such file or folder"),
    (lambda t: ["convert", f"--source={t}", f"--dest={t}/o", "--resolution=256"], "--resolution"),
    (lambda t: ["convert", f"--source={t}", f"--dest={t}/o", "--resolution=0x8"], "--resolution"),
    (lambda t: ["convert", f"--source={t}", f"--dest={t}/o", "--transform=center-crop-tall"], "--transform"),
    (lambda t: ["convert", f"--source={t}", f"--dest={t}/o", "--resolution=32x16"], "square"),
    (lambda t: ["convert", f"--source={no_class_folders(t)}", f"--dest={t}/o"], "no dataset.json"),
    (lambda t: ["encode", f"--source={no_class_folders(t)}", f"--dest={t}/o"], "no dataset.json"),
    (lambda t: ["convert", f"--source={t}"], "--dest"),
    (lambda t: [], "command"),
])
def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert dt.main(argv(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_user_error_from_the_command_line_has_no_traceback(cli, tmp_path):
    process = cli("convert", f"--source={tmp_path / 'missing'}", f"--dest={tmp_path / 'o'}")
    assert process.returncode == 2
    assert process.stderr == f"error: --source {tmp_path / 'missing'}: no such file or folder\n"
