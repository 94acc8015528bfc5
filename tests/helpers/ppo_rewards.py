"""A verifiable reward for the PPO trainer tests: `ppo.reward_fn=helpers.ppo_rewards:digit_fraction`."""


def digit_fraction(prompts: list[str], completions: list[str]) -> list[float]:
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]
