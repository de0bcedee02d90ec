import os

import pytest
import torch


# Tests run on 2 cores with 2 xdist workers: one intra-op thread each avoids oversubscription.
torch.set_num_threads(int(os.environ.get("DLAB_TEST_THREADS", "1")))


# Session-wide read-only assets, built once per test process (xdist worker) and shared by every test file that
# asks for them. Tests must not write inside these folders: copy first (``shutil.copytree``) to change one.
@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """A complete tiny Stable Diffusion folder (seed 0) that ``StableDiffusionPipeline.from_pretrained`` loads."""
    from common.tiny import make_tiny_sd_folder

    return make_tiny_sd_folder(tmp_path_factory.mktemp("session-sd") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """The embedded digits world (``train/`` and ``test/`` with images, masks and metadata.jsonl)."""
    from common.digits import build_digits

    return build_digits(tmp_path_factory.mktemp("session-digits") / "digits")


@pytest.fixture
def fresh_accelerate_state():
    """A fresh accelerate state before and after the test, as a new process would have (mixed precision and the
    process group are fixed per state). Modules that build Trainers use it with ``pytest.mark.usefixtures``."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

