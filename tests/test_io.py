"""common.io: atomic writes, safetensors, weights-only loads, TorchScript weights, images."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from common.io import (
    OUTPUT_MANIFEST,
    atomic_write_dir,
    atomic_write_file,
    claim_output_dir,
    load_image_rgb,
    load_safetensors,
    load_torchscript_weights,
    make_image_grid,
    safe_torch_load,
    save_image_grid,
    save_safetensors,
    to_pil,
)


pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


class RunsCode:
    """Unpickling this runs ``touch <marker>``: the canonical malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------------------------


def test_atomic_write_dir_success_creates_folder_and_leaves_no_temp(tmp_path):
    out = tmp_path / "out"
    with atomic_write_dir(out) as tmp:
        assert tmp != out and tmp.parent == tmp_path and not out.exists()
        (tmp / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "new"
    assert json.loads((out / OUTPUT_MANIFEST).read_text())["files"] == ["a.txt"]
    assert leftovers(tmp_path, {"out"}) == []


def test_atomic_write_dir_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ZeroDivisionError):
        with atomic_write_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            raise ZeroDivisionError("writer crashed half-way")
    assert not out.exists()
    assert leftovers(tmp_path, set()) == []


def test_atomic_write_dir_failure_keeps_previous_output_intact(tmp_path):
    out = tmp_path / "out"
    with atomic_write_dir(out) as tmp:
        (tmp / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            (tmp / "old.txt").write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MANIFEST, "old.txt"]
    assert (out / "old.txt").read_text() == "old"
    assert leftovers(tmp_path, {"out"}) == []


def test_atomic_write_dir_replaces_only_its_own_previous_files(tmp_path):
    out = tmp_path / "out"
    with atomic_write_dir(out) as tmp:
        (tmp / "images").mkdir()
        for name in ("images/0.png", "images/1.png", "grid.png"):
            (tmp / name).write_text("old")
    (out / "notes.txt").write_text("the user's")  # added by the user after the first run
    (out / "images" / "keep.png").write_text("the user's")
    with atomic_write_dir(out) as tmp:
        (tmp / "images").mkdir()
        (tmp / "images/0.png").write_text("new")
        (tmp / "grid.png").write_text("new")
    assert (out / "images/0.png").read_text() == "new" and (out / "grid.png").read_text() == "new"
    assert not (out / "images/1.png").exists()  # the writer's own stale file goes
    assert (out / "notes.txt").read_text() == "the user's" and (out / "images/keep.png").read_text() == "the user's"
    assert json.loads((out / OUTPUT_MANIFEST).read_text())["files"] == ["grid.png", "images/0.png"]
    assert leftovers(tmp_path, {"out"}) == [] and not [p for p in out.iterdir() if "staging" in p.name]


def test_atomic_write_dir_refuses_a_foreign_folder_before_the_body_runs(tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    ran = []
    with pytest.raises(UserError, match=r"thesis is not empty and was not written by this project.*--save_to"):
        with atomic_write_dir(out, "--save_to"):
            ran.append(True)
    assert not ran and sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert leftovers(tmp_path, {"thesis"}) == []


def test_atomic_write_dir_writes_into_an_empty_existing_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with atomic_write_dir(out) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MANIFEST, "a.txt"]


def test_atomic_write_dir_never_overwrites_a_foreign_file_in_its_own_folder(tmp_path):
    out = tmp_path / "out"
    with atomic_write_dir(out) as tmp:
        (tmp / "a.txt").write_text("ours")
    (out / "b.txt").write_text("the user's")
    with pytest.raises(UserError, match="already holds b.txt"):
        with atomic_write_dir(out) as tmp:
            (tmp / "a.txt").write_text("new")
            (tmp / "b.txt").write_text("clobber")
    assert (out / "a.txt").read_text() == "ours" and (out / "b.txt").read_text() == "the user's"


