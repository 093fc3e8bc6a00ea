"""completion_logps: the log-probs, entropy and values of completion tokens equal a full forward's, at the
sampling temperature, for left-padded prompts and right-padded completions."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from component.train.rlhf import completion_logps
from component.train.value_head import ValueHead


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logps_equal_a_full_forward(tiny_llama_dir, temperature):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    pad = 0
    prompts = [[5, 6, 7], [8, 9]]
    completions = [[10, 11, 12], [13, 14]]  # the second ends early: one pad after it
    width = max(map(len, prompts))
    prompt_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor([c + [pad] * (3 - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (3 - len(c)) for c in completions])
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    batch = {
        "input_ids": torch.cat([prompt_ids, completion_ids], 1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp_min(0),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.summary.weight)
    with torch.no_grad():
        stats = completion_logps(model, batch, chunk=2, entropy=True, value_head=head, temperature=temperature)
        for row, (prompt, completion) in enumerate(zip(prompts, completions)):
            ids = torch.tensor([prompt + completion])
            out = model(ids, output_hidden_states=True)
            log_probs = torch.log_softmax(out.logits[0, len(prompt) - 1 : -1] / temperature, -1)
            expected = log_probs.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
            n = len(completion)
            torch.testing.assert_close(stats.logps[row, :n], expected, atol=1e-5, rtol=1e-5)
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            torch.testing.assert_close(stats.entropy[row, :n], entropy, atol=1e-5, rtol=1e-5)
            values = head(out.hidden_states[-1][0, len(prompt) - 1 : -1])
            torch.testing.assert_close(stats.values[row, :n], values, atol=1e-5, rtol=1e-5)
            assert (stats.logps[row, n:] == 0).all() and (stats.values[row, n:] == 0).all()
