"""BitsDropout: the CPU LoRA dropout must behave like nn.Dropout (rate, scaling, backward, seeding)."""

import pytest
import torch

from ragtune_trainer.lora_dropout import BitsDropout, keep_mask, use_bits_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_mask_rate_matches_p(p):
    torch.manual_seed(0)
    keep = keep_mask(torch.Size([512, 1001]), p, torch.device("cpu"))  # odd size: not a multiple of 4
    dropped = 1 - keep.float().mean().item()
    assert abs(dropped - p) < 0.005
    # lanes are independent: neighbouring elements are not correlated
    k = keep.flatten().float()
    assert abs(torch.corrcoef(torch.stack([k[:-1], k[1:]]))[0, 1].item()) < 0.01


def test_forward_scales_survivors_and_backward_uses_the_same_mask():
    torch.manual_seed(1)
    drop = BitsDropout(0.25).train()
    x = torch.randn(64, 96, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.allclose(x.grad, torch.where(kept, grad / 0.75, torch.zeros_like(grad)))


def test_identity_in_eval_and_seeded_in_training():
    x = torch.randn(8, 32)
    drop = BitsDropout(0.3)
    assert drop.eval()(x) is x
    drop.train()
    torch.manual_seed(5)
    a = drop(x)
    torch.manual_seed(5)
    b = drop(x)
    assert torch.equal(a, b) and not torch.equal(a, drop(x))


def test_use_bits_dropout_replaces_only_lora_dropouts(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    assert use_bits_dropout(model) == 2 * 7
    kinds = {type(d) for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()}
    assert kinds == {BitsDropout}
    assert all(d.p == 0.1 for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values())
    assert use_bits_dropout(model) == 0  # idempotent
