"""Cost analysis: a model's layers priced on a hardware description (Analysis), the policy vocabulary (Policy) and budgets (Budget). Imports core, hardware, capture."""
