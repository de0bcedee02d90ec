"""What a hostile (or unlucky) user tries: every probe must end in one clear line and a non-zero exit, or be handled
without loss. Output folders the project did not write are never emptied or overwritten; re-running a script
replaces only its own files; numbers, seeds, sizes, image headers, metadata paths and web uploads are bounded."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

from common.errors import UserError
from common.io import OUTPUT_MANIFEST, load_image_rgb, write_image_folder


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from script_loading import load_script  # noqa: E402


SAMPLE = REPO / "scripts" / "sample.py"
TINY = ["--num_inference_steps", "2", "--no_progress", "--prompt", "a red handwritten seven"]


@pytest.fixture(scope="module")
def sample():
    return load_script("scripts/sample.py")


def run_sample(sample, capsys, argv) -> tuple[int, list[str]]:
    """``scripts/sample.py`` in-process: (exit code, non-empty stderr lines)."""
    try:
        code = sample.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]
    return code, lines


def one_error_line(code, lines, *needles):
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------------------------
# Output folders are never emptied
# ---------------------------------------------------------------------------------------------------------------


def foreign_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("three years of work")
    (path / "results").mkdir()
    (path / "results" / "table.csv").write_text("a,b\n1,2\n")
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sample_refuses_a_folder_it_did_not_write_and_changes_nothing(sample, capsys, tmp_path):
    out = foreign_folder(tmp_path / "mine")
    before = snapshot(out)
    code, lines = run_sample(sample, capsys, [*TINY, "--output_dir", str(out)])
    one_error_line(code, lines, str(out), "--output_dir", "not written by this project")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging folder left beside it


def test_sample_output_dir_dot_with_foreign_files_is_refused(tmp_path):
    """`--output_dir .` in a folder holding the user's files: exit 2, one line, nothing deleted or added."""
    cwd = foreign_folder(tmp_path / "home")
    before = snapshot(cwd)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SAMPLE), *TINY, "--output_dir", "."], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "--output_dir" in lines[0], proc.stderr
    assert snapshot(cwd) == before and sorted(os.listdir(cwd)) == ["results", "thesis.tex"]


def test_sample_rerun_replaces_only_its_own_files(sample, capsys, tmp_path):
    out = tmp_path / "samples"
    code, _ = run_sample(sample, capsys, [*TINY, "--num_images", "3", "--seed", "1", "--output_dir", str(out)])
    assert code == 0
    first = snapshot(out)
    assert {"images/0000.png", "images/0001.png", "images/0002.png", "grid.png"} <= set(first)
    (out / "notes.txt").write_text("the user's notes")  # written by the user next to the samples
    (out / "images" / "favourite.png").write_bytes(first["images/0001.png"])
    code, _ = run_sample(sample, capsys, [*TINY, "--num_images", "2", "--seed", "2", "--output_dir", str(out)])
    assert code == 0
    second = snapshot(out)
    assert second["notes.txt"] == b"the user's notes" and second["images/favourite.png"] == first["images/0001.png"]
    assert "images/0002.png" not in second  # the earlier run's own extra image is gone
    assert second["images/0000.png"] != first["images/0000.png"]  # seed 2 replaced seed 1
    assert json.loads(second["settings.json"])["seed"] == 2
    manifest = json.loads(second[OUTPUT_MANIFEST])
    assert manifest["writer"] == "scripts/sample.py" and "notes.txt" not in manifest["files"]
    assert [p.name for p in tmp_path.iterdir()] == ["samples"] and not list(out.glob(".diffusion-lab-staging*"))


def test_rerun_never_overwrites_a_user_file_of_the_same_name(sample, capsys, tmp_path):
    """A file the project does not own, at a name the run writes, is never overwritten: the run is refused."""
    out = tmp_path / "samples"
    assert run_sample(sample, capsys, [*TINY, "--output_dir", str(out)])[0] == 0
    manifest = json.loads((out / OUTPUT_MANIFEST).read_text())
    manifest["files"].remove("settings.json")  # settings.json is now a file the project does not own
    (out / OUTPUT_MANIFEST).write_text(json.dumps(manifest))
    (out / "settings.json").write_text("the user's own settings")
    code, lines = run_sample(sample, capsys, [*TINY, "--seed", "3", "--output_dir", str(out)])
    one_error_line(code, lines, "settings.json", "--output_dir")
    assert (out / "settings.json").read_text() == "the user's own settings"


