"""The command line, the only code that prints: ``main`` (the table of commands), one module per
command (``search``, ``pareto``, ``show``, ``dashboard``, ``export``, ``bench``), ``options``
(argument types and the options commands share), ``console`` (rich progress and tables) and
``plot`` (the Pareto plot).
"""
