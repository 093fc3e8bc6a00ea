"""completion_logps: the log-probs, entropy and values of completion tokens equal a full forward's, at the
sampling temperature, for left-padded prompts and right-padded completions; under `sdpa_segments` the rows run as
one flat packed row of their real tokens, with the same log-probs and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from component.model.packed_attention import use_segment_attention
from component.train.rlhf import completion_logps
from component.train.value_head import ValueHead


def rollout_batch(prompts: list[list[int]], completions: list[list[int]], pad: int = 0) -> dict[str, torch.Tensor]:
    """A rollout batch as RLTrainer.rollout builds it: prompts left-padded, completions right-padded."""
    width = max(map(len, prompts))
    prompt_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    longest = max(map(len, completions))
    completion_ids = torch.tensor([c + [pad] * (longest - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (longest - len(c)) for c in completions])
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    return {
        "input_ids": torch.cat([prompt_ids, completion_ids], 1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp_min(0),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }


@pytest.mark.parametrize("attention", ["sdpa", "sdpa_segments"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logps_equal_a_full_forward(tiny_llama_dir, temperature, attention):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    if attention == "sdpa_segments":
        use_segment_attention(model)
    prompts = [[5, 6, 7], [8, 9]]
    completions = [[10, 11, 12], [13, 14]]  # the second ends early: one pad after it
    batch = rollout_batch(prompts, completions)
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


def test_packed_loss_pass_equals_the_padded_one(tiny_llama_dir):
    """The loss pass's log-probs and every gradient are the same as one flat row of real tokens (sdpa_segments) as
    in the padded rows with their mask; the flat row has no padding at all."""
    generator = torch.Generator().manual_seed(1)
    lengths = [(7, 9), (3, 4), (12, 1), (5, 9)]  # (prompt, completion)
    prompts = [torch.randint(3, 100, (p,), generator=generator).tolist() for p, _ in lengths]
    completions = [torch.randint(3, 100, (c,), generator=generator).tolist() for _, c in lengths]
    batch = rollout_batch(prompts, completions)
    results = []
    for attention in ("sdpa", "sdpa_segments"):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        if attention == "sdpa_segments":
            use_segment_attention(model)
        shapes = []
        model.model.register_forward_hook(lambda _m, _a, out, seen=shapes: seen.append(out.last_hidden_state.shape))
        logps = completion_logps(model, batch, chunk=3).logps
        logps.sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((logps.detach(), grads, shapes[0][:2]))
    (padded, padded_grads, padded_shape), (packed, packed_grads, packed_shape) = results
    assert tuple(padded_shape) == tuple(batch["input_ids"].shape)
    assert tuple(packed_shape) == (1, int(batch["attention_mask"].sum()))  # only the real tokens
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, padded_grads[name], atol=1e-5, rtol=1e-4, msg=name)