def test_output_of_another_script_is_not_replaced(sample, capsys, tmp_path):
    """An imagefolder written by another writer (here the judge's results helper) is not sample.py's to replace."""
    import torch

    out = tmp_path / "results"
    write_image_folder(out, torch.zeros(1, 3, 8, 8), [{"text": "x"}], writer="scripts/evaluate.py")
    before = snapshot(out)
    code, lines = run_sample(sample, capsys, [*TINY, "--output_dir", str(out)])
    one_error_line(code, lines, "scripts/evaluate.py", "--output_dir")
    assert snapshot(out) == before


def test_digits_builder_and_library_writers_refuse_foreign_folders(tmp_path):
    from common.digits import build_digits
    from common.tiny import make_tiny_sd_folder

    data = foreign_folder(tmp_path / "data")
    before = snapshot(data)
    with pytest.raises(UserError, match="digits"):
        build_digits(data)
    model = foreign_folder(tmp_path / "model")
    with pytest.raises(UserError, match="not written by this project"):
        make_tiny_sd_folder(model)
    assert snapshot(data) == before and snapshot(model)["thesis.tex"] == b"three years of work"


def test_overwrite_replaces_only_the_projects_own_files(tmp_path, capsys):
    """versatile/convert.py --overwrite: refused in a folder of the user's; in its own earlier output it replaces
    its files and keeps a file the user added there."""
    import torch

    from versatile.convert import export_state_dict
    from versatile.tiny import tiny_diffuser

    convert = load_script("scripts/versatile/convert.py")
    torch.save(export_state_dict(tiny_diffuser(seed=3, zero_init=False), "vd-r1"), tmp_path / "vd.pth")

    def run(dst):
        return run_sample(convert, capsys, ["--from", "vd-r1", "--src", str(tmp_path / "vd.pth"), "--dst", str(dst),
                                            "--model_config", "tiny", "--overwrite"])

    theirs = foreign_folder(tmp_path / "theirs")
    before = snapshot(theirs)
    code, lines = run(theirs)
    one_error_line(code, lines, str(theirs), "not written by this project")
    assert snapshot(theirs) == before
    ours = tmp_path / "ours"
    assert run(ours)[0] == 0
    (ours / "README.txt").write_text("my notes on this conversion")
    first = snapshot(ours)
    assert run(ours)[0] == 0
    second = snapshot(ours)
    assert second["README.txt"] == b"my notes on this conversion" and set(second) == set(first)


# ---------------------------------------------------------------------------------------------------------------
# Bounded inputs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,needles", [
    (["--guidance_scale", "nan"], ["--guidance_scale", "finite"]),
    (["--guidance_scale", "inf"], ["--guidance_scale", "finite"]),
    (["--eta", "nan"], ["--eta"]),
    (["--eta", "1.5"], ["--eta must lie in [0, 1], got 1.5"]),
    (["--num_images", "0"], ["--num_images", "got 0"]),
    (["--seed", str(2**64)], ["--seed", "2**63-1"]),
    (["--seed", "-1"], ["--seed"]),
    (["--num_inference_steps", "100000"], ["--num_inference_steps"]),
    (["--resolution", "100000"], ["estimated", "GB", "limit", "--max_memory_gb"]),
    (["--resolution", "512", "--num_images", "4", "--max_memory_gb", "0.05"], ["estimated", "most frugal",
                                                                                "0.05 GB limit"]),
    (["--method", "sdg", "--text_weight", "inf"], ["--text_weight", "finite"]),
])
def test_sample_refuses_unbounded_settings_with_one_line(sample, capsys, tmp_path, extra, needles):
    out = tmp_path / "never"
    code, lines = run_sample(sample, capsys, [*TINY, *extra, "--output_dir", str(out)])
    one_error_line(code, lines, *needles)
    assert not out.exists()


