"""Proposal networks for PaPr patch pruning (arXiv 2403.16020): a light ConvNet whose last feature map, averaged
over channels, says which image patches matter.

Recipes are JSON, so a proposal is named by a string:

* ``"torchvision:<model>"``: a torchvision classification model built with ``weights=None`` and cut before its
  global pooling (``.features`` of MobileNet/EfficientNet/..., or everything before ``avgpool`` of a ResNet/RegNet).
  The default is ``"torchvision:mobilenet_v3_small"``.
* any name registered with ``register_proposal(name, module_or_factory)``: a trained ``nn.Module`` instance (it is
  deep-copied into each pruned model, so yours is never changed) or a zero-argument factory returning one.

The stage's ``proposal_weights`` loads weights into the new proposal: a torchvision weights name (``"DEFAULT"``)
for a ``torchvision:`` proposal, or a state-dict file for any proposal (see ``build_proposal``).

The proposal becomes a submodule of the pruned ``GraphModule``, so its weights travel in the state dict that
``fxprune.save`` writes; ``fxprune.load`` rebuilds the architecture from the same name and loads them back.

Example:
    >>> fxprune.stages.patches.register_proposal("digits_cnn", trained_cnn.features)
    >>> recipe = {"stages": [{"kind": "patches", "keep": 0.5, "proposal": "digits_cnn"}]}
"""
from __future__ import annotations

import copy
import difflib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_PROPOSAL = "torchvision:mobilenet_v3_small"
TORCHVISION_PREFIX = "torchvision:"
ProposalSource = nn.Module | Callable[[], nn.Module]
_PROPOSALS: dict[str, ProposalSource] = {}


class UnknownProposal(KeyError):
    """No proposal network is known under this name (the message lists the registered ones)."""

    def __str__(self) -> str:  # KeyError quotes its argument; show the sentence as written
        return str(self.args[0])


def register_proposal(name: str, module_or_factory: ProposalSource) -> None:
    """Make ``name`` usable as a recipe's ``proposal``.

    Args:
        name: the name recipes use (must not start with ``"torchvision:"``).
        module_or_factory: an ``nn.Module`` mapping the model's input image to a ``(B, C, h, w)`` feature map
            (copied on every use), or a zero-argument callable returning such a module.
    """
    if not isinstance(name, str) or not name or name.startswith(TORCHVISION_PREFIX):
        raise ValueError(f"proposal names must be non-empty strings not starting with '{TORCHVISION_PREFIX}', "
                         f"got {name!r}")
    if not isinstance(module_or_factory, nn.Module) and not callable(module_or_factory):
        raise TypeError(f"register_proposal('{name}', ...) needs an nn.Module or a zero-argument factory, "
                        f"got {type(module_or_factory).__name__}")
    if name in _PROPOSALS:
        log.info("proposal '%s' re-registered", name)
    _PROPOSALS[name] = module_or_factory


def registered_proposals() -> list[str]:
    """The names registered with ``register_proposal`` (``torchvision:<model>`` names are always available too)."""
    return sorted(_PROPOSALS)


def _torchvision_names() -> set[str]:
    import torchvision

    return set(torchvision.models.list_models(module=torchvision.models))


def _cut_before_pooling(model: nn.Module, name: str) -> nn.Module:
    features = getattr(model, "features", None)
    if isinstance(features, nn.Module):
        return features
    children = list(model.named_children())
    names = [n for n, _ in children]
    if "avgpool" in names:
        return nn.Sequential(*[m for n, m in children[: names.index("avgpool")]])
    raise UnknownProposal(f"torchvision model '{name}' has neither '.features' nor an 'avgpool' to cut before; "
                          "register a module returning its last conv feature map with register_proposal")


