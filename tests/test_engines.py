"""The trainer on accelerate's engines (common/engines.py, common/train.py): FSDP on CPU over gloo, the run header,
two trainable modules in one prepare, gathered export and validation, exact resume, EMA refusal.

FSDP runs here as accelerate's FSDP2 (``fully_shard``) in 2-process torchrun groups on CPU; accelerate alone would
train DDP there (it applies ACCELERATE_USE_FSDP only to GPUs), the trainer switches it. FSDP1 and DeepSpeed need
GPUs: ``scripts/ci/gpu_check.sh`` runs one step of each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from common.engines import (
    Engine,
    ModuleBundle,
    Routed,
    fill_from_state_dict,
    prepare_fsdp_plugin,
    refuse_sharded_ema,
    split_bundle_state,
    weightless_copy,
)
from common.errors import UserError


REPO_ROOT = Path(__file__).resolve().parent.parent

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from common.train import Trainer, TrainConfig

    torch.set_num_threads(1)
    out_dir, steps, stop_at, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    resume = sys.argv[5] if len(sys.argv) > 5 else None


    class ResBlock(nn.Module):  # a class name of common.engines.FSDP_BLOCK_CLASSES: FSDP wraps it as one unit
        def __init__(self, width):
            super().__init__()
            self.fc = nn.Linear(width, width)
            self.register_buffer("scale", torch.tensor(0.5), persistent=False)

        def forward(self, x):
            return x + self.scale * torch.tanh(self.fc(x))


    def data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 4, generator=g)
        return TensorDataset(x, torch.tanh(x[:, :2] * 1.5))


    seen = []

    def validate(step, models):
        # a method other than forward, on the main process only: needs full (gathered) weights
        total = sum(float(p.detach().double().sum()) for m in models.values() for p in m.parameters())
        kinds = sorted({type(p).__name__ for m in models.values() for p in m.parameters()})
        seen.append({"step": step, "weight_sum": total, "param_types": kinds, "rank": int(os.environ.get("RANK", "0"))})

    config = TrainConfig(output_dir=out_dir, seed=5, train_batch_size=batch, max_train_steps=steps, learning_rate=2e-2,
                         lr_warmup_steps=0, checkpointing_steps=2, validation_steps=2, report_to="none",
                         resume_from_checkpoint=resume)
    with Trainer(config) as trainer:
        torch.manual_seed(1)
        head = nn.Sequential(nn.Linear(4, 8), ResBlock(8), nn.SiLU(), nn.Linear(8, 2))
        projection = nn.Linear(4, 4)

        def loss_fn(batch, ctx):
            if ctx.step + 1 == stop_at:
                trainer.request_stop()
            x, y = batch
            pred = ctx.models["head"](ctx.models["projection"](x))
            return nn.functional.mse_loss(pred, y)

        result = trainer.fit({"head": head, "projection": projection}, loss_fn, data(), validation_fn=validate)
        if trainer.is_main_process:
            models = result.models
            with open(os.path.join(out_dir, f"result-{steps}-{stop_at}.json"), "w") as fh:
                json.dump({
                    "engine": trainer.engine.kind, "describe": trainer.engine_description,
                    "step": result.global_step, "completed": result.completed,
                    "history": result.loss_history, "validations": seen,
                    "types": {n: type(m).__name__ for n, m in models.items()},
                    "params": {n: [p.detach().double().flatten().tolist() for p in m.parameters()]
                               for n, m in models.items()},
                    "state_keys": {n: sorted(m.state_dict()) for n, m in models.items()},
                }, fh)
    assert not torch.distributed.is_initialized()  # the trainer destroyed the process group
    sys.exit(result.exit_code)
    """
)


def write_worker(tmp_path: Path) -> Path:
    worker = tmp_path / "engine_worker.py"
    worker.write_text(WORKER)
    return worker


