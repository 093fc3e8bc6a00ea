"""Reward functions the RL tests load as 'tests.train.rl_rewards:NAME' (the `reward_function` key)."""


def constant(prompts, completions, references):
    return [1.0] * len(completions)


def short(prompts, completions, references):
    """Prefers short answers: a signal a tiny random model can learn in a few steps."""
    return [-float(len(c)) for c in completions]
