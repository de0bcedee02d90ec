"""``--compile`` (common/compile.py): compiled sampling and training agree with eager, compile once per shape, and
fall back to eager with one line where compilation is unavailable.

Compiling with inductor on a 2-core CPU costs minutes for a UNet, so the equality tests trace with ``aot_eager``
(dynamo + AOT autograd, the graphs inductor would receive, run by eager kernels) through a backend that also
counts graphs; one test compiles a small conv net with inductor for real.
"""

from __future__ import annotations

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from torch import nn

from common import compile as compile_mod
from common.compile import CompileAfterFirstCall, CompileOptions, compile_module, compiling, is_compiled


class CountingBackend:
    """A torch.compile backend: ``aot_eager``, counting the graphs it is given and their input shapes."""

    def __init__(self):
        from torch._dynamo import lookup_backend

        self.inner = lookup_backend("aot_eager")
        self.graphs = 0
        self.input_shapes: list[list[tuple]] = []

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        self.input_shapes.append([tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)])
        return self.inner(gm, example_inputs)


@pytest.fixture(autouse=True)
def fresh_compile_state():
    torch._dynamo.reset()
    compile_mod._warned.clear()
    yield
    torch._dynamo.reset()
    compile_mod._warned.clear()
    compile_mod._probed.clear()


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))


def test_sampling_compiled_matches_eager_with_one_graph_and_no_recompiles():
    from common import methods

    spec = methods.get("baseline")
    pipe = spec.load(str(spec.checkpoint_path()))
    settings = spec.settings(prompts=["a red handwritten seven", "a blue two"], num_inference_steps=5, seed=0)
    eager = pipe(settings).images
    backend = CountingBackend()
    graphs_after_step = []
    with compiling(CompileOptions(backend=backend)):
        first = pipe(settings, callback=lambda stage, done, total: graphs_after_step.append(backend.graphs)).images
        second = pipe(settings).images
    assert is_compiled(pipe.pipe.unet)
    # step 1 runs eagerly and finds the UNet, step 2 compiles it, steps 3..5 and the whole second run reuse the graph
    assert graphs_after_step == [0, 0, 1, 1, 1, 1]
    assert backend.graphs == 1
    # classifier-free guidance is one forward of the doubled batch: the graph's latent input has batch 2 x 2
    assert any(len(s) == 4 and s[0] == 4 and s[1] == pipe.pipe.unet.config.in_channels
               for s in backend.input_shapes[0])
    torch.testing.assert_close(first, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, eager, atol=1e-5, rtol=1e-5)


def test_training_step_compiled_matches_eager_without_recompiles(tmp_path, monkeypatch):
    from common.tiny import tiny_unet2d_condition
    from common.train import TrainConfig, Trainer

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(12, 4, 8, 8, generator=g), torch.randn(12, 77, 32, generator=g))
    backend = CountingBackend()
    monkeypatch.setattr(compile_mod, "default_options", lambda **changes: CompileOptions(backend=backend, **changes))
    graphs_at_step = []

    def loss_fn(batch, ctx):
        graphs_at_step.append(backend.graphs)
        latents, text = batch
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],))
        pred = ctx.models["unet"](latents + noise, t, encoder_hidden_states=text).sample
        return nn.functional.mse_loss(pred, noise)

    def train(compiled: bool) -> list[torch.Tensor]:
        config = TrainConfig(output_dir=str(tmp_path / f"run{int(compiled)}"), seed=0, train_batch_size=3,
                             max_train_steps=4, lr_warmup_steps=0, checkpointing_steps=10**6,
                             validation_steps=10**6, report_to="none", compile=compiled)
        with Trainer(config) as trainer:
            unet = tiny_unet2d_condition(seed=0)
            result = trainer.fit({"unet": unet}, loss_fn, data)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        assert is_compiled(unet) == compiled
        return [p.detach().clone() for p in result.models["unet"].parameters()]

    eager = train(False)
    graphs_at_step.clear()
    compiled = train(True)
    assert graphs_at_step == [0, 0, 1, 1]  # step 1 eager (finds the UNet), step 2 compiles, then no recompiles
    assert backend.graphs == 1
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    initial = [p.detach() for p in tiny_unet2d_condition(0).parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(eager, initial))  # the steps did change the weights


