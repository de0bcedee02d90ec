"""ContextDiff video editing: inflation, sparse-causal + temporal attention, the video adapter, the
contextualized inversion / sampling, one-shot tuning, video I/O, the embedded clip and the script."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from script_loading import load_script  # noqa: E402

from common.errors import UserError
from common.schedule import NoiseSchedule
from common.tiny import clip_tokenizer, sd_ddim_scheduler, tiny_clip_text, tiny_unet2d_condition
from common.video_clip import digit_clip, edit_caption
from common.video_io import read_video, resize_clip, write_frame_folder, write_gif, write_mp4
from contextdiff.adapter import tiny_adapter
from contextdiff.video import (
    TemporalAttention,
    VideoRelationalNet,
    VideoUNet,
    activation_bytes_per_frame,
    check_frame_budget,
    invert_video,
    max_frames_for_memory,
    sample_video,
    sparse_causal_index,
    structure_scores,
    tune_on_video,
)


REPO = Path(__file__).resolve().parent.parent
SCHED_CONFIG = dict(sd_ddim_scheduler().config)
SCHED = NoiseSchedule.from_config(SCHED_CONFIG)
F = 4


def _video(seed: int, frames: int = F, b: int = 1) -> torch.Tensor:
    return torch.randn(b, 4, frames, 8, 8, generator=torch.Generator().manual_seed(seed))


def _text(seed: int = 1, b: int = 1) -> torch.Tensor:
    return torch.randn(b, 77, 32, generator=torch.Generator().manual_seed(seed))


def _per_frame(unet, x, t, text):
    """The image UNet on every frame separately: ``[B, C, F, h, w]``."""
    outs = [unet(x[:, :, i], t, encoder_hidden_states=text, return_dict=False)[0] for i in range(x.shape[2])]
    return torch.stack(outs, dim=2)


def _randomise(module: torch.nn.Module, seed: int = 3, std: float = 0.2) -> None:
    """Give zero-initialised temporal output projections non-zero weights (a 'trained' temporal layer)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            if isinstance(m, TemporalAttention):
                torch.nn.init.normal_(m.attn.to_out.weight, std=std)
                torch.nn.init.normal_(m.attn.to_out.bias, std=std)


# ------------------------------------------------------------------------------------------------ inflation


@torch.no_grad()
def test_inflated_unet_with_zero_temporal_layers_is_the_image_model_per_frame():
    image = tiny_unet2d_condition(0)
    video = VideoUNet(tiny_unet2d_condition(0), sparse_causal=False, temporal=True)
    assert len(video.temporal) == 4  # one per transformer block of the tiny UNet (down, mid, 2x up)
    x, text, t = _video(0, b=2), _text(b=2), torch.tensor([10, 700])
    out = video(x, t, encoder_hidden_states=text, return_dict=False)[0]
    assert out.shape == x.shape
    # the same folded batch through the plain image model: bit for bit
    folded = x.permute(0, 2, 1, 3, 4).reshape(2 * F, 4, 8, 8)
    plain = image(folded, t.repeat_interleave(F), encoder_hidden_states=text.repeat_interleave(F, 0),
                  return_dict=False)[0]
    assert torch.equal(out, plain.reshape(2, F, 4, 8, 8).permute(0, 2, 1, 3, 4))
    # and frame by frame (batch size differs: float rounding only)
    torch.testing.assert_close(out, _per_frame(image, x, t, text), rtol=0, atol=1e-5)
    # a non-zero temporal layer changes the output
    _randomise(video)
    assert not torch.allclose(video(x, t, encoder_hidden_states=text, return_dict=False)[0], out, atol=1e-4)


@torch.no_grad()
def test_sparse_causal_attention_first_frame_still_clip_and_causality():
    image = tiny_unet2d_condition(0)
    video = VideoUNet(tiny_unet2d_condition(0), sparse_causal=True, temporal=True)
    x, text, t = _video(0), _text(), torch.tensor([400])
    out = video(x, t, encoder_hidden_states=text, return_dict=False)[0]
    per_frame = _per_frame(image, x, t, text)
    # frame 0 attends to itself (twice): the image model
    torch.testing.assert_close(out[:, :, 0], per_frame[:, :, 0], rtol=0, atol=1e-5)
    # later frames attend to frames 0 and i-1, so they differ from per-frame self-attention
    assert (out[:, :, 1:] - per_frame[:, :, 1:]).abs().max() > 1e-3
    # a still clip: every frame attends to copies of itself -> the image model on every frame
    still = x[:, :, :1].expand(-1, -1, F, -1, -1).contiguous()
    torch.testing.assert_close(video(still, t, encoder_hidden_states=text, return_dict=False)[0],
                               _per_frame(image, still, t, text), rtol=0, atol=1e-5)
    # causal (temporal layers at zero): changing the last frame leaves the earlier frames alone
    changed = x.clone()
    changed[:, :, -1] += 1.0
    out2 = video(changed, t, encoder_hidden_states=text, return_dict=False)[0]
    assert torch.equal(out2[:, :, :-1], out[:, :, :-1])
    assert not torch.allclose(out2[:, :, -1], out[:, :, -1])
    # the temporal attention mixes all frames: with it trained, frame 0 sees the last frame
    _randomise(video)
    a = video(x, t, encoder_hidden_states=text, return_dict=False)[0]
    b = video(changed, t, encoder_hidden_states=text, return_dict=False)[0]
    assert (a[:, :, 0] - b[:, :, 0]).abs().max() > 1e-5
    # outside a video forward the wrapped UNet is still the image model (no frame state, no temporal term)
    torch.testing.assert_close(video.unet(x[:, :, 2], t, encoder_hidden_states=text, return_dict=False)[0],
                               per_frame[:, :, 2], rtol=0, atol=1e-5)


