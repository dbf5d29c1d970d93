"""What to remove and how: ``policy`` (a frozen, storable description of one pruning), ``space``
(the search space file that turns an Optuna trial into a policy), ``channels`` (applying a policy
with torch-pruning's dependency graph), ``recipes`` (the policies a new study runs first) and
``budget_fit`` (a sampled policy scaled to just meet the budget).

Recipes and budget fitting choose policies by measured latency; they are handed the measurement
(:class:`search.measuring.candidate.CandidateMeter`) rather than timing anything themselves.
"""