def test_atomic_write_dir_refuses_the_output_of_another_writer(tmp_path):
    out = tmp_path / "model"
    with atomic_write_dir(out, writer="scripts/train_vae.py") as tmp:
        (tmp / "weights.safetensors").write_text("trained for days")
    with pytest.raises(UserError, match="holds the output of scripts/train_vae.py"):
        with atomic_write_dir(out, writer="scripts/sample.py") as tmp:
            (tmp / "grid.png").write_text("x")
    assert (out / "weights.safetensors").read_text() == "trained for days"


def test_atomic_write_dir_manifest_cannot_claim_files_outside_its_folder(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    out = tmp_path / "out"
    with atomic_write_dir(out) as tmp:
        (tmp / "a.txt").write_text("ours")
    manifest = json.loads((out / OUTPUT_MANIFEST).read_text())
    manifest["files"] += ["../precious.txt", str(outside)]
    (out / OUTPUT_MANIFEST).write_text(json.dumps(manifest))
    with atomic_write_dir(out) as tmp:
        (tmp / "a.txt").write_text("new")
    assert outside.read_text() == "keep"


def test_atomic_write_dir_survives_a_killed_run_and_a_copied_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".diffusion-lab-staging-0123456789ab").mkdir()  # what a SIGKILL mid-write leaves: ours by its name
    with atomic_write_dir(out) as tmp:
        (tmp / "a.txt").write_text("new")
    copy = tmp_path / "copy"
    with atomic_write_dir(copy) as tmp:
        shutil.copytree(out, tmp, dirs_exist_ok=True)  # a writer that copies a whole earlier output
    with atomic_write_dir(copy) as tmp:
        shutil.copytree(out, tmp, dirs_exist_ok=True)
    assert json.loads((copy / OUTPUT_MANIFEST).read_text())["files"] == ["a.txt"]


def test_claim_output_dir_marks_a_new_folder_and_refuses_a_foreign_one(tmp_path):
    out = claim_output_dir(tmp_path / "demo", writer="scripts/demo.py")
    (out / "baseline").mkdir()  # written piece by piece afterwards
    assert claim_output_dir(out, writer="scripts/demo.py") == out  # a rerun is recognised
    with pytest.raises(UserError, match="holds the output of scripts/demo.py"):
        claim_output_dir(out, writer="scripts/sample.py")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "a.txt").write_text("x")
    with pytest.raises(UserError, match="--out"):
        claim_output_dir(theirs, "--out")
    assert sorted(p.name for p in theirs.iterdir()) == ["a.txt"]


def test_atomic_write_dir_refuses_a_file_path(tmp_path):
    target = tmp_path / "file"
    target.write_text("keep")
    with pytest.raises(UserError, match="is a file, not a folder"):
        with atomic_write_dir(target):
            pass
    assert target.read_text() == "keep"