def test_sparse_causal_index():
    first, previous = sparse_causal_index(5)
    assert first.tolist() == [0] * 5 and previous.tolist() == [0, 0, 1, 2, 3]


def test_set_trainable_is_tune_a_video_set():
    video = VideoUNet(tiny_unet2d_condition(0))
    names = video.set_trainable()
    assert names and all(".temporal." in n or n.startswith("temporal.") or ".to_q." in n for n in names)
    assert any(n.startswith("temporal.") for n in names) and any("attn2.to_q" in n for n in names)
    spatial = [n for n in names if not n.startswith("temporal.")]
    assert spatial and all(n.endswith(("to_q.weight", "to_q.bias")) for n in spatial)


# ---------------------------------------------------------------------------------------------------- adapter


@torch.no_grad()
def test_video_adapter_is_per_frame_at_init_and_depends_on_frames_and_text():
    image = tiny_adapter(seed=0, head_std=0.05)
    video = VideoRelationalNet(tiny_adapter(seed=0, head_std=0.05))
    x, text = _video(5), _text()
    r = video(x, text)
    assert r.shape == x.shape
    per_frame = torch.stack([image(x[:, :, i], text) for i in range(F)], dim=2)
    torch.testing.assert_close(r, per_frame, rtol=0, atol=1e-6)
    assert (r[:, :, 0] - r[:, :, 1]).abs().max() > 1e-4  # frames differ -> their biases differ
    assert (video(x, _text(seed=9)) - r).abs().max() > 1e-4  # the text matters
    changed = x.clone()
    changed[:, :, 3] += 1.0
    r2 = video(changed, text)
    assert (r2[:, :, 3] - r[:, :, 3]).abs().max() > 1e-4
    torch.testing.assert_close(r2[:, :, :3], r[:, :, :3], rtol=0, atol=0)  # no temporal mixing yet
    _randomise(video)
    r3, r4 = video(x, text), video(changed, text)
    assert (r3[:, :, 0] - r4[:, :, 0]).abs().max() > 1e-5  # with the temporal layer, frame 0 sees frame 3


# -------------------------------------------------------------------------------------- inversion and sampling


@pytest.fixture(scope="module")
def text_parts():
    return tiny_clip_text(2), clip_tokenizer()


def _video_parts(shift_std: float = 0.1):
    """A video UNet and adapter with trained-looking (non-zero) temporal layers and a non-zero adapter head; the
    UNet's output is calmed (x0.1) so that fixed-point iterations solve the implicit inversion step."""
    unet = VideoUNet(tiny_unet2d_condition(0))
    with torch.no_grad():
        unet.unet.conv_out.weight.mul_(0.1)
        unet.unet.conv_out.bias.mul_(0.1)
    _randomise(unet, std=0.05)
    adapter = VideoRelationalNet(tiny_adapter(seed=1, head_std=shift_std))
    _randomise(adapter, std=0.05)
    return unet, adapter


def _round_trip(unet, adapter, te, tok, x0, *, shift_invert=True, shift_sample=True, steps=10, iters=5):
    common = dict(steps=steps, scheduler_config=SCHED_CONFIG, parameterization="shifted_eps")
    x_T = invert_video(unet, adapter, te, tok, "a red handwritten seven", x0, shift=shift_invert,
                       fixed_point_iters=iters, **common)
    back = sample_video(unet, adapter, te, tok, "a red handwritten seven", x_T, guidance_scale=1.0,
                        shift=shift_sample, **common)
    return x_T, back