def launch(tmp_path: Path, name: str, steps: int, stop_at: int = 0, resume: str | None = None):
    """The worker as 2 processes under torchrun with FSDP requested as a user would (ACCELERATE_USE_FSDP)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", ACCELERATE_USE_FSDP="true",
               FSDP_VERSION="2")  # fmt: skip
    out = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(write_worker(tmp_path)), str(out), str(steps), str(stop_at), "4"] + ([resume] if resume else [])  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / f"result-{steps}-{stop_at}.json").read_text()), proc.stderr


def run_in_process(tmp_path: Path, monkeypatch, steps: int) -> dict:
    """The same worker in this process: one process, no distributed wrapper, twice the batch (the reference)."""
    import runpy

    from accelerate.state import AcceleratorState, GradientState

    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))] + ["WORLD_SIZE", "RANK"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(sys, "argv", ["worker", str(tmp_path / "plain"), str(steps), "0", "8"])
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        with pytest.raises(SystemExit) as stopped:
            runpy.run_path(str(write_worker(tmp_path)), run_name="__main__")
        assert stopped.value.code == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return json.loads((tmp_path / "plain" / f"result-{steps}-0.json").read_text())


def flat(params: dict[str, list[list[float]]]) -> np.ndarray:
    return np.concatenate([np.asarray(p) for name in sorted(params) for p in params[name]])


def test_fsdp_on_cpu_trains_checkpoints_resumes_validates_and_exports(tmp_path, monkeypatch):
    steps = 4
    # FSDP across 2 processes, stopped after step 3 (checkpoint), then resumed in a new process group to step 4
    stopped, log = launch(tmp_path, "fsdp", steps, stop_at=3)
    assert stopped["engine"] == "FSDP"  # not the DDP accelerate alone would set up on CPU
    assert "engine FSDP2 full shard, 2 processes (gloo, cpu), auto-wrap ResBlock" in log
    assert "checkpoints FULL_STATE_DICT" in stopped["describe"]
    assert (stopped["step"], stopped["completed"]) == (3, False)
    checkpoint = tmp_path / "fsdp" / "checkpoint-3"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"pytorch_model_fsdp.bin", "optimizer.bin", "manifest.json", "rng_state_1.safetensors"} <= files
    assert not any(name.endswith(".pkl") for name in files)
    resumed, log = launch(tmp_path, "fsdp", steps, resume="latest")
    assert "resumed from" in log and "checkpoint-3" in log
    assert resumed["step"] == steps and resumed["completed"]

    # the reference: one plain process with the global batch; sharded training is the same optimisation
    plain = run_in_process(tmp_path, monkeypatch, steps)
    assert plain["engine"] == "plain"
    np.testing.assert_allclose(stopped["history"] + resumed["history"], plain["history"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(flat(resumed["params"]), flat(plain["params"]), rtol=0, atol=1e-6)
    assert plain["history"][-1] < plain["history"][0]

    # export: plain modules with full weights on rank 0 (gathered), the same keys as the modules the script built
    assert resumed["types"] == {"head": "Sequential", "projection": "Linear"}
    assert resumed["state_keys"] == plain["state_keys"]
    # validation ran on rank 0 on plain (gathered) tensors, at step 2 and at step 4 (after the resume)
    assert [(v["step"], v["rank"], v["param_types"]) for v in stopped["validations"] + resumed["validations"]] == [
        (2, 0, ["Parameter"]),
        (4, 0, ["Parameter"]),
    ]
    assert resumed["validations"][-1]["weight_sum"] == pytest.approx(float(flat(resumed["params"]).sum()), abs=1e-9)


# --------------------------------------------------------------------------------------------------------------
# pieces, in process
# --------------------------------------------------------------------------------------------------------------


def test_ema_is_refused_where_parameters_are_sharded():
    for engine, name in ((Engine("FSDP", 2, fsdp_version=2), "FSDP2"), (Engine("DeepSpeed", 8, zero_stage=3), "ZeRO-3")):
        with pytest.raises(UserError, match=f"--use_ema .* {name} shards .* without --use_ema, or with DDP"):
            refuse_sharded_ema(engine, True)
        refuse_sharded_ema(engine, False)
    for engine in (Engine("DDP", 2), Engine("DeepSpeed", 2, zero_stage=2), Engine("plain", 1)):
        refuse_sharded_ema(engine, True)  # full parameters on every process: EMA works


def test_bundle_routes_calls_and_splits_its_state_dict():
    unet, adapter = nn.Linear(3, 2), nn.Linear(2, 2, bias=False)
    bundle = ModuleBundle({"unet": unet, "adapter": adapter})
    calls = []
    bundle.register_forward_pre_hook(lambda module, args: calls.append(args[0]))  # FSDP / DeepSpeed hook here
    routed = Routed(bundle, "unet", unet)
    x = torch.randn(4, 3)
    assert torch.equal(routed(x), unet(x))
    assert calls == ["unet"] and routed.out_features == 2 and routed.weight is unet.weight
    # a method of the model's own class runs inside the bundle's forward too; nn.Module's methods do not
    unet.halve = lambda x: unet(x) / 2  # an instance attribute here; a class method in real models
    assert torch.equal(routed.halve(x), unet(x) / 2) and calls == ["unet", "unet"]
    assert routed.train() is unet and calls == ["unet", "unet"]
    parts = split_bundle_state(bundle.state_dict(), ["unet", "adapter"])
    assert set(parts["unet"]) == {"weight", "bias"} and set(parts["adapter"]) == {"weight"}
    assert torch.equal(parts["adapter"]["weight"], adapter.weight)


def test_weightless_copy_is_rebuilt_from_a_gathered_state_dict():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)  # fmt: skip
    unet.register_buffer("table", torch.arange(5.0), persistent=False)  # not in any state dict: copied for real
    template = weightless_copy(unet)
    assert all(p.is_meta for p in template.parameters()) and not any(p.is_meta for p in unet.parameters())
    assert torch.equal(template.table, unet.table)
    gathered = {k: v.clone().to(torch.bfloat16) if k.endswith("conv_in.weight") else v.clone()
                for k, v in unet.state_dict().items()}  # a 16-bit gather (ZeRO-3) is cast back to the model's dtype
    rebuilt = fill_from_state_dict(template, gathered, torch.device("cpu"))
    assert rebuilt.conv_in.weight.dtype == torch.float32 and type(rebuilt) is UNet2DModel
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    expected = unet(x, t).sample
    unet.conv_in.weight.data = unet.conv_in.weight.data.to(torch.bfloat16).float()
    torch.testing.assert_close(rebuilt(x, t).sample, unet(x, t).sample, rtol=0, atol=0)
    assert expected.shape == (2, 1, 8, 8)
    with pytest.raises(RuntimeError, match="missing"):
        fill_from_state_dict(template, {k: v for k, v in gathered.items() if "conv_in" not in k}, torch.device("cpu"))


def test_fsdp_auto_wrap_keeps_present_blocks_and_full_state_dict(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from diffusers.models.resnet import ResnetBlock2D
    from torch.distributed.fsdp.fully_sharded_data_parallel import StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    for key in [k for k in os.environ if k.startswith("FSDP_")]:
        monkeypatch.delenv(key)
    bundle = ModuleBundle({"unet": nn.Sequential(ResnetBlock2D(in_channels=8, temb_channels=None, groups=4))})
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                            state_dict_type="SHARDED_STATE_DICT")  # fmt: skip
    prepare_fsdp_plugin(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)), bundle)
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap == ["ResnetBlock2D"]  # the project default, filtered to the model
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                            auto_wrap_policy="TRANSFORMER_BASED_WRAP",
                                            transformer_cls_names_to_wrap=["BasicTransformerBlock", "ResnetBlock2D"])  # fmt: skip
    prepare_fsdp_plugin(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)), bundle)
    assert plugin.transformer_cls_names_to_wrap == ["ResnetBlock2D"]  # accelerate would raise on the absent one


def test_accelerate_configs_are_valid_and_name_the_project_blocks():
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    folder = REPO_ROOT / "configs" / "accelerate"
    names = {"single_gpu", "multi_gpu", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "multi_node"}
    assert {p.stem for p in folder.glob("*.yaml")} >= names
    for name in sorted(names):
        config = load_config_from_file(str(folder / f"{name}.yaml"))  # accelerate's own parser and checks
        assert config.compute_environment.value == "LOCAL_MACHINE"
    fsdp = yaml.safe_load((folder / "fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and fsdp["fsdp_version"] == 2
    assert {"BasicTransformerBlock", "ResnetBlock2D"} <= set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","))
    zero3 = yaml.safe_load((folder / "deepspeed_zero3.yaml").read_text())["deepspeed_config"]
    assert zero3["zero_stage"] == 3 and zero3["zero3_save_16bit_model"] is True  # get_state_dict needs it
    node = yaml.safe_load((folder / "multi_node.yaml").read_text())
    assert node["num_machines"] > 1 and node["num_processes"] % node["num_machines"] == 0


def test_fsdp1_rebuilds_the_optimizer_on_the_wrapped_parameters_keeping_param_groups():
    """FSDP1 (GPU only) replaces what it wraps; the trainer re-points each param group by parameter name."""
    from common.train import TrainConfig, Trainer

    class Wrapped(nn.Module):  # names its child as FSDP1 does
        def __init__(self, module):
            super().__init__()
            self._fsdp_wrapped_module = module

    def fresh(p):  # a wrapper that swaps parameters for new tensors, as FSDP1's flattening does
        return nn.Parameter(p.detach().clone())

    bundle = ModuleBundle({"unet": nn.Linear(3, 2), "adapter": nn.Linear(2, 2)})
    groups = [{"params": list(bundle.parts["unet"].parameters()), "lr": 1e-4},
              {"params": list(bundle.parts["adapter"].parameters()), "lr": 1e-2}]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)

    def prepare(obj):
        if isinstance(obj, nn.Module):
            for module in obj.modules():
                for name, p in list(module.named_parameters(recurse=False)):
                    setattr(module, name, fresh(p))
            return Wrapped(obj)
        return obj

    plugin = SimpleNamespace(use_orig_params=False)
    fake = SimpleNamespace(
        accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), prepare=prepare, num_processes=1),
        config=TrainConfig(max_train_steps=10, lr_warmup_steps=0),
    )
    fake._make_lr_scheduler = lambda opt, loader: Trainer._make_lr_scheduler(fake, opt, loader)
    root, rebuilt, scheduler = Trainer._prepare_fsdp1(fake, bundle, optimizer, dataloader=None)
    assert plugin.use_orig_params is True
    wrapped = dict(root.named_parameters())
    assert [g["lr"] for g in rebuilt.param_groups] == [1e-4, 1e-2] and scheduler.optimizer is rebuilt
    assert rebuilt.param_groups[0]["params"] == [wrapped["_fsdp_wrapped_module.parts.unet.weight"],
                                                 wrapped["_fsdp_wrapped_module.parts.unet.bias"]]  # fmt: skip
    assert all(p is not q for p, q in zip(rebuilt.param_groups[1]["params"], groups[1]["params"]))


def test_requested_engine_that_cannot_run_is_refused_in_one_line(monkeypatch):
    from accelerate.utils import DistributedType

    from common.engines import check_requested_engine

    def accelerator(kind, n=2):
        return SimpleNamespace(distributed_type=kind, num_processes=n, device=torch.device("cpu"))

    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    check_requested_engine(accelerator(DistributedType.MULTI_CPU))  # nothing requested: DDP as set up
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="DeepSpeed was requested .* set up MULTI_CPU: DeepSpeed needs CUDA GPUs"):
        check_requested_engine(accelerator(DistributedType.MULTI_CPU))
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UserError, match="FSDP1 cannot run on CPU .* fsdp_version: 2"):
        check_requested_engine(accelerator(DistributedType.MULTI_CPU))
    with pytest.raises(UserError, match="FSDP was requested .* but accelerate set up MULTI_GPU"):
        check_requested_engine(accelerator(DistributedType.MULTI_GPU))
    check_requested_engine(accelerator(DistributedType.NO, n=1))  # one process: nothing to shard (a warning)