@pytest.mark.parametrize("script,argv,needle", [
    ("scripts/versatile/sample.py", ["--prompt", "a seven", "--guidance_scale", "inf"], "--guidance_scale"),
    ("scripts/versatile/sample.py", ["--prompt", "a seven", "--seed", str(2**63)], "--seed"),
    ("scripts/codiff/generate.py", ["--input_text", "a seven", "--guidance_scale", "nan"], "--guidance_scale"),
    ("scripts/codiff/generate.py", ["--input_text", "a seven", "--batch_size", "64", "--max_memory_gb", "0.001"],
     "--batch_size need an estimated"),
    ("scripts/sdg/sample.py", ["--text_weight=-inf"], "--text_weight"),
    ("scripts/contextdiff/edit_video.py", ["--video", "embedded", "--target_prompt", "x", "--guidance_scale", "nan"], "--guidance_scale"),
])
def test_method_scripts_refuse_unbounded_settings(tmp_path, capsys, script, argv, needle):
    out = tmp_path / "never"
    flag = {"scripts/codiff/generate.py": "--save_folder", "scripts/sdg/sample.py": "--out_root"}.get(script,
                                                                                                       "--output_dir")
    code, lines = run_sample(load_script(script), capsys, [*argv, flag, str(out)])
    one_error_line(code, lines, needle)
    assert not out.exists()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width x height`` grayscale pixels (a decompression bomb's shape):
    the few stored rows are valid, the rest are missing, so only a header-first check can refuse it cheaply."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [11000, 20000])  # above our limit; above PIL's own bomb limit
def test_huge_declared_image_is_refused_before_decoding(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(side, side))
    assert path.stat().st_size < 100_000
    start = time.perf_counter()
    with pytest.raises(UserError, match="bomb.png") as err:
        load_image_rgb(path)
    assert time.perf_counter() - start < 2.0  # refused from the header: nothing is decoded
    assert "\n" not in str(err.value) and ("declares" in str(err.value) or "too large" in str(err.value))


@pytest.mark.parametrize("side", [11000, 20000])
def test_huge_declared_upload_is_refused_on_the_page(side):
    app_module = load_script("scripts/app.py")
    with pytest.raises(UserError, match="pixels"):
        app_module.check_upload("bomb.png", png_declaring(side, side), 2**20)


def test_dataset_with_a_huge_image_is_a_user_error(tmp_path):
    from common.data import image_text_dataset

    (tmp_path / "bomb.png").write_bytes(png_declaring(11000, 11000))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "bomb.png", "text": "x"}) + "\n")
    with pytest.raises(UserError, match="11000x11000"):
        image_text_dataset(tmp_path, resolution=32)


@pytest.mark.parametrize("column", ["file_name", "mask_file_name"])
@pytest.mark.parametrize("escape", ["../../secret.png", "/etc/passwd", "images/../../secret.png"])
def test_metadata_paths_must_stay_inside_the_data_folder(tmp_path, escape, column):
    from PIL import Image

    from common.data import image_text_dataset

    data = tmp_path / "a" / "b" / "data"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "images" / "ok.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    row = {"file_name": "images/ok.png", "text": "x", "mask_file_name": "images/ok.png"}
    row[column] = escape
    (data / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError, match=f"{column} .*points outside the data folder"):
        image_text_dataset(data, resolution=8, num_mask_classes=2)


def test_metadata_path_inside_the_folder_still_loads(tmp_path):
    from PIL import Image

    from common.data import image_text_dataset

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "ok.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "images/./ok.png", "text": "x"}) + "\n")
    assert len(image_text_dataset(tmp_path, resolution=8)) == 1


# ---------------------------------------------------------------------------------------------------------------
# Web page uploads are bounded while streaming
# ---------------------------------------------------------------------------------------------------------------


def test_upload_limit_stops_reading_a_chunked_body_at_the_limit():
    """In-process: the page never sees an over-long body, and the guard stops reading soon after the limit."""
    app_module = load_script("scripts/app.py")
    seen = []

    async def page(scope, receive, send):
        seen.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def run(total_chunks: int, chunk: int = 64 * 1024):
        sent, replies = [0], []

        async def receive():
            sent[0] += 1
            return {"type": "http.request", "body": b"x" * chunk, "more_body": sent[0] < total_chunks}

        async def send(message):
            replies.append(message)

        guard = app_module.UploadLimit(page, max_bytes=2**20, drain_bytes=0)
        asyncio.run(guard({"type": "http", "method": "POST", "path": "/_nicegui/client/c/upload/1", "headers": []},
                          receive, send))
        return sent[0], replies[0]["status"]

    chunks_read, status = run(10_000)  # 625 MB offered without a Content-Length
    assert status == 413 and not seen and chunks_read <= (2**20 + 64 * 1024) // (64 * 1024) + 1
    chunks_read, status = run(4)  # 256 KB: passes through whole
    assert status == 200 and len(seen[0]["body"]) == 4 * 64 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_running_app_refuses_a_chunked_upload_over_the_limit(tmp_path):
    """Against `scripts/app.py` itself: a chunked POST without Content-Length (6 MB against a 1 MB limit) gets 413."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "app.py"), "--port", str(port),
                             "--max_upload_mb", "1", "--work_dir", str(tmp_path / "work")],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            assert time.time() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(f"POST /_nicegui/client/x/upload/1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                         "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
            piece = b"x" * 65536
            try:
                for _ in range(96):  # 6 MB
                    conn.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
                conn.sendall(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may stop listening once it has refused: the reply is what counts
            reply = b""
            try:
                while b"\r\n\r\n" not in reply:
                    data = conn.recv(4096)
                    if not data:
                        break
                    reply += data
            except ConnectionResetError:
                pass
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200  # and the page keeps answering
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
