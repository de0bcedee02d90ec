"""A sixth method for the registry tests: flat images of one colour per prompt, no weights.

It is one module with one ``METHOD`` object, as a real method package declares it; registering it takes one entry
(``common.methods.register("toy", "toy_method")`` or ``DLAB_METHODS=toy=toy_method``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.methods import Generation, MethodSpec, SamplingSettings, setting


@dataclass
class ToySettings(SamplingSettings):
    brightness: float = setting(0.5, "grey level of the images", low=0.0, high=1.0, label="brightness")


class ToyPipeline:
    def __call__(self, settings: ToySettings, *, generator=None, callback=None) -> Generation:
        generator = generator if generator is not None else torch.Generator().manual_seed(settings.seed)
        n, side = len(settings.prompts), settings.resolution or 8
        images = torch.full((n, 3, side, side), settings.brightness)
        for step in range(settings.num_inference_steps):
            images = (images + 0.01 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
            if callback is not None:
                callback("toy", step + 1, settings.num_inference_steps)
        return Generation(images)


def load(checkpoint, device="cpu", dtype=torch.float32) -> ToyPipeline:
    return ToyPipeline()


# It needs no weights: any shipped folder serves as its checkpoint.
METHOD = MethodSpec(name="toy", label="Toy", settings=ToySettings, load=load, default_checkpoint="ckpt/tiny/baseline",
                    description="flat grey images (a registry test)")
