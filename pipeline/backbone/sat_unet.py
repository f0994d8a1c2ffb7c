"""DiffusionSat's UNet on current diffusers.

DiffusionSat (Khanna et al., ICLR 2024) is Stable Diffusion 2.1's UNet plus a metadata embedding:
``num_metadata`` MLPs ``TimestepEmbedding(320, 1280)``, each fed with the UNet's sinusoidal projection
of one metadata value (normalised to 0-1000), all added to the timestep embedding. The published
checkpoints store it with ``_class_name: SatUNet`` and the two extra keys ``use_metadata`` and
``num_metadata`` in ``config.json``; everything else is ``UNet2DConditionModel``'s.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import TimestepEmbedding
from torch import nn


class SatUNet(UNet2DConditionModel):
    """``UNet2DConditionModel`` with DiffusionSat's metadata embedding.

    The metadata reaches the embedding through ``get_class_embed``: the parent's forward adds what
    that hook returns to the timestep embedding, which is exactly where DiffusionSat adds it, so the
    rest of the forward pass is diffusers' own code.
    """

    def __init__(self, *args, use_metadata: bool = False, num_metadata: int = 7, **kwargs):
        super().__init__(*args, **kwargs)
        # The parent's decorator registered its own arguments; ours go into the same config.json.
        self.register_to_config(use_metadata=bool(use_metadata), num_metadata=int(num_metadata))
        self.metadata_embedding = None
        if use_metadata:
            proj_dim = self.config.block_out_channels[0]
            time_embed_dim = self.config.block_out_channels[0] * 4
            self.metadata_embedding = nn.ModuleList(
                TimestepEmbedding(proj_dim, time_embed_dim) for _ in range(num_metadata)
            )

    def _fix_state_dict_keys_on_load(self, state_dict):
        # diffusers' hook for renaming old keys, called before it compares the checkpoint's keys
        # with the model's. Built without metadata, SatUNet drops a checkpoint's metadata MLPs on
        # purpose (as the reference does), so they are removed here rather than listed tensor by
        # tensor as unused weights; every other unused or missing key is still reported.
        if self.metadata_embedding is None:
            for key in [k for k in state_dict if k.startswith("metadata_embedding.")]:
                del state_dict[key]
        return super()._fix_state_dict_keys_on_load(state_dict)

    def get_class_embed(self, sample: torch.Tensor, class_labels: torch.Tensor | None):
        if self.metadata_embedding is None:
            return super().get_class_embed(sample=sample, class_labels=class_labels)
        num = self.config.num_metadata
        metadata = class_labels
        if metadata is None:
            # DiffusionSat trained with zeros standing for unknown metadata.
            metadata = torch.zeros(sample.shape[0], num, device=sample.device)
        if metadata.ndim != 2 or metadata.shape[1] != num:
            raise ValueError(
                f"metadata has shape {tuple(metadata.shape)}; expected (batch, {num}) values "
                "normalised to 0-1000"
            )
        proj = self.time_proj(metadata.reshape(-1)).reshape(metadata.shape[0], num, -1)
        proj = proj.to(dtype=sample.dtype)
        emb = None
        for i, mlp in enumerate(self.metadata_embedding):
            part = mlp(proj[:, i])
            emb = part if emb is None else emb + part
        return emb

    def forward(self, sample, timestep, encoder_hidden_states, metadata=None, **kwargs):
        if metadata is not None and self.metadata_embedding is None:
            raise ValueError("metadata was given but this SatUNet was built with use_metadata=False")
        return super().forward(
            sample, timestep, encoder_hidden_states, class_labels=metadata, **kwargs
        )


def _extend_signature() -> None:
    # diffusers builds a model from config.json by matching keys against the signature of
    # __init__; list the parent's parameters there so none of them is dropped on load.
    parent = inspect.signature(UNet2DConditionModel.__init__)
    params = list(parent.parameters.values())
    params += [
        inspect.Parameter("use_metadata", inspect.Parameter.KEYWORD_ONLY, default=False),
        inspect.Parameter("num_metadata", inspect.Parameter.KEYWORD_ONLY, default=7),
    ]
    SatUNet.__init__.__signature__ = parent.replace(parameters=params)


_extend_signature()