def test_atomic_write_file_keeps_suffix_and_old_content_on_failure(tmp_path):
    target = tmp_path / "grid.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write_file(target) as tmp:
            assert tmp.suffix == ".png" and tmp.parent == tmp_path
            tmp.write_bytes(b"partial")
            raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path, {"grid.png"}) == []
    with atomic_write_file(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert leftovers(tmp_path, {"grid.png"}) == []


# ---------------------------------------------------------------------------------------------------------------
# safetensors and weights-only torch loads
# ---------------------------------------------------------------------------------------------------------------


def test_safetensors_round_trip_with_tied_tensors(tmp_path):
    weight = torch.randn(4, 3)
    tensors = {"a": weight, "tied": weight, "view": weight[1:], "ints": torch.arange(5)}
    path = save_safetensors(tensors, tmp_path / "w.safetensors", metadata={"format": "pt"})
    loaded = load_safetensors(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_load_safetensors_corrupt_file_is_user_error(tmp_path, damage):
    path = save_safetensors({"a": torch.randn(64, 64)}, tmp_path / "w.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file" * 8)
    with pytest.raises(UserError, match="not a readable safetensors file.*truncated or corrupt"):
        load_safetensors(path)


def test_missing_weights_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        safe_torch_load(tmp_path / "nope.pt")


def test_safe_torch_load_reads_a_plain_state_dict(tmp_path):
    state = {"layer.weight": torch.randn(3, 2), "step": 7, "names": ["a", "b"]}
    torch.save(state, tmp_path / "sd.pt")
    loaded = safe_torch_load(tmp_path / "sd.pt")
    assert torch.equal(loaded["layer.weight"], state["layer.weight"])
    assert loaded["step"] == 7 and loaded["names"] == ["a", "b"]


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_safe_torch_load_refuses_code_and_does_not_run_it(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": RunsCode(marker)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UserError) as info:
        safe_torch_load(path)
    message = str(info.value)
    assert message.startswith(f"{path} holds pickled Python objects, not plain weights: refusing to load it")
    assert "safetensors" in message and "\n" not in message
    assert not marker.exists()


def test_safe_torch_load_truncated_checkpoint_is_user_error(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"w": torch.randn(256)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match="truncated or corrupt"):
        safe_torch_load(path)


# ---------------------------------------------------------------------------------------------------------------
# TorchScript archives
# ---------------------------------------------------------------------------------------------------------------


class _Scriptable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 4)
        self.norm = torch.nn.LayerNorm(4).half()
        self.register_buffer("steps", torch.arange(6, dtype=torch.int64).view(2, 3).t())  # non-contiguous

    def forward(self, x):
        return self.norm(self.proj(x).half()).float() + self.steps.sum()


def _scripted_archive(path: Path) -> Path:
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(_Scriptable()), str(path))
    return path


def test_load_torchscript_weights_matches_jit_state_dict(tmp_path):
    path = _scripted_archive(tmp_path / "m.pt")
    ours = load_torchscript_weights(path)
    reference = torch.jit.load(str(path)).state_dict()
    assert set(ours) == set(reference) == {"steps", "proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype and ours[name].stride() == tensor.stride()
        assert torch.equal(ours[name], tensor)


def test_safe_torch_load_points_torchscript_to_the_jit_reader(tmp_path):
    path = _scripted_archive(tmp_path / "m.pt")
    with pytest.raises(UserError, match="is a TorchScript archive.*load_open_clip"):
        safe_torch_load(path)


def test_load_torchscript_weights_refuses_code_in_data_pkl(tmp_path):
    good = _scripted_archive(tmp_path / "m.pt")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(evil, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name.endswith("/data.pkl"):
                data = pickle.dumps(RunsCode(marker), protocol=2)
            target.writestr(name, data)
    with pytest.raises(UserError, match="holds pickled Python objects.*refusing to resolve the global (posix|os).system"):
        load_torchscript_weights(evil)
    assert not marker.exists()


def test_load_torchscript_weights_rejects_non_archives(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="not a TorchScript archive"):
        load_torchscript_weights(path)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a readable TorchScript archive"):
        load_torchscript_weights(tmp_path / "junk.pt")


# ---------------------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------------------


def test_to_pil_value_ranges_and_shapes():
    signed = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert np.asarray(to_pil(signed)).reshape(-1, 3)[:, 0].tolist() == [0, 128, 255, 255]
    unit = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 3)
    image = to_pil(unit, value_range=(0.0, 1.0))
    assert image.mode == "L" and np.asarray(image).tolist() == [[0, 128, 255]]
    rgba = to_pil(torch.full((4, 2, 2), 200, dtype=torch.uint8))
    assert rgba.mode == "RGBA" and np.asarray(rgba).max() == 200
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        to_pil(torch.zeros(2, 5, 5))


def test_image_grid_layout_and_atomic_save(tmp_path):
    colours = torch.linspace(-1, 1, 5)
    images = colours.view(5, 1, 1, 1).expand(5, 3, 8, 8)
    grid = save_image_grid(images, tmp_path / "grid.png", nrow=2, padding=2)
    assert grid.size == (2 * 10 + 2, 3 * 10 + 2)
    pixels = np.asarray(grid)
    assert pixels[0, 0].tolist() == [0, 0, 0]  # padding
    expected = ((colours + 1) / 2 * 255).round().int().tolist()
    for index, value in enumerate(expected):
        row, col = divmod(index, 2)
        assert pixels[2 + row * 10, 2 + col * 10, 0] == value
    assert np.array_equal(np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")), pixels)
    assert leftovers(tmp_path, {"grid.png"}) == []
    pil_grid = make_image_grid([to_pil(images[0]), images[1]], nrow=4, padding=0)
    assert pil_grid.size == (16, 8)
    with pytest.raises(UserError, match="unknown image suffix"):
        save_image_grid(images, tmp_path / "grid.nope")


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_load_image_rgb_converts_modes(tmp_path):
    gray = load_image_rgb(_save(Image.new("L", (3, 2), 77), tmp_path / "gray.png"))
    assert gray.mode == "RGB" and gray.size == (3, 2) and gray.getpixel((0, 0)) == (77, 77, 77)

    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    flat = load_image_rgb(_save(rgba, tmp_path / "rgba.png"))
    assert flat.getpixel((0, 0)) == (255, 255, 255) and flat.getpixel((1, 0)) == (10, 20, 30)
    assert load_image_rgb(tmp_path / "rgba.png", background=(0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)

    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    converted = load_image_rgb(_save(palette, tmp_path / "p.png"))
    assert converted.getpixel((0, 0)) == (255, 0, 0) and converted.getpixel((1, 0)) == (0, 0, 255)
    transparent = load_image_rgb(_save(palette, tmp_path / "pt.png", transparency=0))
    assert transparent.getpixel((0, 0)) == (255, 255, 255) and transparent.getpixel((1, 0)) == (0, 0, 255)

    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    deep = load_image_rgb(_save(sixteen, tmp_path / "deep.png"))
    assert [deep.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]

    cmyk = load_image_rgb(_save(Image.new("CMYK", (2, 2), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=100))
    red, green, blue = cmyk.getpixel((0, 0))
    assert cmyk.mode == "RGB" and red > 200 and green < 60 and blue < 60


def test_load_image_rgb_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (4, 2), (0, 200, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    loaded = load_image_rgb(_save(image, tmp_path / "rotated.jpg", exif=exif))
    assert loaded.size == (2, 4)


def test_load_image_rgb_bad_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_image_rgb(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(UserError, match="not an image PIL can read"):
        load_image_rgb(tmp_path / "text.png")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = _save(noise, tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.png is truncated or corrupt"):
        load_image_rgb(tmp_path / "cut.png")


def test_write_image_folder_is_an_imagefolder_written_all_or_nothing(tmp_path):
    import json

    from common.io import write_image_folder

    images = torch.rand(3, 3, 8, 8)
    rows = [{"text": f"caption {i}", "digit": i} for i in range(3)]
    folder = write_image_folder(tmp_path / "out", images, rows,
                                extra_files={"settings.json": lambda p: p.write_text("{}")})
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [line["file_name"] for line in lines] == [f"images/{i:04d}.png" for i in range(3)]
    assert lines[2]["text"] == "caption 2" and lines[2]["digit"] == 2
    saved = np.asarray(Image.open(folder / "images/0001.png"), dtype=np.float64) / 255
    assert np.abs(saved - images[1].permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6
    assert (folder / "grid.png").is_file() and (folder / "settings.json").read_text() == "{}"

    def broken(path):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_image_folder(tmp_path / "half", images, rows, extra_files={"x.json": broken})
    assert not (tmp_path / "half").exists()
    with pytest.raises(ValueError, match="3 images but 2 metadata rows"):
        write_image_folder(tmp_path / "bad", images, rows[:2])


def test_a_full_disk_while_writing_an_output_folder_is_one_line_and_leaves_nothing(tmp_path):
    import errno

    out = tmp_path / "samples"
    with pytest.raises(UserError, match=r"cannot write the output folder .*samples.*No space left on device"):
        with atomic_write_dir(out) as tmp:
            (tmp / "0000.png").write_bytes(b"x" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no staging folder left behind