class _CountingAdapter(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    @property
    def config(self):
        return self.inner.config

    def check_compatible(self, *args, **kwargs):
        self.inner.check_compatible(*args, **kwargs)

    def forward(self, x0, text, text_masks=None):
        self.calls += 1
        assert x0.ndim == 5  # r_hat is computed on the video-shaped x0_hat
        return self.inner(x0, text, text_masks)


def test_inversion_then_reconstruction_returns_the_source(text_parts):
    te, tok = text_parts
    unet, adapter = _video_parts()
    x0 = _video(7) * 0.8
    x_T, back = _round_trip(unet, adapter, te, tok, x0)
    assert (x_T - x0).abs().mean() > 0.3  # it really went to noise
    err = (back - x0).abs().max().item()
    assert err < 2e-2, err
    # the shift must be the same in inversion and sampling: using it only in one of them breaks the round trip
    _, mismatched = _round_trip(unet, adapter, te, tok, x0, shift_sample=False)
    assert (mismatched - x0).abs().max().item() > 10 * err


def test_shift_is_used_in_inversion_and_sampling(text_parts):
    te, tok = text_parts
    unet, inner = _video_parts()
    adapter = _CountingAdapter(inner)
    x0 = _video(8) * 0.8
    common = dict(steps=5, scheduler_config=SCHED_CONFIG, parameterization="shifted_eps")
    x_T = invert_video(unet, adapter, te, tok, "a red seven", x0, fixed_point_iters=2, **common)
    assert adapter.calls == 5 * 3  # r_hat in every inversion step and every fixed-point refinement
    adapter.calls = 0
    edited = sample_video(unet, adapter, te, tok, "a blue seven", x_T, guidance_scale=3.0, **common)
    assert adapter.calls == 5  # once per step, on the guided x0_hat
    adapter.calls = 0
    x_T_plain = invert_video(unet, adapter, te, tok, "a red seven", x0, fixed_point_iters=2, shift=False, **common)
    plain = sample_video(unet, adapter, te, tok, "a blue seven", x_T_plain, guidance_scale=3.0, shift=False, **common)
    assert adapter.calls == 0
    assert (x_T - x_T_plain).abs().max() > 1e-3 and (edited - plain).abs().max() > 1e-3


def test_tuning_trains_temporal_query_and_adapter_only():
    unet, adapter = _video_parts()
    before_u = {k: v.clone() for k, v in unet.state_dict().items()}
    before_a = {k: v.clone() for k, v in adapter.state_dict().items()}
    x0, text = _video(9) * 0.8, _text()
    losses = tune_on_video(unet, adapter, x0, text, SCHED, train_steps=2, learning_rate=1e-2, progress=False)
    assert len(losses) == 2 and all(np.isfinite(losses))
    changed = {k for k, v in unet.state_dict().items() if not torch.equal(v, before_u[k])}
    assert changed and all(k.startswith("temporal.") or ".to_q." in k for k in changed)
    assert any(k.startswith("temporal.") for k in changed) and any(".to_q." in k for k in changed)
    assert any(not torch.equal(v, before_a[k]) for k, v in adapter.state_dict().items())
    assert not any(p.requires_grad for p in unet.parameters())
    # the equal-budget ablation (k = 0): same UNet parameters trained, adapter untouched
    before_a = {k: v.clone() for k, v in adapter.state_dict().items()}
    tune_on_video(unet, adapter, x0, text, SCHED, train_steps=2, learning_rate=1e-2, shift=False, progress=False)
    assert all(torch.equal(v, before_a[k]) for k, v in adapter.state_dict().items())


def test_frame_memory_limit():
    unet, adapter = _video_parts()
    unet.requires_grad_(False)
    unet.temporal.requires_grad_(True)
    per_frame = activation_bytes_per_frame(unet, adapter, (8, 8), _text())
    assert 10_000 < per_frame < 200 * 2**20
    assert [n for n, p in unet.named_parameters() if p.requires_grad] == [
        n for n, _ in unet.named_parameters() if n.startswith("temporal.")]  # requires_grad flags restored
    assert max_frames_for_memory(per_frame, 10 * per_frame) == 5
    with pytest.raises(UserError, match="12 frames exceed the limit of 5 frames"):
        check_frame_budget(12, 5)


def test_structure_scores():
    clip = digit_clip(3, "green", 4)
    same = structure_scores(clip.frames, clip.frames)
    assert same["stroke_iou"] == 1.0 and same["brightness_corr"] > 0.999
    other = structure_scores(clip.frames, digit_clip(0, "green", 4).frames)
    assert other["stroke_iou"] < 0.7


# ------------------------------------------------------------------------------------------- clip and video I/O


def test_embedded_clip_moves_and_is_judged():
    from common.judge import judge_images

    clip = digit_clip(7, "red", 8)
    assert clip.frames.shape == (8, 32, 32, 3) and clip.frames.dtype == np.uint8
    assert clip.caption == "a red handwritten seven" and edit_caption(clip, color="blue") == "a blue handwritten seven"
    assert not np.array_equal(clip.frames[0], clip.frames[-1])  # it moves
    assert clip.frames[..., 1:].max() == 0  # red on black, like the digits dataset
    scores = judge_images(list(clip.frames), [(7, "red")] * 8)
    assert scores["digit_accuracy"] == 1.0 and scores["color_accuracy"] == 1.0


def test_video_io_round_trips(tmp_path):
    frames = digit_clip(2, "cyan", 5).frames
    write_gif(frames, tmp_path / "a.gif")
    np.testing.assert_array_equal(read_video(tmp_path / "a.gif"), frames)  # few colours: lossless palette
    (tmp_path / "folder").mkdir()
    write_frame_folder(frames, tmp_path / "folder")
    np.testing.assert_array_equal(read_video(tmp_path / "folder", 3, start=1), frames[1:4])
    pytest.importorskip("av")
    write_mp4(frames, tmp_path / "a.mp4")
    decoded = read_video(tmp_path / "a.mp4")
    assert decoded.shape == frames.shape and np.abs(decoded.astype(float) - frames).mean() < 6
    assert resize_clip(np.zeros((2, 40, 60, 3), np.uint8), 32).shape == (2, 32, 32, 3)


def _bad_inputs(tmp_path: Path) -> dict:
    bad = {}
    (tmp_path / "garbage.gif").write_bytes(b"this is not a gif")
    bad["unreadable gif"] = (tmp_path / "garbage.gif", "not a video or image file")
    (tmp_path / "garbage.mp4").write_bytes(b"\x00\x01 not an mp4 at all" * 10)
    bad["unreadable mp4"] = (tmp_path / "garbage.mp4", "PyAV|FFmpeg can read")
    (tmp_path / "empty").mkdir()
    bad["zero frames"] = (tmp_path / "empty", "has no image files")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (32, 32)).save(mixed / "00000.png")
    Image.new("RGB", (40, 32)).save(mixed / "00001.png")
    bad["mixed sizes"] = (mixed, "differ in size")
    bad["missing"] = (tmp_path / "nope.gif", "does not exist")
    return bad


