"""CLIP's image and text towers, assembled: the :class:`CLIP` model and how it is built.

Module names equal the key prefixes of OpenAI's released state dicts, so a checkpoint loads with no
renaming, and research code that reaches into submodules (``model.transformer.resblocks[i].attn``,
``model.visual.conv1``...) finds what it expects. Hyperparameters are read from tensor shapes by
:class:`CLIPConfig`; nothing here knows about files, URLs or devices beyond the tensors it is given.

The parts live in :mod:`clip.layers` (blocks, transformer), :mod:`clip.vision` (image towers),
:mod:`clip.config` (hyperparameters, read from shapes and configs), :mod:`clip.weights`
(loading, precision), :mod:`clip.features` (the feature methods :class:`CLIP` inherits: tokens,
block outputs, attention; heatmaps) and :mod:`clip.checks` (input checks); every name research
code imports from OpenAI's ``clip.model`` is importable from here too.

Shape legend used in comments: B batch, L sequence length, N batch (sequence-first layout),
D width, H heads, C channels, R image resolution, G grid side (R // patch), E embed dim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional, Union

import torch
from torch import Tensor, nn

from clip.checks import check_image, check_text
from clip.config import CLIPConfig, UnsupportedModelError
from clip.features import FeatureMethods, TextTokens, attention_heatmap
from clip.layers import (
    LayerNorm,
    QuickGELU,
    ResidualAttentionBlock,
    Transformer,
    any_hooked,
    causal_mask,
    global_hooks_active,
    is_hooked,
    layer_indices,
)
from clip.vision import AttentionPool2d, Bottleneck, ModifiedResNet, VisionTransformer
from clip.weights import ARCHIVE_EXTRA_KEYS, convert_weights, load_weights

__all__ = [
    "ARCHIVE_EXTRA_KEYS",
    "CLIP",
    "AttentionPool2d",
    "Bottleneck",
    "CLIPConfig",
    "FeatureMethods",
    "LayerNorm",
    "ModifiedResNet",
    "QuickGELU",
    "ResidualAttentionBlock",
    "TextTokens",
    "Transformer",
    "VisionTransformer",
    "any_hooked",
    "attention_heatmap",
    "build_from_state_dict",
    "build_model",
    "causal_mask",
    "convert_weights",
    "global_hooks_active",
    "is_hooked",
    "layer_indices",
    "load_weights",
]


# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------


class CLIP(FeatureMethods, nn.Module):
    """Contrastive image-text model: an image tower, a causal text transformer, and a shared space.

    The core is here: building, ``encode_image``, ``encode_text``, ``forward``, resizing. The
    feature methods (``encode_image_tokens``, ``image_attention``, ``encode_text_layers``...)
    come from :class:`clip.features.FeatureMethods`.

    The constructor's arguments and their order are OpenAI's, so subclasses written for OpenAI's
    package work unchanged.

    Args:
        embed_dim: E, the joint embedding size.
        image_resolution: R.
        vision_layers: an int (ViT depth) or four ints (ResNet stage depths).
        vision_width: ViT width, or ResNet stem width.
        vision_patch_size: ViT patch size (ignored for ResNets).
        context_length: maximum text length in tokens (77).
        vocab_size: token vocabulary size (49408).
        transformer_width: text transformer width.
        transformer_heads: text transformer heads.
        transformer_layers: text transformer depth.
        activation: MLP activation of both towers, ``"quick_gelu"`` (OpenAI) or ``"gelu"``.
        vision_head_width: width of one image-tower attention head (64 in OpenAI's models).
        vision_mlp_ratio: ViT MLP hidden width over its width (4 in OpenAI's models).
        text_mlp_ratio: text MLP hidden width over its width (4).

    Build from a :class:`CLIPConfig` with :meth:`from_config`; :attr:`config` gives it back.
    """

    @classmethod
    def from_config(cls, config: CLIPConfig) -> CLIP:
        """A randomly initialised model of the given configuration (build it under
        ``torch.device("meta")`` to skip the initialisation's memory and time).

        Args:
            config: the hyperparameters, including how images are preprocessed.

        Returns:
            The model; ``model.config == config``.
        """
        model = cls(**config.model_kwargs())
        model._config = config
        return model

    @property
    def config(self) -> CLIPConfig:
        """The model's hyperparameters and preprocessing, at its current input resolution."""
        return self._config.replace(image_resolution=self.visual.input_resolution)

    def __init__(
        self,
        embed_dim: int,
        image_resolution: int,
        vision_layers: Union[tuple[int, int, int, int], int],
        vision_width: int,
        vision_patch_size: Optional[int],
        context_length: int,
        vocab_size: int,
        transformer_width: int,
        transformer_heads: int,
        transformer_layers: int,
        *,
        activation: str = "quick_gelu",
        vision_head_width: int = 64,
        vision_mlp_ratio: float = 4.0,
        text_mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        config = CLIPConfig(
            embed_dim,
            image_resolution,
            vision_layers,
            vision_width,
            vision_patch_size,
            context_length,
            vocab_size,
            transformer_width,
            transformer_heads,
            transformer_layers,
            activation=activation,
            vision_head_width=vision_head_width,
            vision_mlp_ratio=vision_mlp_ratio,
            text_mlp_ratio=text_mlp_ratio,
        )
        self._config = config
        self.context_length = context_length
        self.visual: Union[ModifiedResNet, VisionTransformer]
        if isinstance(vision_layers, (tuple, list)):
            self.visual = ModifiedResNet(
                vision_layers, embed_dim, config.vision_heads, image_resolution, vision_width
            )
        else:
            assert vision_patch_size is not None  # checked by CLIPConfig
            self.visual = VisionTransformer(
                image_resolution,
                vision_patch_size,
                vision_width,
                vision_layers,
                config.vision_heads,
                embed_dim,
                mlp_ratio=vision_mlp_ratio,
                activation=activation,
            )
        mask = self.build_attention_mask()
        self.transformer = Transformer(
            transformer_width,
            transformer_layers,
            transformer_heads,
            mask,
            mlp_ratio=text_mlp_ratio,
            activation=activation,
        )
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """Random initialisation as used to train CLIP (for training from scratch)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            self._init_resnet(self.visual)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
        stds = {
            "attn.in_proj_weight": attn_std,
            "attn.out_proj.weight": proj_std,
            "mlp.c_fc.weight": fc_std,
            "mlp.c_proj.weight": proj_std,
        }
        for name, param in self.transformer.named_parameters():
            std = stds.get(name.split(".", 2)[-1])
            if std is not None:
                nn.init.normal_(param, std=std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    @staticmethod
    def _init_resnet(visual: ModifiedResNet) -> None:
        pool = visual.attnpool
        std = pool.c_proj.in_features**-0.5
        for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            nn.init.normal_(linear.weight, std=std)
        for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            for name, param in stage.named_parameters():
                if name.endswith("bn3.weight"):
                    nn.init.zeros_(param)

    def build_attention_mask(self) -> Tensor:
        """The text tower's causal mask [context_length, context_length] (additive, -inf above)."""
        return causal_mask(self.context_length)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the image tower's first convolution: the dtype inputs are cast to."""
        return self.visual.conv1.weight.dtype

    # ---- image ------------------------------------------------------------------------------

    def encode_image(self, image: Tensor) -> Tensor:
        """Embed images.

        Args:
            image: float tensor [B, 3, R, R] on the model's device, normalised as ``preprocess``
                does; cast to ``model.dtype``.

        Returns:
            Image embeddings [B, E], not normalised.
        """
        self._check_image(image)
        return self.visual(image.to(self.dtype))

    def _check_image(self, image: Tensor) -> None:
        if torch.jit.is_tracing():
            return
        check_image(image, self.visual.input_resolution, self.visual.conv1.weight)

    # ---- text -------------------------------------------------------------------------------

    def encode_text(self, text: Tensor) -> Tensor:
        """Embed tokenized texts.

        The text tower is causal and pools at the end-of-text token (the largest id in each row),
        so it runs only on the first ``max EOT position + 1`` columns: the result is the same as
        on the full padded batch, computed faster. It does so only while every text block has the
        causal mask and nothing observes the text tower: with another mask (e.g. ``None`` for a
        bidirectional variant), a hook on a block or its ``attn``, or a patched ``attn.forward``,
        all L columns are run, as in OpenAI's package (see :meth:`text_is_trimmable`).

        Args:
            text: token ids [B, L] with L ≤ ``context_length``, as from ``clip.tokenize``; any
                integer dtype that can hold the vocabulary's ids.

        Returns:
            Text embeddings [B, E], not normalised.

        Raises:
            TypeError: if ``text`` is not an integer tensor, or its dtype cannot hold the ids.
            ValueError: on a wrong shape, device or an id out of the vocabulary.
        """
        text = self._check_text(text)
        trim = not torch.jit.is_tracing() and self.text_is_trimmable()
        return self.encode_text_unchecked(text, trim=trim)

    def text_is_trimmable(self) -> bool:
        """Whether :meth:`encode_text` may skip the columns after the batch's last end-of-text
        token: the text blocks are causal and run as built, and nothing hooks the text tower
        (see :meth:`Transformer.is_causal_as_built`)."""
        if is_hooked(self.token_embedding) or is_hooked(self.ln_final):
            return False
        transformer = self.transformer
        return isinstance(transformer, Transformer) and transformer.is_causal_as_built()

    def encode_text_unchecked(self, text: Tensor, *, trim: bool = False) -> Tensor:
        """:meth:`encode_text` without its input checks (it checks, then calls this).

        Args:
            text: valid token ids [B, L] (int32/int64, on the model's device; not checked).
            trim: run only the first ``max EOT + 1`` columns; right only when
                :meth:`text_is_trimmable`. False keeps the graph free of data-dependent shapes
                (tracing, ONNX export).

        Returns:
            Text embeddings [B, E], not normalised.
        """
        x, eot = self._text_tokens(text, trim)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]  # [B, D]
        return pooled @ self.text_projection

    def _text_tokens(self, text: Tensor, trim: bool) -> TextTokens:
        """Unchecked text tower up to ``ln_final``: [B, L] ids → ([B, L', D], EOT index [B]).

        With ``trim`` only the first ``max EOT + 1`` columns are run (L' ≤ L): the causal mask
        makes those columns independent of the rest; only pass it when :meth:`text_is_trimmable`.
        Without it (export, per-token outputs, masks other than causal, hooks) L' = L.
        """
        eot = text.argmax(dim=-1)  # [B]
        if trim and text.shape[0] > 0:
            text = text[:, : int(eot.max()) + 1]
        x = self._embed_text(text)
        x = self.transformer(x.transpose(0, 1)).transpose(0, 1)  # [B, L', D]
        return TextTokens(self.ln_final(x).to(self.dtype), eot)

    def _embed_text(self, text: Tensor) -> Tensor:
        """[B, L] ids → the first block's input [B, L, D] (token + positional embedding)."""
        x = self.token_embedding(text).to(self.dtype)  # [B, L, D]
        return x + self.positional_embedding[: text.shape[1]].to(self.dtype)

    def _check_text(self, text: Tensor) -> Tensor:
        """Validate token ids [B, L]; returns them as int32/int64 (other integer dtypes cast)."""
        if torch.jit.is_tracing():
            return text
        weight = self.token_embedding.weight
        return check_text(text, self.vocab_size, self.context_length, weight)

    # ---- both -------------------------------------------------------------------------------

    def set_grad_checkpointing(self, enabled: bool = True) -> CLIP:
        """Trade compute for memory in training: with ``enabled``, both towers keep no activations
        inside their blocks (ViT and text transformer blocks, ResNet stages) and recompute them in
        backward, so batches that otherwise do not fit do (about a third more compute). Outputs and
        gradients are unchanged; BatchNorm statistics are updated once per step, as without it.
        Inference (under ``torch.no_grad()``) is unaffected.

        Args:
            enabled: turn checkpointing on (True) or off.

        Returns:
            ``self``, for chaining.
        """
        self.visual.set_grad_checkpointing(enabled)
        self.transformer.grad_checkpointing = enabled
        return self

    def resize_input(self, resolution: int) -> CLIP:
        """Adapt the image tower, in place, to square inputs of side ``resolution``.

        ViT: the patch-grid positional embedding is resized bicubically, the class-token row
        kept; ``resolution`` must be a multiple of the patch size. ResNet: the attention pool's
        positional embedding likewise; ``resolution`` must be a multiple of 32. The other weights
        are untouched, ``visual.input_resolution`` becomes ``resolution`` (and so does
        ``config.image_resolution``), and at the current resolution the model is unchanged. Build
        the matching preprocessing with
        ``clip.preprocess.transform(resolution, model.config.preprocess)``;
        ``copy.deepcopy(model)`` first to keep the original. The resized embedding is a new
        ``nn.Parameter``: create optimizers after this.

        Args:
            resolution: the new input side in pixels.

        Returns:
            ``self``, for chaining.

        Raises:
            ValueError: if ``resolution`` is not a valid multiple.
        """
        self.visual.resize_input(resolution)
        return self

    def forward(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled cosine similarities between images and texts.

        Args:
            image: [B, 3, R, R] preprocessed images.
            text: [T, L] token ids.

        Returns:
            ``(logits_per_image [B, T], logits_per_text [T, B])``.
        """
        image_features = self.encode_image(image)
        text_features = self.encode_text(text)
        image_features = image_features / image_features.norm(dim=1, keepdim=True)
        text_features = text_features / text_features.norm(dim=1, keepdim=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def build_from_state_dict(
    state_dict: Mapping[str, Tensor], config: Optional[CLIPConfig] = None
) -> CLIP:
    """Build a :class:`CLIP` holding exactly the given tensors (dtypes kept), in eval mode.

    The model is constructed on the meta device and the weights assigned, so no random
    initialisation runs and no second copy of the weights is made. The caller's dict is not
    modified.

    Args:
        state_dict: OpenAI-format weights (TorchScript archive extras are ignored).
        config: the hyperparameters, if known (from the weights' config); by default read from
            the shapes, with OpenAI's values for what shapes cannot tell.

    Returns:
        The model, on the device of the given tensors (its attention masks too).

    Raises:
        ValueError: if the weights do not fit the configuration.
    """
    try:
        if config is None:
            config = CLIPConfig.from_state_dict(state_dict)
        with torch.device("meta"):
            model = CLIP.from_config(config)
    except UnsupportedModelError:
        raise
    except (AssertionError, ValueError, RuntimeError) as e:
        raise ValueError(f"state dict shapes give an impossible CLIP ({config}): {e}") from e
    load_weights(model, state_dict, assign=True)
    _masks_to(model, model.token_embedding.weight.device)
    return model.eval()


def _masks_to(model: CLIP, device: torch.device) -> None:
    """Move the attention masks (non-persistent buffers, built on the CPU) to ``device``."""
    for module in model.modules():
        if isinstance(module, ResidualAttentionBlock) and module.attn_mask is not None:
            module.attn_mask = module.attn_mask.to(device)


def build_model(state_dict: dict) -> CLIP:
    """Build a CLIP model from an OpenAI-format state dict, as OpenAI's ``build_model`` does.

    Hyperparameters are inferred from tensor shapes; weights are loaded strictly; the model is
    returned in eval mode with OpenAI's mixed precision (see :func:`convert_weights`). Call
    ``.float()`` on the result for fp32. The caller's dict is not modified.

    Args:
        state_dict: the weights, e.g. ``torch.jit.load(path).state_dict()``.

    Returns:
        The model.
    """
    model = build_from_state_dict({k: v.clone() for k, v in state_dict.items()})
    convert_weights(model)
    return model
