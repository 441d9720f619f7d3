"""Locking (freezing) CLIP's towers for fine-tuning, whole or all but the last N blocks.

LiT ("locked-image tuning", Zhai et al. 2022) trains the text tower against a frozen image
tower: :func:`lock_image_tower`. Unlocking only the last few blocks is a middle ground between
that and full fine-tuning, and :func:`lock_text_tower` is the mirror image.

What a "block" is, and what stays trainable with ``unlocked_blocks=N``:

- ViT image tower: blocks are ``visual.transformer.resblocks``. N > 0 unlocks the last N blocks
  and the head (``ln_post``, ``proj``); the stem (``conv1``, ``class_embedding``,
  ``positional_embedding``, ``ln_pre``) stays locked.
- ResNet image tower: blocks are the bottlenecks of ``layer1`` … ``layer4`` in order (16 in RN50:
  3 + 4 + 6 + 3). N > 0 unlocks the last N bottlenecks and the head, the attention pool
  (``attnpool``); the stem (``conv1``-``conv3`` and their BatchNorms) stays locked.
- Text tower: blocks are ``transformer.resblocks``. N > 0 unlocks the last N blocks and the head
  (``ln_final``, ``text_projection``); ``token_embedding`` and ``positional_embedding`` stay
  locked.

N = 0 locks the whole tower. ``logit_scale`` belongs to neither tower and is never locked here.
Each call sets the tower's state from scratch (what it leaves unlocked gets
``requires_grad=True``), so calling again with another N changes the split. Lock before
creating the optimiser: :func:`clip.optim.make_optimizer` includes only trainable parameters.

BatchNorm: a locked BatchNorm (ResNet) must also stop updating its running statistics and
normalise with them, i.e. stay in eval mode. ``model.train()`` would put it back in training
mode, so the lock puts it in eval mode now and registers a forward pre-hook that sets it to eval
again before each call: ``model.train()`` as usual is right (a locked BatchNorm's ``training``
reads True from ``model.train()`` until its next forward, which runs in eval). Unlocking it (a
later call) removes the hook. :func:`is_batchnorm_locked` tells whether a module has the hook.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from clip.vision import ModifiedResNet, VisionTransformer

__all__ = ["is_batchnorm_locked", "lock_image_tower", "lock_text_tower"]


def _keep_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a locked BatchNorm: normalise with (and keep) the running stats."""
    module.training = False


def is_batchnorm_locked(module: nn.Module) -> bool:
    """Whether ``module`` carries the lock's keep-in-eval hook (see the module docstring)."""
    return any(hook is _keep_eval for hook in module._forward_pre_hooks.values())


def _set_trainable(module: nn.Module, trainable: bool) -> None:
    for param in module.parameters():
        param.requires_grad_(trainable)
    for sub in module.modules():
        if not isinstance(sub, nn.modules.batchnorm._BatchNorm):
            continue
        hooks = sub._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if hook is _keep_eval]:
            del hooks[key]
        if not trainable:
            sub.register_forward_pre_hook(_keep_eval)
            sub.eval()


def _lock(
    locked: list[nn.Module],
    locked_params: list[nn.Parameter],
    blocks: list[nn.Module],
    head: list[nn.Module],
    head_params: list[nn.Parameter],
    unlocked: int,
    what: str,
) -> None:
    """Lock the whole tower (``locked`` holds everything, so a part this split does not name
    stays locked), then unlock the last ``unlocked`` blocks and the head."""
    if isinstance(unlocked, bool) or not isinstance(unlocked, int) or unlocked < 0:
        raise ValueError(f"unlocked_blocks must be a non-negative int, got {unlocked!r}")
    if unlocked > len(blocks):
        raise ValueError(
            f"unlocked_blocks={unlocked} but the {what} has {len(blocks)} blocks; pass at most "
            f"{len(blocks)}, or do not lock the tower to train all of it"
        )
    for module in locked:
        _set_trainable(module, False)
    for param in locked_params:
        param.requires_grad_(False)
    if unlocked == 0:
        return
    for module in [*blocks[len(blocks) - unlocked :], *head]:
        _set_trainable(module, True)
    for param in head_params:
        param.requires_grad_(True)


def lock_image_tower(model: nn.Module, unlocked_blocks: int = 0) -> None:
    """Freeze the image tower (``model.visual``), all but its last ``unlocked_blocks`` blocks.

    See the module docstring for what the blocks are for a ViT and a ResNet.

    Args:
        model: a :class:`clip.model.CLIP` (ViT or ResNet image tower).
        unlocked_blocks: blocks left trainable at the end of the tower, with the head; 0 locks
            the whole tower (LiT).

    Raises:
        ValueError: on a negative N, or more than the tower's blocks.
        TypeError: if the model has no ViT or ResNet ``visual`` tower.
    """
    visual = getattr(model, "visual", None)
    head_params: list[nn.Parameter] = []
    if isinstance(visual, VisionTransformer):
        blocks = list(visual.transformer.resblocks)
        head: list[nn.Module] = [visual.ln_post]
        if isinstance(visual.proj, nn.Parameter):
            head_params.append(visual.proj)
    elif isinstance(visual, ModifiedResNet):
        stages = (visual.layer1, visual.layer2, visual.layer3, visual.layer4)
        blocks = [block for stage in stages for block in stage]
        head = [visual.attnpool]
    else:
        raise TypeError(
            f"lock_image_tower needs a CLIP model with a ViT or ResNet image tower, got "
            f"{type(model).__name__} with visual={type(visual).__name__}"
        )
    _lock([visual], [], blocks, head, head_params, unlocked_blocks, "image tower")


def lock_text_tower(model: nn.Module, unlocked_blocks: int = 0) -> None:
    """Freeze the text tower, all but its last ``unlocked_blocks`` transformer blocks.

    Args:
        model: a :class:`clip.model.CLIP`.
        unlocked_blocks: blocks left trainable at the end, with ``ln_final`` and
            ``text_projection``; 0 locks the whole text tower.

    Raises:
        ValueError: on a negative N, or more than the tower's blocks.
        TypeError: if the model has no CLIP text tower.
    """
    names = ("token_embedding", "positional_embedding", "transformer", "ln_final")
    if not all(hasattr(model, n) for n in (*names, "text_projection")):
        raise TypeError(
            f"lock_text_tower needs a CLIP model ({', '.join(names)}, text_projection), got "
            f"{type(model).__name__}"
        )
    clip_model: Any = model
    modules = [clip_model.token_embedding, clip_model.transformer, clip_model.ln_final]
    params = [clip_model.positional_embedding, clip_model.text_projection]
    blocks = list(clip_model.transformer.resblocks)
    head, head_params = [clip_model.ln_final], [clip_model.text_projection]
    _lock(modules, params, blocks, head, head_params, unlocked_blocks, "text tower")