def test_read_video_bad_inputs(tmp_path):
    for path, message in _bad_inputs(tmp_path).values():
        with pytest.raises(UserError, match=message):
            read_video(path)
    write_gif(digit_clip(1, "red", 3).frames, tmp_path / "short.gif")
    with pytest.raises(UserError, match="only 3 frames.*--n_frames 3"):
        read_video(tmp_path / "short.gif", 8)


# ------------------------------------------------------------------------------------------------------- script


def _script():
    return load_script("scripts/contextdiff/edit_video.py")


def test_edit_video_script_smoke(tmp_path):
    source = tmp_path / "clip.gif"
    write_gif(digit_clip(7, "red", 4).frames, source)
    out = tmp_path / "out"
    code = _script().main(["--video", str(source), "--source_prompt", "a red handwritten seven",
                           "--target_prompt", "a blue handwritten seven", "--n_frames", "3", "--num_inference_steps", "3",
                           "--train_steps", "2", "--output_dir", str(out), "--device", "cpu"])
    assert code == 0
    for name in ("edited.gif", "source.gif", "strip.png", "settings.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "frames").iterdir())) == 3
    assert read_video(out / "edited.gif").shape == (3, 32, 32, 3)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["shift"] == "all" and settings["frame_limit"] >= 3
    assert {"frame_consistency", "stroke_iou", "color_accuracy"} <= set(settings["scores"])
    assert Image.open(out / "strip.png").size == (3 * 34 + 2, 2 * 34 + 2)


def test_edit_video_script_bad_inputs_write_nothing(tmp_path, capsys):
    bad = _bad_inputs(tmp_path)
    cases = {name: ["--video", str(path)] for name, (path, _) in bad.items()}
    messages = {name: message for name, (_, message) in bad.items()}
    cases["too many frames"] = ["--video", "embedded", "--max_frames", "4"]
    messages["too many frames"] = "8 frames exceed the limit of 4 frames set by --max_frames: pass --n_frames 4"
    for name, argv in cases.items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        with pytest.raises(SystemExit) as exc:
            _script().main(argv + ["--source_prompt", "a red seven", "--target_prompt", "a blue seven",
                                   "--train_steps", "1", "--num_inference_steps", "2", "--output_dir", str(out)])
        assert exc.value.code == 2, name
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(err) == 1, (name, err)  # one line (model-loading progress bars may precede it)
        assert re.search(messages[name], err[0]), (name, err[0])
        assert not out.exists(), name
