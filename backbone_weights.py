"""Pre-trained backbone weights from a file (--pretrained PATH): this project's Pretrain_simclr.py output and the
usual shapes of published checkpoints. The net keeps its own new classifier."""
import argparse

import torch

from cli import UserError

# Where a checkpoint keeps its weights when they are not the whole file (SupContrast and C2D: "model").
NESTED_KEYS = ("state_dict", "model")
# What a checkpoint may hold besides tensors and plain values: SupContrast stores its argparse options.
SAFE_GLOBALS = (argparse.Namespace,)


def read_checkpoint(path):
    """The tensors of a checkpoint file as a flat {key: tensor}: the file's own dict, or the one nested under
    state_dict / model. Loaded with weights_only (no code from the file runs)."""
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"--pretrained {path}: cannot read it as a checkpoint ({type(exc).__name__}): pass a state-"
                        "dict file (Pretrain_simclr.py's <prefix>_backbone.pth or a published checkpoint)") from None
    for key in NESTED_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise UserError(f"--pretrained {path} holds no tensors (nor under {' / '.join(NESTED_KEYS)}): pass a state-"
                        "dict file")
    return tensors


def best_prefix(keys, wanted):
    """The prefix (module., encoder., backbone., module.encoder., ... or none) that turns the most of `keys` into
    names in `wanted`, and {wanted name: key} for it."""
    found = {}
    for key in keys:
        candidates = [(key, "")] + [(key[i + 1:], key[:i + 1]) for i, ch in enumerate(key) if ch == "."]
        for name, prefix in candidates:
            if name in wanted:
                found.setdefault(prefix, {})[name] = key
    if not found:
        return "", {}
    prefix = max(found, key=lambda p: (len(found[p]), -len(p)))
    return prefix, found[prefix]


def load_backbone(net, path, classifier, arch, name=None):
    """Load every weight of net but its classifier (module name `classifier`) from the checkpoint at path; with a
    name, print what was loaded into it. Returns (tensors loaded, prefix removed); UserError with one line when the
    backbone does not match."""
    tensors = read_checkpoint(path)
    own = {k: v for k, v in net.state_dict().items() if not k.startswith(classifier + ".")}
    prefix, names = best_prefix(tensors, own)
    # BatchNorm's batch counters are absent from many published files and change nothing in training
    needed = [k for k in own if not k.endswith("num_batches_tracked")]
    missing = [k for k in needed if k not in names]
    if len(missing) == len(needed):
        shown = ", ".join(list(tensors)[:3])
        raise UserError(f"--pretrained {path} holds no {arch} backbone weights (its keys: {shown}, ...): pass a "
                        f"checkpoint of {arch}, or choose the net it was made for")
    for own_name, key in names.items():
        if tensors[key].shape != own[own_name].shape:
            there, here = ("x".join(map(str, t.shape)) for t in (tensors[key], own[own_name]))
            raise UserError(f"--pretrained {path} does not fit this {arch}: {key} is {there} there and {here} here: "
                            "pass a checkpoint of the same net and width (--net_width where the script has it), or "
                            "choose the net it was made for")
    if missing:
        raise UserError(f"--pretrained {path} lacks {len(missing)} of {len(needed)} {arch} backbone weights (e.g. "
                        f"{missing[0]}): pass a checkpoint of the whole {arch}, or choose the net it was made for")
    net.load_state_dict({own_name: tensors[key] for own_name, key in names.items()}, strict=False)
    if name is not None:
        removed = f" (key prefix {prefix!r} removed)" if prefix else ""
        print(f"{name}: {len(names)} backbone tensors loaded from {path}{removed}; the classifier ({classifier}) "
              "starts afresh", flush=True)
    return len(names), prefix
