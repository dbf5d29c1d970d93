"""The Optuna study: ``config`` (the search's settings), ``run`` (create or resume a study and run
its trials), ``create`` (the steps that set a new study up), ``settings`` (what a resumed study must
share with its creator), ``trial`` (one trial), ``front`` (what a study found), ``storage`` and
``baseline_store`` (the database), ``coordination`` and ``workers`` (several workers on one study)
and ``origin`` (how an enqueued trial is labelled).
"""
