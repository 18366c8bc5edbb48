"""Training memory of full-size GIT at batch 8 under bf16 autocast, computed (not measured on a GPU).

    python benchmarks/git_memory.py                     # git-base (ViT-B/16, 224 px), batch 8, 20-token captions
    python benchmarks/git_memory.py --large             # git-large (ViT-L/14, 224 px)

Random weights from the architecture's config (no download). For each mode: parameters (fp32, as Accelerate's bf16
autocast keeps them), gradients and AdamW's two moments for the trainable ones (fp32), plus the activations
autograd saves for backward in one bf16-autocast forward (summed through `saved_tensors_hooks`, so it counts what
backward really keeps). Allocator overhead, CUDA context and temporaries are not included.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from captune.finetune import apply_mode  # noqa: E402
from captune.models import git  # noqa: E402


def config(large: bool):
    from transformers import GitConfig

    vision = (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=224, patch_size=14) if large else dict(image_size=224, patch_size=16))
    return GitConfig(vision_config=vision)  # GitConfig's text defaults are GIT-base/large's decoder (6 x 768)


def measure(mode: str, large: bool, batch: int, tokens: int) -> dict:
    from transformers import GitForCausalLM

    torch.manual_seed(0)
    model = apply_mode(GitForCausalLM(config(large)), mode)
    model.train()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    side = model.config.vision_config.image_size if hasattr(model, "config") else 224
    batch_inputs = {"pixel_values": torch.randn(batch, 3, side, side),
                    "input_ids": torch.randint(1000, 2000, (batch, tokens)),
                    "attention_mask": torch.ones(batch, tokens, dtype=torch.long)}
    batch_inputs["labels"] = batch_inputs["input_ids"].clone()
    saved = {}

    def pack(tensor):
        # Parameters are counted once, below; everything else autograd keeps is activation memory.
        if not isinstance(tensor, torch.nn.Parameter):
            saved[(tensor.data_ptr(), tensor.dtype)] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        git.loss_sum(model, batch_inputs, label_smoothing=0.0)
    gib = 2 ** 30
    states = (total * 4 + trainable * (4 + 8)) / gib
    activations = sum(saved.values()) / gib
    return {"mode": mode, "parameters": total, "trainable": trainable, "weights_grads_adam_gib": round(states, 2),
            "activations_gib": round(activations, 2), "total_gib": round(states + activations, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", action="store_true")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--modes", nargs="+", default=["full", "frozen-vision", "lora"])
    args = parser.parse_args()
    for mode in args.modes:
        print(json.dumps(measure(mode, args.large, args.batch_size, args.tokens)), flush=True)


if __name__ == "__main__":
    main()
