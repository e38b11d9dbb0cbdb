"""Attention masks of padded training batches, built without stopping the host.

transformers' SDPA mask builder asks the device whether a batch's padding mask is all ones, so that a batch
without padding can run SDPA's causal kernel with no mask (`_ignore_causal_mask_sdpa`). Each ask is a host
sync: twice in every forward of a padded batch. The host then waits until the GPU has drained its queue,
and the GPU waits while the host issues the next kernels (docs/benchmarks.md, "Calls 4 and 5").

The student collator already answers that question on the CPU: it drops the mask of a batch with no padding
(student/trainer.py, StudentCollator). So a batch that reaches the model with a mask has padding, and its
mask is built without asking. Wrong never, only slower, where a caller passes an all-ones mask (TRL's DPO
collator does): that batch runs SDPA with a materialized causal mask instead of its causal kernel.

This goes through transformers' own extension point (an attention implementation registered with its mask
builder, as teacher/static_decode.py does for decoding), not a patch of its code. It applies to models on
transformers' SDPA path; eager and flash attention build their masks their own way and are left alone.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "dist_bench_sdpa_padded_batches"


def sdpa_mask_of_padded_batch(
    *, attention_mask: torch.Tensor | None = None, allow_is_causal_skip: bool = True, **kwargs: Any
) -> torch.Tensor | None:
    """transformers' SDPA mask; with a padding mask it is always materialized, without reading the mask on
    the host to learn whether it could be skipped. Without one, the skip needs no read and is kept."""
    return sdpa_mask(
        attention_mask=attention_mask,
        allow_is_causal_skip=allow_is_causal_skip and attention_mask is None,
        **kwargs,
    )


AttentionInterface.register(ATTENTION, sdpa_attention_forward)
AttentionMaskInterface.register(ATTENTION, sdpa_mask_of_padded_batch)


def on_sdpa_through_the_interface(model: torch.nn.Module) -> bool:
    """SDPA, in a model that looks its attention and mask builder up by name in transformers' registries.
    A model that does not (`is_backend_compatible` false) compares the name with "sdpa" itself, and
    another name would quietly send it down its eager path."""
    return model.config._attn_implementation == "sdpa" and type(model).is_backend_compatible()


class MasksWithoutSync:
    """Mixed into the student trainers (SFT, KD, DPO): while `train` runs, the models on transformers' SDPA
    path build their padded batches' masks with `sdpa_mask_of_padded_batch`. Afterwards they are on plain
    SDPA again, for evaluation and generation. The attention kernels are the same: only the host sync goes.
    `masks_without_sync = False` keeps transformers' own builder (bench/student_step.py measures both)."""

    masks_without_sync = True

    def train(self, *args: Any, **kwargs: Any) -> Any:
        candidates = (self.model, getattr(self, "ref_model", None))  # type: ignore[attr-defined]
        swapped = [
            model
            for model in candidates
            if self.masks_without_sync and model is not None and on_sdpa_through_the_interface(model)
        ]
        for model in swapped:
            model.set_attn_implementation(ATTENTION)
        try:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        finally:
            for model in swapped:
                model.set_attn_implementation("sdpa")