def check_proposal_name(name: str) -> None:
    """Raise ``UnknownProposal`` unless ``name`` is registered or names a torchvision classification model."""
    if name in _PROPOSALS:
        return
    if name.startswith(TORCHVISION_PREFIX):
        model = name[len(TORCHVISION_PREFIX):]
        known = _torchvision_names()
        if model in known:
            return
        close = difflib.get_close_matches(model, sorted(known), n=1)
        hint = f" (did you mean '{TORCHVISION_PREFIX}{close[0]}'?)" if close else ""
        raise UnknownProposal(f"unknown proposal '{name}': torchvision has no classification model '{model}'{hint}")
    close = difflib.get_close_matches(name, registered_proposals(), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    listed = ", ".join(registered_proposals()) or "none"
    raise UnknownProposal(f"unknown proposal '{name}'{hint}: register it with fxprune.stages.patches.register_proposal "
                          f"(registered: {listed}) or use '{TORCHVISION_PREFIX}<model>', e.g. '{DEFAULT_PROPOSAL}'")


WEIGHT_FILES = (".pt", ".pth", ".bin", ".safetensors")


def is_weights_file(weights: str) -> bool:
    """Whether a ``proposal_weights`` value names a state-dict file (rather than torchvision weights)."""
    return weights.endswith(WEIGHT_FILES) or "/" in weights or "\\" in weights


def check_proposal_weights(name: str, weights: str) -> None:
    """Raise ``ValueError`` unless ``weights`` suits proposal ``name``: an existing state-dict file (``.pt``,
    ``.pth``, ``.bin``, ``.safetensors``) for any proposal, or a torchvision weights name (``DEFAULT``,
    ``IMAGENET1K_V1``, ...) for a ``torchvision:`` proposal."""
    if is_weights_file(weights):
        if not Path(weights).is_file():
            raise ValueError(f"state-dict file '{weights}' does not exist")
        return
    if not name.startswith(TORCHVISION_PREFIX):
        raise ValueError(f"'{weights}' is not a state-dict file path (.pt, .pth, .bin, .safetensors); a registered "
                         f"proposal such as '{name}' takes weights only from a file")
    import torchvision

    known = list(torchvision.models.get_model_weights(name[len(TORCHVISION_PREFIX):]).__members__)
    if weights not in known:
        raise ValueError(f"torchvision has no weights '{weights}' for '{name}' (known: {', '.join(known)}), and it "
                         "is not a state-dict file path (.pt, .pth, .bin, .safetensors)")


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"proposal_weights: '{path}' holds no state dict (a mapping of names to tensors)")
    return state


def _load_weights(candidates: list[nn.Module], path: str, name: str) -> None:
    """Load the state dict at ``path`` into the first of ``candidates`` whose keys it matches exactly (for a
    torchvision proposal: the whole classifier, then the part kept before pooling)."""
    state = _read_state_dict(path)
    for module in candidates:
        if set(state) == set(module.state_dict()):
            module.load_state_dict(state)
            return
    own = set(candidates[-1].state_dict())
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    raise ValueError(f"proposal_weights: state dict '{path}' does not fit proposal '{name}' "
                     f"({type(candidates[-1]).__name__}): "
                     f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
                     f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")


def _torchvision_model(model_name: str, weights: str | None) -> nn.Module:
    import torchvision

    if weights is None or is_weights_file(weights):
        return torchvision.models.get_model(model_name, weights=None)
    try:
        return torchvision.models.get_model(model_name, weights=weights)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise ValueError(f"proposal_weights: could not fetch torchvision weights '{weights}' for '{model_name}' "
                         f"({type(exc).__name__}: {exc}); fetch them once where the network is reachable (they are "
                         "cached under torch.hub.get_dir()) or give a state-dict file instead") from exc


def build_proposal(name: str, weights: str | None = None) -> nn.Module:
    """A fresh proposal module for ``name``, in eval mode (never the registered object itself).

    Args:
        name: a registered name or ``"torchvision:<model>"``.
        weights: ``None`` (a registered module as registered; torchvision models with random weights), a
            torchvision weights name (``"DEFAULT"``, ``"IMAGENET1K_V1"``, ...; fetched once by torchvision and
            cached), or a state-dict file (``.pt``, ``.pth``, ``.bin``, ``.safetensors``) of the proposal or, for a
            torchvision proposal, of the whole classifier.
    """
    check_proposal_name(name)
    if weights is not None:
        check_proposal_weights(name, weights)
    if name in _PROPOSALS:
        source = _PROPOSALS[name]
        module = copy.deepcopy(source) if isinstance(source, nn.Module) else source()
        if not isinstance(module, nn.Module):
            raise TypeError(f"the factory of proposal '{name}' returned {type(module).__name__}, not an nn.Module")
        if weights is not None:
            _load_weights([module], weights, name)
    else:
        model_name = name[len(TORCHVISION_PREFIX):]
        model = _torchvision_model(model_name, weights)
        module = _cut_before_pooling(model, model_name)
        if weights is not None and is_weights_file(weights):
            _load_weights([model, module], weights, name)
    return module.eval()


def proposal_feature_shape(module: nn.Module, name: str, image: torch.Tensor) -> tuple[int, ...]:
    """Run ``module`` once on ``image`` and return its output shape; it must be ``(B, C, h, w)``."""
    with torch.no_grad():
        try:
            out = module(image)
        except Exception as exc:
            raise ValueError(f"proposal '{name}' ({type(module).__name__}) does not run on the model's input of shape "
                             f"{tuple(image.shape)}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != image.shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"proposal '{name}' ({type(module).__name__}) returned {got}; a proposal must map the "
                         f"(B, C, H, W) image to a (B, C', h, w) feature map (its last conv stage, before pooling)")
    return tuple(out.shape)


__all__ = ["register_proposal", "registered_proposals", "build_proposal", "check_proposal_name",
           "check_proposal_weights", "proposal_feature_shape", "UnknownProposal", "DEFAULT_PROPOSAL"]