def test_inductor_compiles_a_conv_net_to_the_eager_result(capsys):
    """What ``scripts/sample.py --compile`` does: inductor, weights frozen into the graph, run without gradients."""
    net, x = conv_net(), torch.randn(2, 3, 16, 16)
    expected = net(x)
    assert compile_module(net, CompileOptions(backend="inductor", freeze=True))
    with torch.no_grad():
        got = net(x)
    assert is_compiled(net), capsys.readouterr().err  # a fallback would have restored the eager module
    assert torch._dynamo.utils.counters["inductor"], "inductor generated no code"
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)


def test_no_cpp_compiler_gives_one_line_and_eager(monkeypatch, capsys):
    monkeypatch.setattr(compile_mod, "_cpp_compiler", lambda: None)
    net, x = conv_net(), torch.randn(1, 3, 8, 8)
    expected = net(x)
    assert not compile_module(net, CompileOptions(backend="inductor"))
    assert not compile_module(conv_net(), CompileOptions(backend="inductor"))  # a second module: no second line
    torch.testing.assert_close(net(x), expected)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "C++ compiler" in err[0] and "eager" in err[0]


def test_exception_at_first_call_gives_one_line_and_the_eager_result(capsys):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("code generation failed")

    net, x = conv_net(), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = net(x)
        assert compile_module(net, CompileOptions(backend=broken_backend))
        got = net(x)
        again = net(x)
    assert not is_compiled(net)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(again, expected)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "code generation failed" in err[0] and "eagerly" in err[0]


@pytest.mark.parametrize("method", ["baseline", "contextdiff", "shifted", "codiff", "sdg", "versatile"])
def test_every_method_hands_its_networks_to_the_compiler(method, monkeypatch):
    """Each method's sampler runs through CompileAfterFirstCall and names the networks it calls (not compiled here:
    compile_module is replaced by a recorder)."""
    from common import methods

    recorded: list[nn.Module] = []
    monkeypatch.setattr(compile_mod, "compile_module", lambda module, options: recorded.append(module) or True)
    spec = methods.get(method)
    pipe = spec.load(str(spec.checkpoint_path()))
    with compiling(CompileOptions(backend="eager")):
        pipe(spec.settings(prompts=["a red handwritten seven"], num_inference_steps=2, seed=0))
    assert recorded, f"{method}: no network was found to compile"
    assert all(sum(p.numel() for p in m.parameters()) > 1000 for m in recorded)  # whole networks, not stray layers


def test_outside_compiling_the_denoiser_is_unchanged():
    def denoiser(x, t):
        return x

    assert compile_mod.prepare_denoiser(denoiser) is denoiser
    with compiling(CompileOptions()):
        wrapped = compile_mod.prepare_denoiser(denoiser)
    assert isinstance(wrapped, CompileAfterFirstCall)


def test_sample_script_compile_flag_runs_and_writes(tmp_path, monkeypatch, capsys):
    """``--compile`` end to end; the compiler is made unavailable, so the run takes the one-line eager path."""
    from script_loading import load_script

    monkeypatch.setattr(compile_mod, "_cpp_compiler", lambda: None)
    monkeypatch.delenv(compile_mod.BACKEND_VARIABLE, raising=False)
    sample = load_script("scripts/sample.py")
    out = tmp_path / "samples"
    assert sample.main(["--prompt", "a red handwritten seven", "--num_inference_steps", "2", "--no_progress",
                        "--compile", "--output_dir", str(out)]) == 0
    assert (out / "images" / "0000.png").is_file()
    notes = [line for line in capsys.readouterr().err.splitlines() if "--compile" in line]
    assert len(notes) == 1 and "running eagerly" in notes[0]
